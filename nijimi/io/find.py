"""Finding a model or LoRA file that a PNG recipe names by name and hash (A1111's ``Model`` / ``Model hash``), in the
folders a user points at, instead of by the absolute path of the machine that made the image.

:func:`find_by_name_and_hash` looks in each folder, in order, for a file called ``name`` or ``name`` plus one of the
checkpoint endings, and returns the first whose :func:`~nijimi.io.pngmeta.model_hash` (the first 10 hex digits of
its SHA-256) is ``digest``. Folders are not searched below their top level.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from nijimi.errors import CheckpointError
from nijimi.io.pngmeta import model_hash

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
"""Endings tried after a bare name."""


def find_by_name_and_hash(name: str, digest: str | None, dirs: Iterable[str | os.PathLike],
                          what: str = "model") -> Path:
    """The first file called ``name`` or ``name + ending`` (:data:`SUFFIXES`) in ``dirs`` whose hash is
    ``digest``; with ``digest`` None (a diffusers folder has no hash) the first such file or folder. Raises
    CheckpointError naming ``what``, the name, the hash, the folders searched and any file of that name whose hash
    differs."""
    if not name or Path(name).name != name:
        raise CheckpointError(f"{what} name {name!r} must be a plain file name")
    dirs = [Path(d) for d in dict.fromkeys(str(d) for d in dirs)]
    differing = []
    for folder in dirs:
        for candidate in (folder / name, *(folder / f"{name}{s}" for s in SUFFIXES if not name.endswith(s))):
            if digest is None and (candidate.is_file() or candidate.is_dir()):
                return candidate
            if digest is None or not candidate.is_file():
                continue
            found = model_hash(candidate)
            if found == digest:
                return candidate
            differing.append(f"{candidate} has hash {found}")
    searched = ", ".join(str(d) for d in dirs)
    mismatch = f"; {'; '.join(differing)}" if differing else ""
    raise CheckpointError(f"{what} {name!r} with hash {digest} not found in {searched}{mismatch}")
