"""Our safetensors reader/writer against the reference ``safetensors`` package: bytes, values, errors, memory."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import resident_kib

from nijimi.errors import CheckpointError
from nijimi.io.safetensors import DTYPES, TensorInfo, load_file, read_header, read_metadata, release_pages, save_file

st = pytest.importorskip("safetensors.torch")
SafetensorError = pytest.importorskip("safetensors").SafetensorError


def _random(dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random values of any dtype (bit patterns for the exotic ones, finite values for floats)."""
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    bits = torch.randint(0, 256, (*shape, dtype.itemsize), generator=generator, dtype=torch.uint8)
    return bits.view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor, so exotic dtypes (float8, uint16 …) compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _every_dtype(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3,), (2, 3), (), (0, 4), (4, 1, 2)]
    tensors = {f"t.{name.lower()}.{i}": _random(dtype, shape, g) for i, shape in enumerate(shapes)
               for name, dtype in DTYPES.items()}
    tensors["non_contiguous"] = torch.randn(5, 4, generator=g).t()
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(320, 4, 3, 3, generator=g).half()
    return tensors


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(_bits(got[name]), _bits(tensor)), name


@pytest.mark.parametrize(
    "metadata",
    [None, {}, {"format": "pt"}, {"ss_tag": 'é "quoted" \\ \n\t\x01 \u2028 猫'}],
    ids=["none", "empty", "one", "escapes"],
)
def test_bytes_identical_to_reference(tmp_path, metadata):
    tensors = _every_dtype()
    save_file(tensors, tmp_path / "ours.safetensors", metadata=metadata)
    reference = st.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == reference


@pytest.mark.parametrize("tensors", [{}, {"a": torch.zeros(0)}, {"ü/é": torch.ones(1)}], ids=["empty", "zero", "utf8"])
def test_bytes_identical_to_reference_edge_cases(tmp_path, tensors):
    save_file(tensors, tmp_path / "x.safetensors")
    assert (tmp_path / "x.safetensors").read_bytes() == st.save(tensors)


def test_reference_reads_what_we_write(tmp_path):
    tensors = _every_dtype(seed=1)
    save_file(tensors, tmp_path / "ours.safetensors", metadata={"a": "1", "b": "2", "c": "3"})
    _assert_same(st.load_file(tmp_path / "ours.safetensors"), tensors)
    with st.safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"a": "1", "b": "2", "c": "3"}


def test_we_read_what_reference_writes(tmp_path):
    tensors = _every_dtype(seed=2)
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata={"k": "v"})
    loaded = load_file(tmp_path / "ref.safetensors")
    _assert_same(loaded, tensors)
    assert list(loaded) == list(read_header(tmp_path / "ref.safetensors"))
    assert read_metadata(tmp_path / "ref.safetensors") == {"k": "v"}
    assert torch.equal(loaded["non_contiguous"], tensors["non_contiguous"])


def test_header_describes_tensors(tmp_path):
    save_file({"w": torch.zeros(2, 3, dtype=torch.float16), "b": torch.zeros(3)}, tmp_path / "x.safetensors")
    assert read_header(tmp_path / "x.safetensors") == {
        "b": TensorInfo("F32", (3,), 0, 12),
        "w": TensorInfo("F16", (2, 3), 12, 24),
    }
    assert read_header(tmp_path / "x.safetensors")["w"].torch_dtype == torch.float16
    assert read_metadata(tmp_path / "x.safetensors") == {}


def test_read_header_does_not_read_data(tmp_path):
    """A 4 GiB sparse file: the header is read, the data never is."""
    path = tmp_path / "big.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 1 << 32]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + (1 << 32))
    assert read_header(path)["w"].shape == (1 << 30,)


