"""The folders a server may read and write, and the only ways a client's text becomes a path in them.

A client never names a path: it names a model, LoRA or ControlNet from a listing (:func:`list_models`,
:func:`list_loras`, :func:`list_controlnets`), or a file relative to a served folder (:func:`served_file`). Either way
the resolved path (symlinks followed) must lie inside the folder's resolved path, so ``../``, absolute paths and
symlinks that point out are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nijimi.adapters.tags import ADAPTER_SUFFIXES, parse_lora_tags, resolve_lora
from nijimi.embedded import ADAPTERS, CONTROLNET, CONTROLNET_NAME, EMBEDDED
from nijimi.errors import ConfigError
from nijimi.io.find import legacy_model_hash
from nijimi.server.errors import ApiError

MODEL_SUFFIXES = (".safetensors", ".ckpt")
"""Single-file checkpoints listed in a models folder (A1111's); diffusers folders (``model_index.json``) too."""
CONTROLNET_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
"""ControlNet files listed in a ControlNet folder (the sd-webui-controlnet extension's)."""


@dataclass(frozen=True)
class Folders:
    """``models``: where ``sd-models`` lists checkpoints (None: only the embedded model and ``--model``);
    ``loras``: the LoRA folder (default: the embedded model's demo adapters); ``output``: where saved images go;
    ``controlnets``: the ControlNet folder (None: only the embedded model's ControlNet, while that model is
    resident)."""

    models: Path | None = None
    loras: Path = ADAPTERS
    output: Path = Path("outputs")
    controlnets: Path | None = None


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
    return _files(folder, ADAPTER_SUFFIXES)


def _files(folder: Path | None, suffixes: tuple[str, ...]) -> list[Path]:
    """Files of ``folder`` (recursively, sorted) whose names end in ``suffixes``, without those that resolve outside
    it."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file() and inside(folder, p))


@dataclass(frozen=True)
class ControlNetEntry:
    """One ControlNet a client can choose: ``name`` (the file's stem, as the sd-webui-controlnet extension names
    it) and ``path``; :attr:`title` is the extension's ``name [hash]``."""

    name: str
    path: Path

    @property
    def title(self) -> str:
        """``name [hash]``: A1111's legacy short hash (:func:`~nijimi.io.find.legacy_model_hash`), as the
        extension lists its models."""
        return f"{self.name} [{legacy_model_hash(self.path)}]"

    def matches(self, text: str) -> bool:
        """The extension's ways of naming a model: its title or its name, in any case (a hash is not checked)."""
        text = text.strip()
        bare = text.rsplit(" [", 1)[0] if text.endswith("]") else text
        names = (self.name, EMBEDDED) if self.path == CONTROLNET else (self.name,)
        return bare.lower() in (n.lower() for n in names)


def list_controlnets(folder: Path | None, embedded: bool) -> list[ControlNetEntry]:
    """The embedded model's ControlNet (when ``embedded``: that model is resident) as
    :data:`~nijimi.embedded.CONTROLNET_NAME`,
    then the ControlNet files in ``folder`` (recursively, sorted, without those that resolve outside it); of two
    files with one name, the first."""
    entries = [ControlNetEntry(CONTROLNET_NAME, CONTROLNET)] if embedded and CONTROLNET.is_file() else []
    for path in _files(folder, CONTROLNET_SUFFIXES):
        if not any(e.matches(path.stem) for e in entries):
            entries.append(ControlNetEntry(path.stem, path.resolve()))
    return entries


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
