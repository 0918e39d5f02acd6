"""Finding the files an image's metadata names (checkpoints, LoRAs, VAEs, embeddings) by A1111's hashes or by name.

A1111 records a file by a short hash, the first hex digits of one of its digests (``modules/hashes.py``,
``modules/sd_models.py``, ``extensions-builtin/Lora/network.py``, ``modules/textual_inversion``):

- checkpoints (``Model hash``): 10 digits of the file's SHA-256 ("AutoV2"); before A1111 1.0, 8 digits of the
  SHA-256 of the 64 KiB at offset 1 MiB (the legacy hash, :func:`legacy_model_hash`);
- VAEs (``VAE hash``): 10 digits of the file's SHA-256;
- LoRAs (``Lora hashes``): 12 digits of kohya's ``sshs_model_hash`` metadata or, for a safetensors file, of the
  SHA-256 of everything after its header (kohya's "addnet" hash, :func:`addnet_hash`); the file's SHA-256 otherwise;
- embeddings (``TI hashes``): 12 digits of the file's SHA-256.

Names: A1111 writes ``Model: NAME`` (the file's name without its ending, subfolders joined by ``_``) and ``Lora
hashes``' names as written in the prompt's tags; ComfyUI names files by their path in its model folder
(``sub/name.safetensors``). A name matches a file whose path relative to the folder, with or without its ending and
with ``/`` or ``_`` between folders, or whose stem, equals it. Whole-file digests are cached
(:func:`~nijimi.io.pngmeta.cached_digest`), so a folder is read once until its files change; a file whose name
matches is tried before the others are hashed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from nijimi.errors import CheckpointError, ConfigError
from nijimi.io import safetensors
from nijimi.io.pngmeta import cached_digest, file_sha256, sha256_rest

KINDS = {
    "model": (".safetensors", ".ckpt", ".pt", ".bin", ".pth"),
    "lora": (".safetensors", ".pt", ".ckpt", ".bin"),
    "vae": (".safetensors", ".ckpt", ".pt", ".bin", ".pth"),
    "embedding": (".safetensors", ".pt", ".bin"),
}
"""File endings searched for each kind of file."""
LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000
_ADDNET_CACHE = "addnet_hashes.json"


@dataclass(frozen=True)
class Folders:
    """Where to look for each kind of file (None: that kind is not looked for)."""

    model: Path | None = None
    lora: Path | None = None
    vae: Path | None = None
    embedding: Path | None = None


class Found(NamedTuple):
    """A file found for a name and/or hash: ``exact`` False when only its name matched and its hash differs."""

    path: Path
    exact: bool


def legacy_model_hash(path: str | os.PathLike) -> str:
    """A1111's model hash before 1.0: the first 8 hex digits of the SHA-256 of the 0x10000 bytes at offset
    0x100000 (fewer when the file is shorter)."""
    try:
        with open(path, "rb") as f:
            f.seek(LEGACY_OFFSET)
            return hashlib.sha256(f.read(LEGACY_SIZE)).hexdigest()[:8]
    except OSError as e:
        raise CheckpointError(f"cannot hash file {os.fspath(path)!r}: {e.strerror or e}") from e


def _addnet(f: BinaryIO) -> str:
    f.seek(8 + int.from_bytes(f.read(8), "little"))  # past the header
    return sha256_rest(f)


def addnet_hash(path: str | os.PathLike) -> str:
    """kohya's hash of a safetensors file: the SHA-256 of everything after the header (64 hex digits), cached."""
    return cached_digest(path, _ADDNET_CACHE, _addnet)


def lora_hash(path: str | os.PathLike) -> str:
    """The digest A1111 shortens to 12 digits for ``Lora hashes``: the file's ``sshs_model_hash`` metadata, else
    its :func:`addnet_hash` (safetensors) or :func:`~nijimi.io.pngmeta.file_sha256` (other files)."""
    if Path(path).suffix.lower() != ".safetensors":
        return file_sha256(path)
    try:
        recorded = safetensors.read_metadata(path).get("sshs_model_hash")
    except (CheckpointError, OSError):
        recorded = None  # an unreadable header: the data hash below still names the file
    return recorded if isinstance(recorded, str) and recorded else addnet_hash(path)


def hash_matches(path: Path, kind: str, short: str) -> bool:
    """Whether ``short`` (hex digits, any case) is A1111's hash of ``path`` as a file of ``kind``."""
    short = short.strip().lower()
    if len(short) < 8:
        return False
    if kind == "model" and len(short) == 8 and legacy_model_hash(path) == short:
        return True
    digest = lora_hash(path) if kind == "lora" else file_sha256(path)
    return digest.lower().startswith(short)


def _names(path: Path, folder: Path) -> set[str]:
    relative = path.relative_to(folder)
    stem = relative.with_suffix("").as_posix()
    forms = {relative.as_posix(), stem, path.stem, path.name}
    return forms | {form.replace("/", "_") for form in forms}


def _files(folder: Path, kind: str) -> Iterator[Path]:
    endings = KINDS[kind]
    return (p for p in sorted(folder.rglob("*")) if p.suffix.lower() in endings and p.is_file())


def find_file(folder: str | os.PathLike, kind: str, name: str | None = None,
              short_hash: str | None = None) -> Found | None:
    """The ``kind`` file (``"model"``, ``"lora"``, ``"vae"``, ``"embedding"``) in ``folder`` (searched recursively)
    that ``name`` and ``short_hash`` name: the first file whose name and hash match; else, with a hash, the first
    file whose hash matches; else the first file whose name matches (``exact`` False if a hash was given). None when
    nothing matches. A folder that does not exist raises ConfigError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{kind} folder {folder} does not exist")
    files = list(_files(folder, kind))
    named = [p for p in files if name and name.strip() in _names(p, folder)]
    if not short_hash:
        return Found(named[0], True) if named else None
    for path in named + [p for p in files if p not in named]:
        if hash_matches(path, kind, short_hash):
            return Found(path, True)
    return Found(named[0], False) if named else None