def _raw_file(path, header, data: bytes = b"", length: int | None = None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def test_unaligned_offsets_and_leading_whitespace_are_read(tmp_path):
    header = b'  {"a": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]},' \
             b' "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}'
    data = struct.pack("<b2f", -3, 1.5, -2.25)
    _raw_file(tmp_path / "x.safetensors", header, data)
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded["a"].tolist() == [-3] and loaded["b"].tolist() == [1.5, -2.25]
    _assert_same(st.load_file(tmp_path / "x.safetensors"), loaded)


def test_loaded_tensors_are_private_copies_on_write(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.arange(4.0)}, path)
    before = path.read_bytes()
    loaded = load_file(path)
    loaded["w"] += 1
    assert loaded["w"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert path.read_bytes() == before
    assert load_file(path)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_release_pages_takes_read_pages_out_of_resident_memory_and_keeps_the_values(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = {"a": torch.randn(2**22, generator=torch.Generator().manual_seed(0)), "b": torch.arange(1000.0)}
    save_file(tensors, path)
    loaded = load_file(path)
    assert resident_kib(path) < 1024  # mapped, not read yet
    assert torch.equal(loaded["a"], tensors["a"])  # reads all 16 MiB
    assert resident_kib(path) >= 16 * 1024
    release_pages([loaded["b"], torch.ones(3)])  # any tensor of the map releases the whole map; a copy is left alone
    assert resident_kib(path) < 1024
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
    assert resident_kib(path) >= 16 * 1024


F32_1 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
MALFORMED = {
    "empty file": (b"", None, None, "fewer than the 8-byte header length"),
    "short file": (b"\x05\x00", None, None, "fewer than the 8-byte header length"),
    "length past end": ({"a": F32_1}, b"\0" * 4, 10_000, "header length 10000 is bigger than the file"),
    "truncated data": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 9, None,
                       r"run past the end of the 9-byte data section \(truncated file\?\)"),
    "invalid json": (b'{"a": {"dtype": "F32",', b"", None, "header is not valid JSON"),
    "not utf-8": (b'{"\xff": 1}', b"", None, "header is not UTF-8"),
    "json array": (b"[]", b"", None, "header is a JSON list, not an object"),
    "unknown dtype": ({"a": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None,
                      "tensor 'a' has unknown dtype 'F17'"),
    "sub-byte dtype": ({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", None, "unknown dtype 'F4'"),
    "size mismatch": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, None,
                      r"needs 8 bytes but data_offsets \[0, 4\] hold 4"),
    "negative dim": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "invalid shape"),
    "float dim": ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4, None, "invalid shape"),
    "reversed offsets": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 4, None,
                         "needs 0 bytes"),
    "offsets outside": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 4, None,
                        "run past the end of the 4-byte data section"),
    "gap": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None,
            "leaves a gap after byte 0"),
    "overlap": ({"a": F32_1, "b": F32_1}, b"\0" * 4, None, "overlaps the previous tensor"),
    "trailing bytes": ({"a": F32_1}, b"\0" * 8, None, "4 bytes after the last tensor are not covered"),
    "missing field": ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, "needs dtype, shape and data_offsets"),
    "metadata not str": ({"__metadata__": {"a": 1}}, b"", None, "__metadata__ must map str to str"),
    "trailing nul in header": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}\0', b"\0" * 4, None,
                               "header is not valid JSON"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_raise_checkpoint_error(tmp_path, case):
    header, data, length, problem = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    if data is None:
        path.write_bytes(header)
    else:
        _raw_file(path, header, data, length)
    for read in (load_file, read_header, read_metadata):
        with pytest.raises(CheckpointError, match=problem) as info:
            read(path)
        assert str(path) in str(info.value)
    if case != "sub-byte dtype":  # the reference reads packed 4-bit floats; we have no use for them
        with pytest.raises(SafetensorError):
            st.load_file(path)


def test_duplicate_keys_are_refused(tmp_path):
    """Stricter than the reference, which keeps the last of two entries with the same name."""
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    _raw_file(tmp_path / "dup.safetensors", f'{{"a": {entry}, "a": {entry}}}'.encode(), b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"duplicate keys \['a'\]"):
        load_file(tmp_path / "dup.safetensors")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.safetensors: no such file"):
        load_file(tmp_path / "missing.safetensors")


def test_save_rejects_bad_input_and_leaves_no_file(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match="'x' is not a dense tensor: list"):
        save_file({"x": [1, 2]}, path)
    with pytest.raises(CheckpointError, match="metadata must map str to str"):
        save_file({"x": torch.zeros(1)}, path, metadata={"step": 3})
    with pytest.raises(CheckpointError, match="cannot write tensor name '__metadata__'"):
        save_file({"__metadata__": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="'s' is not a dense tensor"):
        save_file({"s": torch.eye(2).to_sparse()}, path)
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_atomically(tmp_path):
    path = tmp_path / "out.safetensors"
    save_file({"a": torch.zeros(2)}, path)
    save_file({"a": torch.ones(3)}, path)
    assert load_file(path)["a"].tolist() == [1.0, 1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


PEAK_RSS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from nijimi.io.safetensors import load_file

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    model = torch.nn.Module()
    for i in range(16):
        model.register_parameter(f"w{i}", torch.nn.Parameter(torch.empty(1 << 20, dtype=torch.float16, device="meta")))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    state = load_file(sys.argv[1])
    model.load_state_dict(state, assign=True)
    del state
    largest = max(float(p.max()) for p in model.parameters())  # touches every page, allocates nothing big
    print(status("VmHWM") - before, largest)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_memory_of_loading_into_a_model(tmp_path):
    """Loading a 32 MiB file and assigning it into a model costs at most 1.3× the file in peak RSS."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file({f"w{i}": torch.randn(1 << 20, generator=g).half() for i in range(16)}, path)
    size = os.path.getsize(path)
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(path)], capture_output=True, text=True)
    if "clear_refs" in result.stderr:
        pytest.skip("cannot reset the peak RSS here")
    assert result.returncode == 0, result.stderr
    peak, _ = result.stdout.split()
    assert int(peak) <= 1.3 * size
