"""Differential fuzzing of our safetensors reader against the reference ``safetensors`` package.

Small valid files are mutated with a seeded RNG (length prefix, JSON syntax and literals, dtypes, shapes, offsets
overlapping / out of range / non-contiguous, huge numbers, duplicate keys, lone surrogates, ``__metadata__`` types,
missing and extra fields, header padding, trailing and missing bytes). For every case both readers must accept or
both refuse, an accepted file must give equal tensors (names, dtypes, shapes, bytes) and equal metadata, and our
reader may refuse only with ``CheckpointError``.

Deliberate differences (see ``nijimi/io/safetensors.py``): a header with a key twice in one object is refused by
nijimi, where the reference keeps the last entry (such cases are checked to be refused by nijimi only); ``F8_E8M0``
(torch.float8_e8m0fnu) is read by nijimi, while the reference's torch binding (0.8) has no dtype for it (kept out of
the cases).
"""

import json
import random
import struct

import pytest
import torch

from nijimi.errors import CheckpointError
from nijimi.io import safetensors as ours

st = pytest.importorskip("safetensors.torch")
safe_open = pytest.importorskip("safetensors").safe_open

_DTYPES = [name for name in ours.DTYPES if name != "F8_E8M0"]
_JUNK = ["F128", "f32", "", None, 1, ["F32"], "F8_E8M0X", "BOOL "]
_NUMBERS = [0, 1, 2, 3, 7, -1, -8, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, 1.0, 0.5, "2", None, True, []]


def _base(rng: random.Random) -> tuple[dict, bytes]:
    """A valid file as (header dict, data bytes): 1–4 tensors of random dtypes and small shapes, maybe metadata."""
    tensors = {}
    for i in range(rng.randint(1, 4)):
        dtype = ours.DTYPES[rng.choice(_DTYPES)]
        shape = [rng.choice([0, 1, 2, 3]) for _ in range(rng.randint(0, 3))]
        raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * dtype.itemsize,), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        tensors[f"t{i}.{rng.choice(['w', 'bias', 'é', 'a.b'])}"] = raw[: torch.Size(shape).numel() * dtype.itemsize] \
            .view(dtype).reshape(shape)
    metadata = rng.choice([None, {}, {"format": "pt"}, {"k": "v", "é": "\u2028"}])
    blob = st.save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def _names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _entry(rng: random.Random, header: dict) -> dict | None:
    names = [n for n in _names(header) if isinstance(header[n], dict)]
    return header[rng.choice(names)] if names else None


def _mutate_dtype(rng, header, data):
    entry = _entry(rng, header)
    if entry is not None:
        entry["dtype"] = rng.choice(_DTYPES + _JUNK)


def _mutate_shape(rng, header, data):
    entry = _entry(rng, header)
    if entry is None or not isinstance(entry.get("shape"), list):
        return
    shape, op = entry["shape"], rng.randrange(5)
    if op == 0:
        shape.append(rng.choice(_NUMBERS))
    elif op == 1 and shape:
        shape.pop(rng.randrange(len(shape)))
    elif op == 2 and shape:
        shape[rng.randrange(len(shape))] = rng.choice(_NUMBERS)
    elif op == 3:
        entry["shape"] = rng.choice([None, 3, "3", {}, [[2]], [2**40, 2**40, 0], [0, 2**70], [2**62, 4, 0]])
    else:
        entry["shape"] = shape[::-1]


def _mutate_offsets(rng, header, data):
    entry = _entry(rng, header)
    if entry is None:
        return
    others = [header[n].get("data_offsets") for n in _names(header) if isinstance(header[n], dict)]
    op = rng.randrange(5)
    offsets = entry.get("data_offsets")
    if op == 0 and isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets):
        k = rng.choice([-2, -1, 1, 2, 8])
        entry["data_offsets"] = [entry["data_offsets"][0] + k, entry["data_offsets"][1] + k]
    elif op == 1:
        entry["data_offsets"] = [rng.randint(-2, len(data) + 2), rng.randint(-2, len(data) + 2)]
    elif op == 2:
        entry["data_offsets"] = rng.choice(others)
    elif op == 3:
        entry["data_offsets"] = rng.choice([[0], [0, 0, 0], "0,4", None, [0, 2**64], [2**64, 2**64], [0.0, 4]])
    else:
        entry["data_offsets"] = [rng.choice(_NUMBERS), rng.choice(_NUMBERS)]


def _mutate_metadata(rng, header, data):
    header["__metadata__"] = rng.choice([{}, None, {"a": 1}, {"a": None}, [], "x", {"a": {"b": "c"}}, {"a": ["b"]},
                                         {"k": "v" * 1000}, {"": ""}, {"a": "\ud800"}, 0])


def _mutate_entry(rng, header, data):
    names = _names(header)
    if not names:
        return
    name, op = rng.choice(names), rng.randrange(5)
    if op == 0 and isinstance(header[name], dict):
        header[name].pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
    elif op == 1 and isinstance(header[name], dict):
        header[name][rng.choice(["extra", "dtype2", "offsets"])] = rng.choice(_NUMBERS + _JUNK)
    elif op == 2:
        header[name] = rng.choice([None, 1, "x", [], [1, 2]])
    elif op == 3:
        header[rng.choice(["", "\ud800", "x" * 300, "__metadata__ ", name + "2"])] = header.pop(name)
    else:
        header.pop(name)


