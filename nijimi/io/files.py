"""Reading a state dict from any tensor file users hold, safely, and writing any file atomically, replacing an
existing one only when asked to.

Formats, chosen by content first, then by extension:

- safetensors (``.safetensors``, or any name with a safetensors header): our own reader, no code can run;
- PyTorch zip checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``): only through
  ``torch.load(path, map_location="cpu", weights_only=True, mmap=True)``, whose restricted unpickler builds tensors
  and plain containers and refuses every other global, so a pickle that would run code is rejected before anything
  runs. Besides the defaults we allow only what original Stable Diffusion ``.ckpt`` files carry next to their
  weights: the PyTorch Lightning ``ModelCheckpoint`` class as a dictionary key (mapped to an inert stand-in) and
  NumPy scalars. Legacy (pre-zip) pickles and ``.safetensors`` names with other contents are refused.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import stat
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import numpy as np
import torch

from nijimi.errors import CheckpointError, ConfigError, NijimiError, OutputExistsError
from nijimi.io import safetensors  # safetensors.save_file also uses atomic_write from this module

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_SPECIAL_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a device"),
                  (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def regular_file(path: str | os.PathLike, what: str = "file", error: type[NijimiError] = CheckpointError,
                 missing: str = "no such file") -> Path:
    """``path`` as a :class:`Path` when it names a regular file (links followed), else ``error``:
    ``"<path>: <missing>"`` when nothing is there, ``"<path>: <what> is a folder|a FIFO (named pipe)|a device|a socket,
    not a file"`` otherwise. Only ``os.stat`` looks at the path and nothing is opened, so a FIFO cannot block: every
    reader of a user-named file calls this before opening it."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if stat.S_ISREG(mode):
        return path
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "not a regular file")
    raise error(f"{path}: {what} is {kind}, not a file")


class _LightningModelCheckpoint:
    """Inert stand-in for ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``, which original SD
    ``.ckpt`` files use as a key of their ``callbacks`` entry. Never called by nijimi; holds state only."""


_LightningModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
_LightningModelCheckpoint.__qualname__ = _LightningModelCheckpoint.__name__ = "ModelCheckpoint"


def _checkpoint_globals() -> list:
    """Globals allowed in ``.ckpt`` pickles beyond torch's defaults: the Lightning stand-in and NumPy scalars."""
    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar-from-bytes constructor, wherever this NumPy keeps it
    dtype_classes = [type(np.dtype(code)) for code in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]]
    return [
        _LightningModelCheckpoint,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtype_classes,
    ]


def _first_line_naming_global(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    naming = [line for line in lines if "GLOBAL" in line]
    return (naming or lines or ["unknown error"])[0]


def unpickle_weights(path: Path) -> object:
    """The object saved in a PyTorch zip file, through torch's weights-only unpickler (tensors, containers, numbers,
    strings; no code runs); anything else, or an unreadable file, raises ``CheckpointError`` naming the file."""
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to unpickle, the file asks for more than tensors ({_first_line_naming_global(str(e))})"
        ) from e
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint: {_first_line_naming_global(str(e))}") from e


