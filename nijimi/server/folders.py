"""The folders a server may read and write, and the only ways a client's text becomes a path in them.

A client never names a path: it names a model or LoRA from a listing (:func:`list_models`, :func:`list_loras`), or
a file relative to a served folder (:func:`served_file`). Either way the resolved path (symlinks followed) must lie
inside the folder's resolved path, so ``../``, absolute paths and symlinks that point out are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nijimi.adapters.tags import ADAPTER_SUFFIXES, parse_lora_tags, resolve_lora
from nijimi.embedded import ADAPTERS, EMBEDDED
from nijimi.errors import ConfigError
from nijimi.server.errors import ApiError

MODEL_SUFFIXES = (".safetensors", ".ckpt")
"""Single-file checkpoints listed in a models folder (A1111's); diffusers folders (``model_index.json``) too."""


@dataclass(frozen=True)
class Folders:
    """``models``: where ``sd-models`` lists checkpoints (None: only the embedded model and ``--model``);
    ``loras``: the LoRA folder (default: the embedded model's demo adapters); ``output``: where saved images go."""

    models: Path | None = None
    loras: Path = ADAPTERS
    output: Path = Path("outputs")


def inside(root: Path, path: Path) -> bool:
    """Whether ``path``, symlinks resolved, is ``root`` (resolved) or below it."""
    return path.resolve().is_relative_to(root.resolve())


def served_file(root: Path, relative: str) -> Path:
    """The file ``relative`` (a URL path below a served folder, already %-decoded) names in ``root``; ApiError 403
    for an absolute path, a ``..`` part, a NUL or a symlink out of ``root``, 404 when there is no such file."""
    parts = PurePosixPath(relative).parts
    if not relative or "\x00" in relative or relative.startswith(("/", "\\")) or ".." in parts \
            or any("\\" in p or ":" in p for p in parts):
        raise ApiError(403, "Forbidden", f"{relative!r} is not a file name inside the served folder")
    path = root.joinpath(*parts)
    if not inside(root, path):
        raise ApiError(403, "Forbidden", f"{relative!r} leads outside the served folder")
    if not path.is_file():
        raise ApiError(404, "Not Found", f"no file {relative!r}")
    return path.resolve()


@dataclass(frozen=True)
class ModelEntry:
    """One model a client can choose: ``name`` (its path relative to the models folder, A1111's ``title`` without
    the hash; ``"embedded"``), ``source`` (what :func:`~nijimi.pipelines.pipeline.load` takes) and ``model_name``
    (A1111's: the name without its ending, ``/`` as ``_``)."""

    name: str
    source: str

    @property
    def model_name(self) -> str:
        return os.path.splitext(self.name.replace("/", "_"))[0] if self.name != EMBEDDED else EMBEDDED

    def matches(self, text: str) -> bool:
        """A1111's ways of naming a checkpoint: its title (with or without `` [hash]``), name or model name."""
        text = text.strip()
        bare = text.rsplit(" [", 1)[0] if text.endswith("]") else text
        return bare in (self.name, self.model_name)


def list_models(folder: Path | None) -> list[ModelEntry]:
    """The embedded model, then the checkpoints in ``folder`` (recursively, sorted): ``.safetensors``/``.ckpt``
    files and diffusers folders (not searched inside). Entries that resolve outside ``folder`` are left out."""
    entries = [ModelEntry(EMBEDDED, EMBEDDED)]
    if folder is None or not folder.is_dir():
        return entries
    found = []
    for here, dirs, files in os.walk(folder):
        base = Path(here)
        if "model_index.json" in files and base != folder:
            found.append(base)
            dirs.clear()
            continue
        dirs.sort()
        found += [base / f for f in files if Path(f).suffix.lower() in MODEL_SUFFIXES]
    return entries + sorted((ModelEntry(p.relative_to(folder).as_posix(), str(p.resolve()))
                             for p in found if inside(folder, p)), key=lambda e: e.name)


def list_loras(folder: Path) -> list[Path]:
    """Adapter files in ``folder`` (recursively, sorted), without those that resolve outside it."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in ADAPTER_SUFFIXES and p.is_file() and inside(folder, p))


def check_lora_tags(prompt: str, folder: Path) -> None:
    """Refuse (ApiError 403) a prompt whose ``<lora:NAME:W>`` tags name a file that resolves outside ``folder``;
    names that match no file are left to the pipeline's own error."""
    for tag in parse_lora_tags(prompt)[1]:
        try:
            path = resolve_lora(tag.name, folder)
        except ConfigError:
            continue
        if not inside(folder, path):
            raise ApiError(403, "Forbidden", f"LoRA {tag.name!r} leads outside the LoRA folder")