def _serialize(rng: random.Random, header: dict) -> str:
    """JSON text of ``header``: compact or spaced, and sometimes a tensor entry written twice (a duplicate key)."""
    text = json.dumps(header, ensure_ascii=rng.random() < 0.5, separators=rng.choice([(",", ":"), (", ", ": ")]))
    names = _names(header)
    if names and rng.random() < 0.1:
        name = rng.choice(names)
        twin = json.dumps({name: rng.choice([header[name], {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}])})
        text = "{" + twin[1:-1] + ("," if len(header) else "") + text[1:]
    return text


def _mutate_text(rng: random.Random, text: str) -> str:
    op, i = rng.randrange(6), rng.randrange(len(text) + 1)
    if op == 0:
        return text[:i] + rng.choice('{}[]",:0 \\\t\nx\x00é') + text[i:]
    if op == 1:
        return text[:i] + text[i + 1 :]
    if op == 2:
        return text[:i]
    if op == 3:
        return text.replace(rng.choice(["0", "1", "2", "3", "4"]), rng.choice(["NaN", "Infinity", "1e400", "-0",
                                                                                "1.0", "01", "1e2"]), 1)
    if op == 4:
        return rng.choice([" ", "\t", "\n", "\r", "\ufeff", ""]) + text + rng.choice([" ", "  \n", "\x00", "x", "}"])
    return text.replace('"', "'", 1)


def _mutate_bytes(rng: random.Random, header_bytes: bytes, data: bytes) -> bytes:
    length, op = len(header_bytes), rng.randrange(5)
    if op == 0:
        length = rng.choice([0, 1, length - 1, length + 1, length + 8, 2**32, 2**63, 2**64 - 1, 100_000_001])
    elif op == 1:
        data = data + bytes(rng.randrange(1, 9))
    elif op == 2 and data:
        data = data[: rng.randrange(len(data))]
    elif op == 3:
        header_bytes += rng.choice([b" ", b"   ", b"\x00", b"\xff"])
        length = len(header_bytes)
    else:
        header_bytes = header_bytes[: rng.randrange(length + 1)]
    blob = struct.pack("<Q", length) + header_bytes + data
    return blob[: rng.randrange(8)] if rng.random() < 0.02 else blob


_STRUCTURED = [_mutate_dtype, _mutate_shape, _mutate_offsets, _mutate_metadata, _mutate_entry]


def make_case(seed: int) -> bytes:
    """One mutated file: 1–3 structured mutations, then sometimes a text and a byte-level one."""
    rng = random.Random(seed)
    header, data = _base(rng)
    for _ in range(rng.randint(0, 3)):
        rng.choice(_STRUCTURED)(rng, header, data)
    text = _serialize(rng, header)
    if rng.random() < 0.3:
        text = _mutate_text(rng, text)
    header_bytes = text.encode("utf-8", "surrogatepass")
    header_bytes += b" " * (-len(header_bytes) % 8)
    if rng.random() < 0.3:
        return _mutate_bytes(rng, header_bytes, data)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def _has_duplicate_keys(blob: bytes) -> bool:
    """Whether the header parses as JSON with a key twice in one object (nijimi refuses those, the reference keeps
    the last entry: the one deliberate difference the cases contain)."""
    def pairs(items: list) -> dict:
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise KeyError("duplicate")
        return dict(items)
    try:
        (length,) = struct.unpack("<Q", blob[:8])
        json.loads(blob[8 : 8 + length].decode("utf-8"), object_pairs_hook=pairs)
    except KeyError:
        return True
    except (ValueError, struct.error, RecursionError):
        return False
    return False


def _reference(path) -> tuple[dict, dict] | None:
    try:
        tensors = st.load_file(path)
        with safe_open(path, "pt") as f:
            return tensors, f.metadata() or {}
    except Exception:  # noqa: BLE001 - any refusal of the reference counts as a refusal
        return None


def _ours(path) -> tuple[dict, dict] | None:
    try:
        with ours.open_file(path) as file:
            return ours.read_open(path, file)
    except CheckpointError:
        return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def check_cases(tmp_path, seeds: range) -> dict[str, int]:
    """Run the cases of ``seeds``; return how many both accepted and both refused (asserting agreement)."""
    counts = {"accepted": 0, "refused": 0}
    path = tmp_path / "case.safetensors"
    for seed in seeds:
        blob = make_case(seed)
        path.write_bytes(blob)
        expected, got = _reference(path), _ours(path)
        if _has_duplicate_keys(blob):
            assert got is None, f"seed {seed}: nijimi accepts duplicate keys"
            counts["refused"] += 1
            continue
        assert (expected is None) == (got is None), (
            f"seed {seed}: reference {'refuses' if expected is None else 'accepts'}, nijimi "
            f"{'refuses' if got is None else 'accepts'}: {path.read_bytes()[:300]!r}")
        if expected is None:
            counts["refused"] += 1
            continue
        counts["accepted"] += 1
        (ref_tensors, ref_meta), (our_tensors, our_meta) = expected, got
        assert our_meta == ref_meta, f"seed {seed}"
        assert set(our_tensors) == set(ref_tensors), f"seed {seed}"
        for name, tensor in ref_tensors.items():
            assert our_tensors[name].dtype == tensor.dtype and our_tensors[name].shape == tensor.shape, (seed, name)
            assert torch.equal(_bits(our_tensors[name]), _bits(tensor)), (seed, name)
    return counts


def test_fuzz_agrees_with_reference(tmp_path) -> None:
    counts = check_cases(tmp_path, range(1000))
    assert counts["accepted"] >= 100 and counts["refused"] >= 300, counts  # the cases exercise both outcomes


@pytest.mark.slow
def test_fuzz_agrees_with_reference_slow(tmp_path) -> None:
    counts = check_cases(tmp_path, range(1000, 21000))
    assert counts["accepted"] >= 2000 and counts["refused"] >= 6000, counts