def _load_torch(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A PyTorch zip checkpoint through the weights-only unpickler; unwraps a top-level ``state_dict``."""
    obj = unpickle_weights(path)
    metadata: dict[str, str] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        metadata = {k: str(v) for k, v in obj.items() if isinstance(k, str) and isinstance(v, int | float | str)}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: key {key!r} is a {type(key).__name__}, not a str")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(obj), metadata


_KINDS = {
    "zip": "a PyTorch zip checkpoint",
    "damaged zip": "a damaged or truncated zip archive",
    "pickle": "a raw pickle",
}


def _kind(head: bytes, file: IO) -> str:
    """What a non-safetensors file holds by its first bytes: zip, damaged zip, pickle or unknown."""
    if head.startswith(b"PK\x03\x04"):
        return "zip" if zipfile.is_zipfile(file) else "damaged zip"
    return "pickle" if head[:1] == b"\x80" else "unknown"


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` file or a PyTorch zip checkpoint (``.ckpt .pt .pth .bin``).

    A safetensors file is opened and its header parsed once, its tensors memory-mapped. Tensors keep their stored
    dtype. Metadata is the safetensors ``__metadata__``; for a ``.ckpt`` with a ``state_dict`` entry, its other scalar
    entries (``global_step`` …) as strings. Every missing, special (:func:`regular_file`), unreadable, malformed or
    unsafe file raises ``CheckpointError`` naming the file and the problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    with safetensors.open_file(path) as file:
        head = file.read(8)
        file.seek(0)
        kind = "safetensors" if safetensors.looks_like_safetensors(file) else _kind(head, file)
        if kind == "zip" and suffix == ".safetensors":
            raise CheckpointError(f"{path}: is {_KINDS[kind]}, not safetensors; a .safetensors name must not hold "
                                  "a pickle (rename it to .ckpt if you trust it)")
        if kind == "safetensors" or suffix == ".safetensors":
            file.seek(0)
            return safetensors.read_open(path, file)
    if kind == "zip":
        return _load_torch(path)
    described = _KINDS.get(kind, f"unknown content starting {head!r}")
    if suffix in TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: is {described}, not a PyTorch zip checkpoint; legacy and raw pickles "
                              "are not loaded (unpickling them could run code)")
    raise CheckpointError(f"{path}: is {described}; expected a .safetensors file or a PyTorch zip checkpoint "
                          f"({' '.join(TORCH_SUFFIXES)})")


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite, in one reduction that allocates nothing: ``aminmax`` propagates NaN and keeps
    ±inf (0.4–1 G elements/s on one core); dtypes without it (float8) are widened to float32 first."""
    if not tensor.numel():
        return True
    try:
        low, high = torch.aminmax(tensor)
    except (RuntimeError, NotImplementedError):
        low, high = torch.aminmax(tensor.float())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def require_finite_float(state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise ``CheckpointError`` naming ``source`` and the first key whose tensor is not floating point, or holds a
    NaN or an infinity (one reduction per tensor, :func:`_finite`: weights that would only show as a NaN image
    later)."""
    for key, value in state_dict.items():
        if not value.is_floating_point():
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {value.dtype}, a float dtype is required")
        if not _finite(value):
            bad = "NaN" if bool(torch.isnan(value).any()) else "infinite"
            raise CheckpointError(f"{source}: tensor {key!r} holds {bad} values; the file is damaged")


def _create_temp(path: Path) -> tuple[Path, int]:
    """Create a fresh hidden temp file next to ``path`` (mode 0o666 less the umask, like ``open``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
        try:
            return temp, os.open(temp, flags, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise NijimiError(f"cannot write {path}: {e.strerror}") from e


def _fsync_directory(folder: Path) -> None:
    """Make a rename durable (POSIX). Best effort: some file systems refuse to fsync a directory."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create_from(temp: Path, path: Path) -> None:
    """Move ``temp`` to ``path`` unless ``path`` exists (``FileExistsError``), even if another process creates it
    meanwhile: a hard link fails on an existing name, and where the file system has no hard links the name is claimed
    with ``O_CREAT | O_EXCL`` before ``temp`` is renamed onto the claim."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network shares)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(temp, path)
        return
    temp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", overwrite: bool = True) -> Iterator[IO]:
    """Write ``path`` all or nothing: yields a file (``"wb"`` binary, ``"w"`` UTF-8 text) on a temp file in the same
    folder, then fsyncs it and renames it over ``path``; with ``overwrite=False`` it never replaces a file, not even
    one another process creates meanwhile (of two writers exactly one wins), and raises ``OutputExistsError``.

    If the block raises, the temp file is removed, ``path`` is untouched and the exception propagates unchanged.
    File-system failures of creating, syncing or renaming raise ``NijimiError`` naming ``path``.
    """
    if mode not in ("wb", "w"):
        raise ConfigError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    temp, fd = _create_temp(path)
    file = os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8", "newline": "\n"}))
    try:
        yield file
    except BaseException:
        file.close()
        temp.unlink(missing_ok=True)
        raise
    try:
        file.flush()
        os.fsync(file.fileno())
        file.close()
        (os.replace if overwrite else _create_from)(temp, path)
    except OSError as e:
        file.close()
        temp.unlink(missing_ok=True)
        if isinstance(e, FileExistsError):
            raise OutputExistsError(f"{path} exists; use --overwrite to replace it") from None
        raise NijimiError(f"cannot write {path}: {e.strerror or e}") from e
    _fsync_directory(path.parent)


def check_output(path: str | os.PathLike, overwrite: bool = False, folder: bool = False) -> Path:
    """Refuse, before any work, an output that could not or must not be written: a file where a folder of the path
    should be (``ConfigError`` naming it), a folder where the file should be, or (a file, unless ``overwrite``) an
    existing one (``OutputExistsError``). ``folder``: ``path`` is an output folder, which may exist. Returns
    ``path`` as a Path; creates nothing (the writer still refuses a name taken meanwhile, see :func:`atomic_write`)."""
    path = Path(path)
    above = path if folder else path.parent
    for parent in (above, *above.parents):
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise ConfigError(f"cannot write {path}: {parent} is a file, not a folder")
            break
    if not folder and os.path.lexists(path):
        if path.is_dir():
            raise ConfigError(f"cannot write {path}: it is a folder")
        if not overwrite:
            raise OutputExistsError(f"{path} exists; use --overwrite to replace it")
    return path
