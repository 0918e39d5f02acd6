"""Our own reader and writer of the safetensors format (Hugging Face's pickle-free tensor file).

Layout: an 8-byte little-endian header length ``N``; ``N`` bytes of UTF-8 JSON, an object mapping each tensor name
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional ``"__metadata__"`` object of str → str;
then the data section, where each tensor's raw little-endian bytes sit at ``begin..end`` (relative to the section).
The data section must be covered exactly: no gaps, no overlaps, nothing after the last tensor.

The reader accepts and refuses what the reference reader does (``tests/io/test_safetensors_fuzz.py`` checks this on
mutated headers: JSON as strict as serde_json's, sizes and offsets as 64-bit unsigned integers, the same overflow
rules), with one deliberate difference: a header with a key twice in one object is refused, where the reference keeps
the last entry (two readers could otherwise see two different files). It also reads ``F8_E8M0``, for which the
reference's torch binding has no dtype.

Reading maps the file copy-on-write and views each tensor in place, so loading an SD-size file costs no second copy
(a loader that assigns the tensors into a model, ``load_state_dict(sd, assign=True)``, holds the file's pages once).
Pages count in the process's resident memory once read; a loader that has read every byte to check it
(:func:`~nijimi.io.files.require_finite_float`) hands them back with :func:`release_pages`, so only the weights a
run touches (not, say, a txt2img run's VAE encoder or the unused rows of the token embedding) stay resident.
Writing is byte-identical to the reference ``safetensors`` writer: tensors ordered by dtype (widest first, the
reference's enum order) then name, header padded with spaces to a multiple of 8, compact JSON.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from nijimi.errors import CheckpointError
from nijimi.io import files  # files.atomic_write; files also imports this module to read .safetensors

MAX_HEADER_BYTES = 100_000_000
"""The reference refuses headers above 100 MB; so do we (a malformed length would otherwise allocate gigabytes)."""

DTYPES: dict[str, torch.dtype] = {
    "U64": torch.uint64,
    "I64": torch.int64,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F32": torch.float32,
    "U32": torch.uint32,
    "I32": torch.int32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "U16": torch.uint16,
    "I16": torch.int16,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype name → torch dtype, in the order the reference writes tensors (it sorts by dtype, descending)."""

_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_WRITE_RANK = {name: rank for rank, name in enumerate(DTYPES)}
_METADATA_KEY = "__metadata__"
_MAX_USIZE = 2**64 - 1
_MAPS: weakref.WeakValueDictionary[int, mmap.mmap] = weakref.WeakValueDictionary()
"""The live maps of :func:`read_open` by address, for :func:`release_pages` (an entry goes with its last tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: safetensors dtype name, shape, byte range ``start..end`` within the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class _Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file: {problem}")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate keys {duplicated}")
    return dict(pairs)


def _is_count(value: object) -> bool:
    """A JSON integer that fits the reference's ``usize`` (0 ≤ value < 2⁶⁴)."""
    return type(value) is int and 0 <= value <= _MAX_USIZE


def _byte_size(shape: list[int], dtype: str) -> int | None:
    """Bytes of a tensor, or None when the element or bit count overflows ``usize`` multiplied in the reference's
    order (dimensions left to right, then bits per element), as the reference refuses it."""
    numel = 1
    for n in shape:
        numel *= n
        if numel > _MAX_USIZE:
            return None
    bits = numel * DTYPES[dtype].itemsize * 8
    return None if bits > _MAX_USIZE else bits // 8


