"""Builders of bad inputs for the bad-input suite. Each returns ``make(folder, shared)``, which writes one crafted
file (or folder) into the case's folder; ``shared`` holds the session's good files (``model``, ``lora``)."""

from __future__ import annotations

import json
import os
import pickle
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from nijimi.io.pngmeta import model_hash

Make = Callable[[Path, dict], object]


class Payload:
    """Unpickling this runs code: it creates ``PWNED`` in the working directory (the case's folder, whose snapshot
    would show it)."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def chain(*makes: Make) -> Make:
    def make(folder: Path, shared: dict) -> list:
        return [m(folder, shared) for m in makes]
    return make


def raw(name: str, data: bytes | str) -> Make:
    def make(folder: Path, shared: dict) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return make


def folder(name: str) -> Make:
    return lambda root, shared: (root / name).mkdir(parents=True)


def image(name: str, size: tuple[int, int] = (64, 64), mode: str = "RGB", fmt: str = "PNG") -> Make:
    def make(root: Path, shared: dict) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, 200).save(root / name, format=fmt)
    return make


def cut(name: str, length: int, source: str = "model") -> Make:
    """The first ``length`` bytes of a shared good file."""
    return lambda root, shared: (root / name).write_bytes(shared[source].read_bytes()[:length])


def safetensors_file(name: str, header: object, length: int | None = None, data: bytes = b"") -> Make:
    """A safetensors file with ``header`` (JSON-encoded unless bytes) and a header-length field of ``length``."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(body) if length is None else length
    return raw(name, struct.pack("<Q", size) + body + data)


def evil_zip(name: str) -> Make:
    """A PyTorch zip checkpoint whose pickle calls ``os.system``."""
    return lambda root, shared: torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload()}, root / name)


def evil_pickle(name: str) -> Make:
    """A legacy raw pickle that calls ``os.system``."""
    return raw(name, pickle.dumps(Payload(), protocol=2))


def png_text(name: str, compressed: bool = False, **chunks: str) -> Make:
    """A small PNG with text chunks (zTXt when ``compressed``)."""
    def make(root: Path, shared: dict) -> None:
        info = PngImagePlugin.PngInfo()
        for key, value in chunks.items():
            info.add_text(key, value, zip=compressed)
        Image.new("RGB", (8, 8)).save(root / name, pnginfo=info)
    return make


def _request(**changes: object) -> dict:
    base = {"prompt": "a red cube", "steps": 2, "seed": 1, "width": 64, "height": 64, "sampler": "euler"}
    return {**base, **changes}


def _formatted(value: object, shared: dict) -> object:
    """``value`` with ``{model}`` and ``{lora}`` in its texts (at any depth) replaced by the shared files' paths."""
    if isinstance(value, str):
        return value.format(**shared) if "{" in value else value
    if isinstance(value, list | dict):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        done = {k: _formatted(v, shared) for k, v in items}
        return done if isinstance(value, dict) else list(done.values())
    return value


def recipe_png(name: str, changes: dict | None = None, drop: tuple[str, ...] = (), **recipe: object) -> Make:
    """A PNG with a nijimi recipe for the shared model (by name, hash and path); ``changes`` changes fields of a
    valid request, ``drop`` removes recipe keys, ``recipe`` replaces top-level recipe entries."""
    def make(root: Path, shared: dict) -> None:
        body = {"request": _formatted(_request(**(changes or {})), shared),
                "model": {"name": "tiny", "hash": model_hash(shared["model"]), "source": str(shared["model"])},
                "dtype": "fp32", **recipe}
        body["model"] = _formatted(body["model"], shared)
        for key in drop:
            body.pop(key)
        png_text(name, nijimi=json.dumps(body), parameters="a red cube\nSteps: 2, Seed: 1, Size: 64x64")(root, shared)
    return make


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb(name: str, side: int = 30000) -> Make:
    """A PNG header announcing ``side`` × ``side`` pixels (a decompression bomb), a few bytes long."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        _chunk(b"IEND", b"")
    return raw(name, data)


def model_with_config(name: str, change: Callable[[dict], None]) -> Make:
    """The shared model with its embedded nijimi config changed by ``change``."""
    def make(root: Path, shared: dict) -> None:
        data = shared["model"].read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        config = json.loads(header["__metadata__"]["nijimi_config"])
        change(config)
        header["__metadata__"]["nijimi_config"] = json.dumps(config)
        body = json.dumps(header).encode()
        body += b" " * (-len(body) % 8)
        (root / name).write_bytes(struct.pack("<Q", len(body)) + body + data[8 + size:])
    return make


def nan_weights(name: str, source: str = "model") -> Make:
    """A shared file with every float tensor NaN (same header, so only the values are wrong)."""
    def make(root: Path, shared: dict) -> None:
        data = bytearray(shared[source].read_bytes())
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        nan = {"F32": struct.pack("<f", float("nan")), "F16": b"\x00\x7e", "BF16": b"\xc0\x7f"}
        for key, entry in header.items():
            if key != "__metadata__" and entry["dtype"] in nan:
                start, end = (8 + size + o for o in entry["data_offsets"])
                word = nan[entry["dtype"]]
                data[start:end] = word * ((end - start) // len(word))
        (root / name).write_bytes(bytes(data))
    return make


class Fifo:
    """A FIFO whose writer end a thread opens (and closes at once): ``opened`` tells whether anything opened it for
    reading. :meth:`release` unblocks the thread when nothing did."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path, self.opened = path, threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        self.opened.set()
        os.close(fd)

    def release(self) -> bool:
        """Stop the thread; returns whether the FIFO was opened before this call."""
        opened = self.opened.is_set()
        if not opened:
            os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))
        self.thread.join(timeout=10)
        return opened


def fifo(name: str) -> Make:
    return lambda root, shared: Fifo(root / name)
