"""load_state_dict by content and extension, refusal of unsafe pickles, float helpers, atomic_write (and that of
concurrent creators of one name exactly one wins, in real processes)."""

import errno
import math
import os
import pickle
import stat
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SD1, in_processes, without_hanging

from nijimi.adapters.formats import read_adapter
from nijimi.errors import CheckpointError, ConfigError, NijimiError, OutputExistsError
from nijimi.io.checkpoint import load_model
from nijimi.io.controlnet import load_controlnet
from nijimi.io.detect import read_sidecar_yaml
from nijimi.io.files import atomic_write, check_output, load_state_dict, regular_file, require_finite_float
from nijimi.io.safetensors import save_file
from nijimi.io.taesd import load_taesd
from nijimi.io.vae_file import load_vae


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.diffusion_model.out.2.weight": torch.randn(4, 320, 3, 3, generator=g).half(),
        "first_stage_model.encoder.conv_in.bias": torch.randn(128, generator=g),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "model_ema.decay": torch.tensor(0.9999),
        "alphas_cumprod": torch.rand(1000, generator=g, dtype=torch.float64),
        "bf16": torch.randn(3, generator=g).bfloat16(),
    }


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


class _RunsCode:
    """Pickles to a call of os.system that would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---- reading ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt", "model.bin", "model"])
def test_safetensors_content_is_read_under_any_name(tmp_path, name):
    sd = _state_dict()
    save_file(sd, tmp_path / name, metadata={"modelspec.title": "x"})
    loaded, metadata = load_state_dict(tmp_path / name)
    _assert_same(loaded, sd)
    assert metadata == {"modelspec.title": "x"}


def test_sd_ckpt_state_dict_is_unwrapped_with_scalar_metadata(tmp_path):
    sd = _state_dict(1)
    torch.save({"epoch": 6, "global_step": 470000, "state_dict": sd}, tmp_path / "sd.ckpt")
    loaded, metadata = load_state_dict(tmp_path / "sd.ckpt")
    _assert_same(loaded, sd)
    assert metadata == {"epoch": "6", "global_step": "470000"}


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".CKPT", ""])
def test_plain_torch_state_dict(tmp_path, suffix):
    sd = _state_dict(2)
    torch.save(sd, tmp_path / f"weights{suffix}")
    loaded, metadata = load_state_dict(tmp_path / f"weights{suffix}")
    _assert_same(loaded, sd)
    assert metadata == {}


def test_original_sd_ckpt_with_lightning_callbacks_and_numpy_scalars(tmp_path, monkeypatch):
    """Original SD .ckpt files key their ``callbacks`` by the Lightning ModelCheckpoint class and hold NumPy scalars.
    Lightning is not installed: a fake module exists only while saving."""
    fake = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    fake.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": fake.__name__})
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    sd = _state_dict(3)
    callbacks = {fake.ModelCheckpoint: {"best_model_score": np.float64(0.125), "monitor": None, "k": np.int64(3)}}
    torch.save({"state_dict": sd, "callbacks": callbacks, "global_step": 470000}, tmp_path / "sd-v1-4.ckpt")
    monkeypatch.undo()
    assert "pytorch_lightning" not in sys.modules
    loaded, metadata = load_state_dict(tmp_path / "sd-v1-4.ckpt")
    _assert_same(loaded, sd)
    assert metadata == {"global_step": "470000"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ckpt_tensors_are_memory_mapped(tmp_path):
    torch.save({"w": torch.zeros(1 << 20)}, tmp_path / "w.pt")
    loaded, _ = load_state_dict(tmp_path / "w.pt")
    pointer = loaded["w"].data_ptr()
    with open("/proc/self/maps") as maps:
        spans = [line.split()[0].split("-") for line in maps if line.rstrip().endswith(str(tmp_path / "w.pt"))]
    assert any(int(lo, 16) <= pointer < int(hi, 16) for lo, hi in spans)


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.ckpt"])
def test_safetensors_data_that_looks_like_a_zip_trailer(tmp_path, name):
    """Tensor bytes may end in a zip end-of-directory record by chance; the header decides, not the trailer."""
    sd = {"w": torch.frombuffer(bytearray(b"PK\x05\x06" + bytes(18)), dtype=torch.uint8)}
    save_file(sd, tmp_path / name)
    assert zipfile.is_zipfile(tmp_path / name)
    _assert_same(load_state_dict(tmp_path / name)[0], sd)


# ---- refusing code and malformed files -------------------------------------------------------------------------------


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"evil.ckpt: refusing to unpickle.*GLOBAL (posix|nt)\.system"):
        load_state_dict(tmp_path / "evil.ckpt")
    assert not marker.exists()
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


@pytest.mark.parametrize("name", ["raw.ckpt", "raw.pt", "raw.bin", "raw.pkl"])
def test_raw_pickles_are_not_unpickled(tmp_path, name):
    marker = tmp_path / "MARKER"
    (tmp_path / name).write_bytes(pickle.dumps({"w": _RunsCode(marker)}))
    with pytest.raises(CheckpointError, match=f"{name}: is a raw pickle"):
        load_state_dict(tmp_path / name)
    assert not marker.exists()
    pickle.loads((tmp_path / name).read_bytes())  # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_pickle_under_a_safetensors_name_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"w": _RunsCode(marker)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="is a PyTorch zip checkpoint, not safetensors"):
        load_state_dict(tmp_path / "model.safetensors")
    assert not marker.exists()


def test_other_content_under_a_safetensors_name(tmp_path):
    (tmp_path / "image.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(CheckpointError, match="image.safetensors: not a valid safetensors file: header length"):
        load_state_dict(tmp_path / "image.safetensors")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nope.ckpt: no such file"):
        load_state_dict(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_state_dict(tmp_path)


def test_truncated_ckpt(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt: is a damaged or truncated zip archive"):
        load_state_dict(tmp_path / "cut.ckpt")


def test_legacy_torch_file_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="old.pt: is a raw pickle, not a PyTorch zip checkpoint"):
        load_state_dict(tmp_path / "old.pt")


def test_broken_zip_member(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.ckpt", "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    with pytest.raises(CheckpointError, match="bad.ckpt: cannot read PyTorch checkpoint"):
        load_state_dict(tmp_path / "bad.ckpt")


def test_unknown_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello world")
    with pytest.raises(CheckpointError, match=r"notes.txt: is unknown content starting b'hello wo'; expected"):
        load_state_dict(tmp_path / "notes.txt")


@pytest.mark.parametrize(
    "obj, problem",
    [
        ({"state_dict": {"w": torch.zeros(1), "step": 3}}, "entry 'step' is a int, not a tensor"),
        ({"string_to_param": {"*": torch.zeros(1)}}, "entry 'string_to_param' is a dict, not a tensor"),
        ([torch.zeros(1)], "holds a list, not a state dict"),
        ({1: torch.zeros(1)}, "key 1 is a int, not a str"),
    ],
)
def test_not_a_state_dict(tmp_path, obj, problem):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=problem):
        load_state_dict(tmp_path / "x.pt")


# ---- dtype helpers ---------------------------------------------------------------------------------------------------


def test_require_finite_float_names_file_key_and_dtype():
    require_finite_float({"a": torch.zeros(1), "b": torch.zeros(1, dtype=torch.float16)}, "x.safetensors")
    with pytest.raises(CheckpointError, match=r"x.safetensors: tensor 'ids' has dtype torch.int64, a float dtype"):
        require_finite_float({"a": torch.zeros(1), "ids": torch.arange(3)}, "x.safetensors")


# ---- atomic_write ----------------------------------------------------------------------------------------------------


def test_atomic_write_binary_and_text(tmp_path):
    with atomic_write(tmp_path / "a.bin") as f:
        f.write(b"\x00\x01")
    with atomic_write(tmp_path / "b.txt", "w") as f:
        f.write("héllo\n")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == "héllo\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt"]


def test_atomic_write_keeps_old_file_and_removes_temp_when_the_writer_raises(tmp_path):
    target = tmp_path / "image.png"
    target.write_bytes(b"old")
    with pytest.raises(ZeroDivisionError), atomic_write(target) as f:
        f.write(b"partial new content")
        1 / 0  # noqa: B018
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "new.png") as f:
        f.write(b"partial")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]


def test_atomic_write_uses_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "x") as f:
            f.write(b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o644


def test_atomic_write_errors(tmp_path):
    with pytest.raises(ConfigError, match="mode must be 'wb' or 'w', got 'a'"):
        with atomic_write(tmp_path / "x", "a"):
            pass
    with pytest.raises(NijimiError, match="cannot write .*missing/x.png"):
        with atomic_write(tmp_path / "missing" / "x.png"):
            pass
    (tmp_path / "folder").mkdir()
    with pytest.raises(NijimiError, match="cannot write .*folder"):
        with atomic_write(tmp_path / "folder") as f:
            f.write(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]



@pytest.mark.parametrize("links", [True, False], ids=["hard links", "no hard links"])
def test_of_concurrent_creators_exactly_one_wins_and_nothing_is_replaced(tmp_path, monkeypatch, links):
    def no_links(*args):
        raise OSError(errno.EPERM, "no hard links here")

    if not links:  # a file system without hard links (FAT, some network shares): the O_EXCL claim
        monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "out.bin"

    def create(i, barrier):
        with atomic_write(target, overwrite=False) as f:
            f.write(b"%d" % i * 1000)
            barrier.wait()  # every writer is past any existence check before any publishes
        return i

    results = in_processes(create, 4)
    won = [r for r in results if isinstance(r, int)]
    assert len(won) == 1 and target.read_bytes() == b"%d" % won[0] * 1000
    lost = [r for r in results if not isinstance(r, int)]
    assert all(isinstance(e, OutputExistsError) and str(e) == f"{target} exists; use --overwrite to replace it"
               for e in lost)
    assert list(tmp_path.iterdir()) == [target]  # no temp file left
    with atomic_write(target) as f:  # replacing stays possible when asked for
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_check_output_refuses_a_file_in_the_way_and_an_existing_output_and_creates_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=f"^cannot write {tmp_path}/f/a/b.png: {tmp_path}/f is a file, not a folder$"):
        check_output(tmp_path / "f" / "a" / "b.png")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output(tmp_path / "f", folder=True)
    with pytest.raises(OutputExistsError, match=f"^{tmp_path}/f exists; use --overwrite to replace it$"):
        check_output(tmp_path / "f")
    with pytest.raises(ConfigError, match="it is a folder"):
        check_output(tmp_path, overwrite=True)
    assert check_output(tmp_path / "f", overwrite=True) == tmp_path / "f"
    assert check_output(tmp_path / "new" / "deeper", folder=True) == tmp_path / "new" / "deeper"
    assert check_output(str(tmp_path / "new" / "x.png")) == tmp_path / "new" / "x.png"
    assert sorted(os.listdir(tmp_path)) == ["f"]


@pytest.mark.parametrize("bad, kind", [(float("nan"), "NaN"), (float("inf"), "infinite"), (-float("inf"), "infinite")])
def test_require_finite_float_names_the_first_bad_key(bad, kind):
    require_finite_float({"big": torch.full((4,), 3e38), "half": torch.full((3,), 65504.0).half(),
                          "empty": torch.zeros(0, 3), "f8": torch.ones(3).to(torch.float8_e4m3fn)}, "fine.pt")
    with pytest.raises(CheckpointError, match="'f8' holds NaN"):
        require_finite_float({"f8": torch.tensor([1.0, math.nan]).to(torch.float8_e4m3fn)}, "x")
    weights = {"ok": torch.ones(3, dtype=torch.float16), "w1": torch.tensor([1.0, bad]), "w2": torch.tensor([bad])}
    with pytest.raises(CheckpointError, match=f"^x.safetensors: tensor 'w1' holds {kind} values"):
        require_finite_float(weights, "x.safetensors")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_refused_before_opening(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    for call in (lambda: load_state_dict(fifo), lambda: regular_file(fifo)):
        error = without_hanging(call, fifo)
        assert isinstance(error, CheckpointError)
        assert str(error) == f"{fifo}: file is a FIFO (named pipe), not a file"
    with pytest.raises(CheckpointError, match=r"^/dev/null: model is a device, not a file$"):
        regular_file("/dev/null", "model")
    with pytest.raises(CheckpointError, match=f"^{tmp_path}: file is a folder, not a file$"):
        load_state_dict(tmp_path)
    with pytest.raises(ConfigError, match=r"gone.toml: config file not found$"):
        regular_file(tmp_path / "gone.toml", "config", ConfigError, "config file not found")
    assert regular_file(__file__) == Path(__file__)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_every_model_loader_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    loaders = {"model": load_model, "VAE": lambda p: load_vae(p, SD1.vae), "TAESD": load_taesd,
               "LoRA": lambda p: read_adapter(p, SD1), "ControlNet": load_controlnet, "yaml": read_sidecar_yaml}
    for name, load in loaders.items():
        error = without_hanging(lambda load=load: load(fifo), fifo)
        assert isinstance(error, CheckpointError), name
        assert str(error).startswith(f"{fifo}: ") and "is a FIFO (named pipe), not a file" in str(error), name
