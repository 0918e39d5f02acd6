"""What the web page of ``nijimi serve`` needs beyond A1111's API: the page itself (:data:`PAGE`, one HTML/JS/CSS
bundle served at ``/``, no build step), the gallery of the images saved since the server started (:class:`Gallery`,
``GET /nijimi/v1/gallery``) and the settings of a dropped image as A1111 txt2img fields (:func:`recipe`,
``POST /nijimi/v1/recipe``).

A gallery entry names the saved file (served from the output folder, so a download is the PNG with its metadata) and
the settings of that one image as txt2img fields (:func:`~nijimi.server.a1111.request_fields`). :func:`recipe` reads
an image's metadata (PNG text, JPEG/WebP EXIF: nijimi, A1111 or ComfyUI) the way ``nijimi reproduce`` does
(:func:`~nijimi.ui.foreign.foreign_settings`, :func:`~nijimi.pipelines.foreign.to_request`), so the page fills its
form with exactly what ``reproduce`` would run.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nijimi.embedded import EMBEDDED
from nijimi.errors import ConfigError
from nijimi.io.find import Folders as FindFolders
from nijimi.io.imagemeta import image_metadata
from nijimi.pipelines.foreign import to_request
from nijimi.server import a1111
from nijimi.server.a1111 import Limits, Outcome
from nijimi.ui.foreign import foreign_settings

PAGE = Path(__file__).parent / "page"
"""The page bundle: ``index.html``, ``app.js``, ``style.css``."""
OUTPUTS = "/outputs/"
"""The URL prefix of the output folder."""


class Gallery:
    """The images saved since the server started, oldest first (every thread may add and read)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: list[dict[str, Any]] = []

    def add(self, outcome: Outcome, mode: str) -> None:
        """Record the saved images of one call (``mode``: txt2img or img2img)."""
        with self.lock:
            for name, request, text in zip(outcome.files, outcome.requests, outcome.infotexts, strict=True):
                self.entries.append({"id": len(self.entries), "file": name, "url": OUTPUTS + quote(name),
                                     "mode": mode, "model": outcome.model, "infotext": text,
                                     "fields": a1111.request_fields(request)})

    def listing(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.entries)


def recipe(body: Any, limits: Limits, lora_dir: Path) -> dict[str, Any]:
    """``POST /nijimi/v1/recipe`` ``{"image": base64}``: ``{"source": "nijimi"|"A1111"|"ComfyUI", "fields": txt2img
    fields, "model": the checkpoint the image names (or null), "infotext", "warnings"}``; LoRAs are looked for in
    ``lora_dir`` (those not there are left out, with a warning)."""
    if not isinstance(body, dict) or "image" not in body:
        raise ConfigError("the body must be a JSON object with a base64 \"image\"")
    meta = image_metadata(a1111.decode_image("image", body["image"], limits), "image")
    settings = foreign_settings(meta, "image")
    imported = to_request(settings, FindFolders(lora=lora_dir), EMBEDDED)
    source = "nijimi" if isinstance(meta["recipe"], dict) and settings.source == "A1111" else settings.source
    return {"source": source, "fields": a1111.request_fields(imported.request),
            "model": settings.values.get("Model"), "infotext": meta["parameters"] or "",
            "warnings": list(imported.warnings)}
