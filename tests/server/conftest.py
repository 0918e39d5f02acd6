"""A running ``nijimi serve`` for the API tests: the embedded model behind a :class:`StudioServer` on a free port
of 127.0.0.1, served from a thread for the whole session, with its own models, LoRA, ControlNet and output folders
(each holding a symlink that points out of it), and :func:`call`, a urllib client that returns (status, JSON) for
any answer."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nijimi.embedded import ADAPTERS, CONTROLNET, embedded_path
from nijimi.pipelines.pipeline import Pipeline, load
from nijimi.server.app import ServeOptions, Studio
from nijimi.server.folders import Folders
from nijimi.server.http import StudioServer


@dataclass
class Served:
    """The server (``url``, ``studio``), its folders' parent ``root``, and a urllib client."""

    url: str
    studio: Studio
    server: StudioServer
    root: Path

    @property
    def pipe(self) -> Pipeline:
        """The resident pipeline (use it only while no job runs)."""
        return self.studio.models.pipe

    def call(self, path: str, body=None, method: str | None = None, headers: dict | None = None,
             raw: bytes | None = None) -> tuple[int, object]:
        """``(status, decoded JSON)`` of one request to ``path``; ``body`` is sent as JSON, ``raw`` as it is; POST
        when there is a body."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method or ("GET" if data is None else
                                                                                       "POST"),
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    @staticmethod
    def b64png(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    @staticmethod
    def pixels(b64: str) -> np.ndarray:
        """RGB pixels of a base64 image."""
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("serve")
    secret = root / "secret.txt"
    secret.write_text("not for clients")
    models, loras, output, controlnets = root / "models", root / "loras", root / "outputs", root / "controlnets"
    for folder in (models, loras, output, controlnets):
        folder.mkdir()
    shutil.copy(CONTROLNET, controlnets / "mask.safetensors")
    (controlnets / "outside.safetensors").symlink_to(CONTROLNET)
    shutil.copy(embedded_path(), models / "copy.safetensors")
    (models / "outside.safetensors").symlink_to(embedded_path())
    shutil.copy(ADAPTERS / "pink.safetensors", loras / "pink.safetensors")
    (loras / "outside.safetensors").symlink_to(ADAPTERS / "pink.safetensors")
    (output / "secret.txt").symlink_to(secret)
    loaded: dict[str, Pipeline] = {}

    def loader(source: str, **kwargs) -> Pipeline:  # each model loaded once per session
        if source not in loaded:
            loaded[source] = load(source, **kwargs)
        return loaded[source]

    studio = Studio(ServeOptions(folders=Folders(models, loras, output, controlnets)), loader=loader)
    studio.start()
    server = StudioServer(studio, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Served(f"http://127.0.0.1:{server.server_address[1]}", studio, server, root)
    server.shutdown()
    server.server_close()
    studio.stop()