def _parse_entry(name: str, entry: object, path: Path) -> TensorInfo:
    """Validate one tensor entry (dtype known, shape and offsets non-negative ints, size = numel × itemsize)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _fail(path, f"entry {name!r} needs dtype, shape and data_offsets, got {entry!r:.200}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"tensor {name!r} has unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _fail(path, f"tensor {name!r} has invalid shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise _fail(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    start, end = offsets
    expected = _byte_size(shape, dtype)
    if expected is None:
        raise _fail(path, f"tensor {name!r} {dtype}{shape}: its size overflows 64 bits")
    if end - start != expected:
        raise _fail(
            path, f"tensor {name!r} {dtype}{shape} needs {expected} bytes but data_offsets {offsets} hold {end - start}"
        )
    return TensorInfo(dtype, tuple(shape), start, end)


def _check_coverage(tensors: dict[str, TensorInfo], data_size: int, path: Path) -> None:
    """The byte ranges must tile the data section exactly, as the reference requires."""
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.end > data_size:
            raise _fail(
                path, f"tensor {name!r} data_offsets [{info.start}, {info.end}] run past the end of the "
                f"{data_size}-byte data section (truncated file?)"
            )
        if info.start != position:
            kind = "overlaps the previous tensor" if info.start < position else f"leaves a gap after byte {position}"
            raise _fail(path, f"tensor {name!r} at data_offsets [{info.start}, {info.end}] {kind}")
        position = info.end
    if position != data_size:
        raise _fail(path, f"{data_size - position} bytes after the last tensor are not covered by the header")


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json_int(text: str) -> int | float:
    """An integer literal as the reference's parser reads it: ``-0`` and integers beyond 64 bits become floats
    (which no size or offset accepts)."""
    if text == "-0" or len(text) > 20:
        return float(text)
    value = int(text)
    return value if -(2**63) <= value <= _MAX_USIZE else float(value)


def _parse_json(raw: bytes, path: Path) -> dict[str, object]:
    """The header object, parsed as the reference's JSON parser does: no NaN/Infinity, no lone surrogate escapes
    (``"\\ud800"``), integers as in :func:`_json_int`; duplicate keys are refused (stricter than the reference)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant,
                            parse_int=_json_int)
        json.dumps(header, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    except UnicodeDecodeError as e:
        raise _fail(path, f"header is not UTF-8 ({e.reason} at byte {e.start})") from e
    except UnicodeEncodeError as e:
        raise _fail(path, f"header holds a lone surrogate escape ({e.object[e.start]!r})") from e
    except (ValueError, RecursionError) as e:
        raise _fail(path, f"header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise _fail(path, f"header is a JSON {type(header).__name__}, not an object")
    return header


def _parse_metadata(value: object, path: Path) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _fail(path, f"__metadata__ must map str to str, got {value!r:.200}")
    return value


def _read_header(path: str | os.PathLike, file: BinaryIO) -> _Header:
    """Read and validate the header of an open binary ``file`` (everything except the tensor bytes)."""
    path = Path(path)
    size = os.fstat(file.fileno()).st_size
    if size < 8:
        raise _fail(path, f"file has {size} bytes, fewer than the 8-byte header length")
    (length,) = struct.unpack("<Q", file.read(8))
    if length > min(size - 8, MAX_HEADER_BYTES):
        raise _fail(path, f"header length {length} is bigger than the file ({size} bytes) or the 100 MB limit")
    header = _parse_json(file.read(length), path)
    metadata = _parse_metadata(header.pop(_METADATA_KEY, None), path)
    tensors = {name: _parse_entry(name, entry, path) for name, entry in header.items()}
    _check_coverage(tensors, size - 8 - length, path)
    return _Header(tensors, metadata, 8 + length)


def open_file(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for binary reading; a missing, unreadable or special file (folder, FIFO, device: refused before
    opening, see :func:`nijimi.io.files.regular_file`) raises :class:`CheckpointError` naming it."""
    files.regular_file(path)
    try:
        return open(path, "rb")
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such file") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror}") from e


def looks_like_safetensors(file: BinaryIO) -> bool:
    """Cheap content check of a file open at its start (left there): a plausible header length followed by ``{``
    (after optional JSON white space)."""
    size = os.fstat(file.fileno()).st_size
    head = file.read(8 + 64)
    file.seek(0)
    if len(head) < 10:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= min(size - 8, MAX_HEADER_BYTES) and head[8:].lstrip(b" \t\r\n").startswith(b"{")


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Names, dtypes, shapes and byte ranges of every tensor, without reading tensor data (file order)."""
    with open_file(path) as file:
        return _read_header(path, file).tensors


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` str → str mapping ({} when absent)."""
    with open_file(path) as file:
        return _read_header(path, file).metadata


def read_open(path: str | os.PathLike, file: BinaryIO,
              device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor (file order, dtype as stored) and the metadata of the safetensors ``file`` open at its start,
    parsing its header once.

    On CPU the tensors are copy-on-write views of a private memory map of the file: pages are read on first touch
    and writing into a tensor never changes the file. A tensor whose offset is not aligned to its dtype is copied.
    """
    header = _read_header(path, file)
    mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    buffer = torch.frombuffer(mapped, dtype=torch.uint8)  # shares the map and keeps it alive
    _MAPS[buffer.data_ptr()] = mapped
    out: dict[str, torch.Tensor] = {}
    for name, info in header.tensors.items():
        start = header.data_start + info.start
        raw = buffer[start : header.data_start + info.end]
        if start % info.torch_dtype.itemsize:
            raw = raw.clone()
        try:
            out[name] = raw.view(info.torch_dtype).reshape(info.shape).to(device)
        except (RuntimeError, TypeError, ValueError) as e:  # e.g. an empty tensor with a dimension ≥ 2⁶³
            problem = str(e).splitlines()[0]
            raise _fail(path, f"tensor {name!r} of shape {list(info.shape)} cannot be made: {problem}") from None
    return out, header.metadata


def release_pages(tensors: Iterable[torch.Tensor]) -> None:
    """Take the pages of :func:`read_open`'s file maps behind ``tensors`` out of this process's resident memory (the
    whole map of each file; ``madvise(MADV_DONTNEED)``). Their bytes stay readable: the next read maps them again
    from the kernel's page cache (or the file), so only what is used afterwards comes back.

    For a loader that has just read and checked a file: a write into a mapped tensor since :func:`read_open` lives in
    a private copy of its page, which this drops (the file's bytes come back), so call it only while nothing has
    written into the tensors. Tensors that are not such views (copies, other devices), and systems without
    ``madvise`` (Windows), are left as they are.
    """
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:
        return
    for address in {t.untyped_storage().data_ptr() for t in tensors if t.device.type == "cpu"}:
        mapped = _MAPS.get(address)
        if mapped is not None:
            mapped.madvise(advice)


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, in file order, dtype as stored (see :func:`read_open`)."""
    with open_file(path) as file:
        return read_open(path, file, device)[0]


def _header_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and the space-padded JSON header, tensors already in write order."""
    header: dict[str, object] = {}
    if metadata is not None:
        header[_METADATA_KEY] = dict(sorted(metadata.items()))
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        entry = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        header[name] = entry
        offset += size
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _checked_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Validate names and tensors; return dense contiguous CPU tensors in the reference's write order."""
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == _METADATA_KEY:
            raise CheckpointError(f"{path}: cannot write tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise CheckpointError(f"{path}: value of {name!r} is not a dense tensor: {type(tensor).__name__}")
        if tensor.dtype not in _NAMES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
    order = sorted(tensors, key=lambda name: (_WRITE_RANK[_NAMES[tensors[name].dtype]], name))
    return {name: tensors[name].detach().to("cpu").contiguous() for name in order}


def save_file(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> None:
    """Write ``tensors`` (and optional str → str ``metadata``) to ``path`` atomically; an existing ``path`` is
    replaced only if ``overwrite`` (else ``OutputExistsError``, see ``files.atomic_write``).

    Output bytes equal the reference writer's for the same input (metadata keys are written sorted; the reference
    writes them in hash order, so it matches whenever there is at most one key).
    """
    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: metadata must map str to str, got {dict(metadata)!r:.200}")
    ordered = _checked_tensors(tensors, path)
    with files.atomic_write(path, overwrite=overwrite) as out:
        out.write(_header_bytes(ordered, metadata))
        for tensor in ordered.values():
            if tensor.numel():
                out.write(tensor.reshape(-1).view(torch.uint8).numpy())
