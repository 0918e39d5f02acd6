"""Whole-model checkpoints: diffusers folders both ways, convert round trips, prediction-type sources, malformed
files, memory (nijimi/io/checkpoint.py, nijimi/io/diffusers_folder.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from helpers import SD1, SD2, in_processes, output_errors, perturb, random_model, resident_kib
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from nijimi.errors import CheckpointError, ConfigError, OutputExistsError
from nijimi.io.checkpoint import convert, load_model, save_diffusers, save_single
from nijimi.io.diffusers_folder import atomic_folder, tokenizer_files
from nijimi.models.ldm import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, LatentDiffusion, ModelConfig
from nijimi.models.text_encoder import TextEncoderConfig
from nijimi.models.unet import UNetConfig
from nijimi.models.vae import VAEConfig

TOLERANCE = 1e-4
# No "!": a transformers CLIPTokenizer whose pad token is "!" (SD 2.x folders, real ones too) splits every "!" off as
# the special pad token, while SD 2.x was trained with OpenCLIP's tokenizer, which (like nijimi) merges "!!" by BPE.
PROMPTS = ["a red cube on a blue sphere", "", "Café au lait, 2 cats & 3 dogs?"]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ---- the model bundle (nijimi/models/ldm.py; tests/models/test_ldm.py would clash with tests/train/test_ldm.py) --

def test_top_level_prefixes_are_the_model_tree() -> None:
    with torch.device("meta"):
        model = LatentDiffusion(ModelConfig.tiny())
    parts = {UNET_PREFIX: model.unet, VAE_PREFIX: model.vae, TEXT_PREFIX: model.text_encoder}
    assert all(model.get_submodule(prefix.removesuffix(".")) is part for prefix, part in parts.items())


@pytest.mark.parametrize("name", ["sd15", "sd15_inpaint", "sd15_pix2pix", "sd21", "sd21_v", "tiny"])
def test_model_config_json_round_trip(name: str) -> None:
    config = ModelConfig.preset(name)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.scaling_factor == 0.18215
    assert config.prediction_type == ("v_prediction" if name == "sd21_v" else "epsilon")
    assert config.pad_token_id == (0 if name.startswith("sd21") else 49407)
    assert ModelConfig.from_dict(json.loads(json.dumps(SD2.to_dict()))) == SD2


def test_model_config_errors() -> None:
    with pytest.raises(ConfigError, match="context_dim 64 does not match the text encoder width 128"):
        dataclasses.replace(SD1, text=SD2.text)
    with pytest.raises(ConfigError, match="family"):
        dataclasses.replace(SD1, family="sdxl")
    with pytest.raises(ConfigError, match=r"unknown keys \['extra'\]"):
        ModelConfig.from_dict({**SD1.to_dict(), "extra": 1})
    with pytest.raises(ConfigError, match="sample"):
        SD1.with_prediction_type("sample")
    for bad in (-1.0, 101.0, "7", True):
        with pytest.raises(ConfigError, match=rf"ModelConfig.guidance {bad!r} must be a number within \[0, 100"):
            dataclasses.replace(SD1, guidance=bad)


def test_model_config_guidance_is_stored_and_defaults_to_7() -> None:
    """A model may name the guidance scale it samples best at; files written before it was stored load with 7."""
    assert SD1.guidance == 7.0
    mine = dataclasses.replace(SD1, guidance=3.5)
    assert ModelConfig.from_dict(json.loads(json.dumps(mine.to_dict()))) == mine
    older = {k: v for k, v in mine.to_dict().items() if k != "guidance"}
    assert ModelConfig.from_dict(older) == SD1
    with pytest.raises(ConfigError, match="must be float"):
        ModelConfig.from_dict({**SD1.to_dict(), "guidance": "high"})


def test_latent_diffusion_key_tree_and_set_config() -> None:
    with torch.device("meta"):
        model = LatentDiffusion(ModelConfig.sd15())
    roots = {k.split(".")[0] + "." + k.split(".")[1] for k in model.state_dict()}
    assert roots == {"model.diffusion_model", "first_stage_model.encoder", "first_stage_model.decoder",
                     "first_stage_model.quant_conv", "first_stage_model.post_quant_conv",
                     "cond_stage_model.transformer"}
    assert model.unet is model.model.diffusion_model and model.text_encoder is model.cond_stage_model.transformer
    model.set_config(ModelConfig.sd15().with_prediction_type("v_prediction"))
    assert model.config.prediction_type == "v_prediction"
    with pytest.raises(ConfigError, match="architecture"):
        model.set_config(ModelConfig.sd15_inpaint())
    assert torch.equal(ModelConfig.sd21().tokenizer()("a")[0, :4], torch.tensor([49406, 320, 49407, 0]))


# ---- diffusers folders written by diffusers ----------------------------------------------------------------------

def diffusers_pipeline(tmp_path, sd2: bool, prediction_type: str) -> StableDiffusionPipeline:
    """A small random StableDiffusionPipeline assembled from diffusers/transformers components."""
    torch.manual_seed(0)
    attention = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, down_block_types=attention,
        up_block_types=["CrossAttnUpBlock2D"] * 2, cross_attention_dim=128 if sd2 else 64,
        attention_head_dim=[1, 2] if sd2 else 8, use_linear_projection=sd2, upcast_attention=sd2)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4)
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=128 if sd2 else 64, intermediate_size=256 if sd2 else 128, num_hidden_layers=2,
        num_attention_heads=2, hidden_act="gelu" if sd2 else "quick_gelu", vocab_size=49408,
        max_position_embeddings=77))
    for i, module in enumerate((unet, vae, text)):
        perturb(module, 10 + i)
    folder = tmp_path / "tokenizer_src"
    folder.mkdir()
    for name, content in tokenizer_files(0 if sd2 else 49407, 77).items():
        (folder / name).write_text(content, encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!" if sd2 else
                              "<|endoftext|>")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize(("sd2", "prediction_type"), [(False, "epsilon"), (True, "v_prediction")], ids=["sd1", "sd2"])
def test_folder_written_by_diffusers(tmp_path, sd2: bool, prediction_type: str) -> None:
    pipe = diffusers_pipeline(tmp_path, sd2, prediction_type)
    pipe.save_pretrained(tmp_path / "pipe")
    model, report = load_model(tmp_path / "pipe")
    cfg = model.config
    assert (report.layout, report.config_source, report.prediction_source) == ("diffusers", "diffusers", "scheduler")
    assert cfg.family == ("sd2" if sd2 else "sd1") and cfg.prediction_type == prediction_type
    assert cfg.pad_token_id == (0 if sd2 else 49407)
    assert cfg.schedule.steps_offset == 1 and cfg.schedule.beta_schedule == "scaled_linear"
    errors = output_errors(model, pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval())
    assert max(errors.values()) <= TOLERANCE, errors


def test_folder_fp16_variant_and_bin(tmp_path) -> None:
    pipe = diffusers_pipeline(tmp_path, sd2=False, prediction_type="epsilon")
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").is_file()
    model, report = load_model(tmp_path / "bin")
    assert report.stored_dtypes == ("float32",)
    reference = {"unet": pipe.unet, "vae": pipe.vae, "text": pipe.text_encoder}
    pipe.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    half, report = load_model(tmp_path / "fp16")
    assert report.stored_dtypes == ("float16",)
    assert all(p.dtype == torch.float32 for p in half.parameters())
    for (name, a), b in zip(model.state_dict().items(), half.state_dict().values(), strict=True):
        assert torch.equal(a.half().float(), b), name
    pipe.to(torch.float32)
    errors = output_errors(half, reference["unet"].eval(), reference["vae"].eval(), reference["text"].eval())
    assert max(errors.values()) <= TOLERANCE, errors


# ---- folders written by nijimi, read by diffusers ----------------------------------------------------------------

@pytest.mark.parametrize("config", [SD1, SD2], ids=["sd1", "sd2"])
def test_saved_folder_loads_in_diffusers(tmp_path, config: ModelConfig) -> None:
    model = random_model(config.with_prediction_type("v_prediction"), seed=1)
    save_diffusers(model, tmp_path / "out")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out", safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    errors = output_errors(model, pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval())
    assert max(errors.values()) <= TOLERANCE, errors
    assert pipe.tokenizer.pad_token_id == config.pad_token_id
    ours = config.tokenizer()(PROMPTS)
    theirs = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours, theirs.input_ids)


@pytest.mark.parametrize("config", [SD1, SD2], ids=["sd1", "sd2"])
def test_round_trip_single_diffusers_single_is_bit_exact(tmp_path, config: ModelConfig) -> None:
    config = dataclasses.replace(config, guidance=4.0)  # the guidance a model names survives both layouts too
    save_single(random_model(config, seed=2), tmp_path / "a.safetensors")
    convert(tmp_path / "a.safetensors", tmp_path / "folder")
    report = convert(tmp_path / "folder", tmp_path / "b.safetensors")
    assert report.layout == "diffusers" and report.config == config
    a, b = (safetensors.torch.load_file(tmp_path / n) for n in ("a.safetensors", "b.safetensors"))
    assert same_tensors(a, b)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    convert(tmp_path / "b.safetensors", tmp_path / "half", half=True)
    convert(tmp_path / "half", tmp_path / "c.safetensors", to="single")
    c = safetensors.torch.load_file(tmp_path / "c.safetensors")
    assert same_tensors({k: v.half() for k, v in a.items()}, c)


def test_save_diffusers_replaces_only_diffusers_folders(tmp_path) -> None:
    model = random_model(SD1, seed=0)
    save_diffusers(model, tmp_path / "out")
    save_diffusers(model, tmp_path / "out")  # replacing our own folder is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left behind
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_diffusers(model, tmp_path / "keep")
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match=".safetensors"):
        save_single(model, tmp_path / "model.ckpt")


def test_convert_never_replaces_an_output_unless_asked(tmp_path) -> None:
    src, existing, empty = tmp_path / "a.safetensors", tmp_path / "existing.safetensors", tmp_path / "empty"
    save_single(random_model(SD1, seed=0), src)
    existing.write_bytes(b"keep")
    empty.mkdir()
    for dst in (existing, empty):
        with pytest.raises(OutputExistsError, match=f"^{dst} exists; use --overwrite to replace it$"):
            convert(src, dst)
    assert existing.read_bytes() == b"keep" and not any(empty.iterdir())
    convert(src, existing, overwrite=True)
    convert(src, empty, overwrite=True)
    assert existing.read_bytes() == src.read_bytes() and (empty / "model_index.json").is_file()


def test_of_concurrent_folder_creators_exactly_one_wins(tmp_path) -> None:
    target = tmp_path / "out"

    def create(i, barrier):
        barrier.wait()  # all race to claim the name
        with atomic_folder(target, "marker", overwrite=False) as temp:
            (temp / "marker").write_text(str(i))
        return i

    results = in_processes(create, 4)
    won = [r for r in results if isinstance(r, int)]
    assert len(won) == 1 and (target / "marker").read_text() == str(won[0])
    assert all(isinstance(r, OutputExistsError) for r in results if not isinstance(r, int))
    assert list(tmp_path.iterdir()) == [target]  # no temp folders left


def test_a_folder_claimed_and_written_into_meanwhile_is_left_as_it_is(tmp_path) -> None:
    target = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="another process wrote into it meanwhile"):
        with atomic_folder(target, "marker", overwrite=False) as temp:
            (temp / "marker").write_text("ours")
            (target / "00000-1.png").write_bytes(b"theirs")  # a writer that took the claimed folder as its own
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and os.listdir(target) == ["00000-1.png"]


def test_a_load_opens_the_file_and_parses_its_header_once(tmp_path, monkeypatch) -> None:
    import builtins

    from nijimi.io import safetensors as ours

    path = tmp_path / "model.safetensors"
    save_single(random_model(SD1, seed=0), path)
    opens, parses = [], []
    real_open, real_parse = builtins.open, ours._read_header
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: opens.append(file) or real_open(file, *a, **k))
    monkeypatch.setattr(ours, "_read_header", lambda *a: parses.append(a[0]) or real_parse(*a))
    load_model(path)
    assert [os.fspath(f) for f in opens if os.fspath(f) == os.fspath(path)] == [os.fspath(path)]
    assert len(parses) == 1


# ---- prediction type: probe, side-car yaml, override -------------------------------------------------------------

@pytest.fixture(scope="module")
def sd2_files(tmp_path_factory):
    """Two SD2-layout files without nijimi metadata: a random U-Net (probe: ε) and one whose output is forced to −3
    by its output convolution (probe: mean(out − x) = −3.5 < −1, v)."""
    folder = tmp_path_factory.mktemp("sd2")
    model = random_model(SD2, seed=4)
    paths = {}
    for name, bias in (("eps", None), ("v", -3.0)):
        if bias is not None:
            with torch.no_grad():
                model.unet.conv_out.weight.zero_()
                model.unet.conv_out.bias.fill_(bias)
        save_single(model, folder / f"{name}.safetensors")
        ckpt = safetensors.torch.load_file(folder / f"{name}.safetensors")
        paths[name] = folder / name / "model.safetensors"
        paths[name].parent.mkdir()
        safetensors.torch.save_file(ckpt, paths[name])
    return paths


def test_probe_detects_v_prediction(sd2_files) -> None:
    model, report = load_model(sd2_files["v"])
    assert (report.prediction_source, model.config.prediction_type) == ("probe", "v_prediction")
    assert model.config == SD2.with_prediction_type("v_prediction")
    model, report = load_model(sd2_files["eps"])
    assert (report.prediction_source, model.config.prediction_type) == ("probe", "epsilon")


def test_sidecar_yaml_wins_over_probe(sd2_files) -> None:
    for name, value, expected in (("v", "eps", "epsilon"), ("eps", "v", "v_prediction")):
        sidecar = sd2_files[name].with_suffix(".yaml")
        sidecar.write_text(f'model:\n  params:\n    parameterization: "{value}"\n')
        try:
            model, report = load_model(sd2_files[name])
        finally:
            sidecar.unlink()
        assert (report.prediction_source, model.config.prediction_type) == ("yaml", expected)


def test_config_override(sd2_files, tmp_path) -> None:
    model, report = load_model(sd2_files["eps"], config=SD2.with_prediction_type("v_prediction"))
    assert (report.config_source, report.prediction_source, model.config.prediction_type) == (
        "override", "override", "v_prediction")
    yaml = tmp_path / "v2-inference-v.yaml"
    yaml.write_text("model:\n  params:\n    parameterization: v\n")
    model, report = load_model(sd2_files["eps"], config=yaml)
    assert (report.config_source, report.prediction_source, model.config.prediction_type) == (
        "detected", "yaml", "v_prediction")
    with pytest.raises(CheckpointError, match="cond_stage_model.transformer"):
        load_model(sd2_files["eps"], config=SD1)
    model, report = load_model(_saved(tmp_path), config=str(yaml))  # nijimi's own file: yaml sets the target
    assert (report.config_source, report.prediction_source, model.config) == (
        "metadata", "yaml", SD1.with_prediction_type("v_prediction"))


def test_sd1_is_never_probed(tmp_path) -> None:
    path = tmp_path / "sd1.safetensors"
    ckpt = dict(safetensors.torch.load_file(_saved(tmp_path, SD1)))
    safetensors.torch.save_file(ckpt, path)
    model, report = load_model(path)
    assert (report.prediction_source, model.config.prediction_type) == ("default", "epsilon")
    path.with_suffix(".yaml").write_text("parameterization: v\n")
    model, report = load_model(path)
    assert (report.prediction_source, model.config.prediction_type) == ("yaml", "v_prediction")


# ---- malformed checkpoints ---------------------------------------------------------------------------------------

def _saved(tmp_path, config: ModelConfig = SD1) -> os.PathLike:
    path = tmp_path / "good.safetensors"
    if not path.exists():
        save_single(random_model(config, seed=9), path)
    return path


@pytest.fixture(scope="module")
def sd1_tensors(tmp_path_factory) -> dict[str, torch.Tensor]:
    return dict(safetensors.torch.load_file(_saved(tmp_path_factory.mktemp("sd1"))))


def _write(tmp_path, tensors: dict, name: str = "bad.safetensors") -> os.PathLike:
    safetensors.torch.save_file(tensors, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(("edit", "message"), [
    (lambda sd: sd.update({"model.diffusion_model.out.2.bias": torch.zeros(4, dtype=torch.int32)}),
     r"'model.diffusion_model.out.2.bias' has dtype torch.int32"),
    (lambda sd: sd.update({"model.diffusion_model.input_blocks.1.0.in_layers.2.weight": torch.zeros(32, 32, 1, 1)}),
     r"1 shape mismatches, e.g. model.diffusion_model.input_blocks.1.0.in_layers.2.weight: "
     r"file \(32, 32, 1, 1\) vs model \(32, 32, 3, 3\)"),
    (lambda sd: sd.pop("first_stage_model.decoder.conv_out.bias"),
     r"1 missing keys, e.g. \['first_stage_model.decoder.conv_out.bias'\]"),
    (lambda sd: sd.update({"model.diffusion_model.extra.weight": torch.zeros(1)}),
     r"1 unexpected keys, e.g. \['model.diffusion_model.extra.weight'\]"),
])
def test_weights_that_do_not_fit(tmp_path, sd1_tensors, edit, message: str) -> None:
    tensors = dict(sd1_tensors)
    edit(tensors)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(_write(tmp_path, tensors))
    assert "bad.safetensors" in str(info.value)


def test_unknown_top_level_keys_are_reported(tmp_path, sd1_tensors) -> None:
    model, report = load_model(_write(tmp_path, {**sd1_tensors, "lora_unet_x.alpha": torch.ones(())}))
    assert report.unknown == ("lora_unet_x.alpha",) and "lora_unet_x.alpha" in report.summary()


def test_truncated_and_oversized_header(tmp_path) -> None:
    data = _saved(tmp_path).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=r"cut.safetensors.*truncated"):
        load_model(tmp_path / "cut.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(CheckpointError, match=r"huge.safetensors.*header length"):
        load_model(tmp_path / "huge.safetensors")
    (tmp_path / "text.safetensors").write_text("not a tensor file at all")
    with pytest.raises(CheckpointError, match="text.safetensors"):
        load_model(tmp_path / "text.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "absent.safetensors")


def test_bad_arguments(tmp_path) -> None:
    path = _saved(tmp_path)
    with pytest.raises(ConfigError, match="floating dtype"):
        load_model(path, dtype=torch.int8)
    with pytest.raises(ConfigError, match="'zip'"):
        convert(path, tmp_path / "out", to="zip")
    with pytest.raises(ConfigError, match="unknown model preset 'sd3'"):
        load_model(path, config="sd3")
    save_diffusers(random_model(SD1, seed=0), tmp_path / "folder")
    with pytest.raises(ConfigError, match="EMA"):
        load_model(tmp_path / "folder", ema=True)


def test_invalid_own_metadata(tmp_path, sd1_tensors) -> None:
    safetensors.torch.save_file(sd1_tensors, tmp_path / "m.safetensors", {"nijimi_config": "{not json"})
    with pytest.raises(CheckpointError, match="invalid nijimi_config"):
        load_model(tmp_path / "m.safetensors")


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_payload_never_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    data_pkl = next(n for n in entries if n.endswith("data.pkl"))
    entries[data_pkl] = pickle.dumps({"state_dict": _Payload(str(marker))}, protocol=2)
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in entries.items():
            zf.writestr(name, content)
    with pytest.raises(CheckpointError, match=r"evil.ckpt: refusing to unpickle.*system"):
        load_model(path)
    assert not marker.exists()


def test_ckpt_file_loads_like_safetensors(tmp_path, sd1_tensors) -> None:
    torch.save({"state_dict": sd1_tensors, "global_step": 470000}, tmp_path / "model.ckpt")
    model, report = load_model(tmp_path / "model.ckpt")
    assert (report.config_source, model.config) == ("detected", SD1)
    assert same_tensors(dict(model.state_dict()), sd1_tensors)


def test_diffusers_folder_errors(tmp_path) -> None:
    save_diffusers(random_model(SD1, seed=0), tmp_path / "f")
    (tmp_path / "f" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"unet: no weights file"):
        load_model(tmp_path / "f")
    index = json.loads((tmp_path / "f" / "model_index.json").read_text())
    del index["_nijimi_config"]
    (tmp_path / "f" / "model_index.json").write_text(json.dumps(index))
    unet_config = json.loads((tmp_path / "f" / "unet" / "config.json").read_text())
    (tmp_path / "f" / "unet" / "config.json").write_text(json.dumps({**unet_config, "act_fn": "gelu"}))
    with pytest.raises(CheckpointError, match="act_fn"):
        load_model(tmp_path / "f")


# ---- memory ------------------------------------------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from nijimi.io.checkpoint import load_model
    from nijimi.models.ldm import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, LatentDiffusion, ModelConfig
    def kib(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
    with torch.device("meta"):  # the first meta-device model pulls in ~75 MB of lazy torch imports: not data
        LatentDiffusion(ModelConfig.tiny())
    before = kib("VmRSS:")
    model, _ = load_model(sys.argv[1])
    with torch.no_grad():
        total = sum(float(p.sum()) for p in model.parameters())  # touch every weight
    print(before, kib("VmHWM:"), total)
""")


def _peak_rss_ratio(path) -> float:
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    before, peak, _ = out.stdout.split()
    return (int(peak) - int(before)) * 1024 / os.path.getsize(path)


# Sized for the memory check (a file over 150 MB), not a toy: the shape matters.
MEDIUM = ModelConfig(dataclasses.replace(UNetConfig.sd15(), model_channels=64, context_dim=256),
                     VAEConfig(channels=32), TextEncoderConfig(width=256, num_layers=2, num_heads=4), "sd1", 49407)


def test_peak_rss_medium(tmp_path) -> None:
    path = tmp_path / "medium.safetensors"
    with torch.device("meta"):
        shapes = LatentDiffusion(MEDIUM).state_dict()
    safetensors.torch.save_file({k: torch.full(v.shape, 0.01) for k, v in shapes.items()}, path)
    assert os.path.getsize(path) > 150e6
    assert _peak_rss_ratio(path) <= 1.3


@pytest.mark.parametrize("layout", ["single", "diffusers"])
def test_a_loaded_model_holds_its_weights_once_and_none_resident_until_used(tmp_path, layout: str) -> None:
    """No second copy: every weight of an fp32 file is a view of the file's map (one storage per file); the load's
    check read every byte, yet none of the file stays resident until the model uses it; the values are the file's."""
    model = random_model(SD1, seed=3)
    target = tmp_path / ("m.safetensors" if layout == "single" else "m")
    (save_single if layout == "single" else save_diffusers)(model, target)
    weight_files = [target] if layout == "single" else sorted(target.glob("*/*.safetensors"))
    loaded, _ = load_model(target)
    assert sum(resident_kib(f) for f in weight_files) < 64
    storages = {p.untyped_storage().data_ptr() for p in loaded.parameters()}
    assert len(storages) == len(weight_files)
    assert same_tensors(loaded.state_dict(), model.state_dict())
    data = sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert sum(resident_kib(f) for f in weight_files) * 1024 >= 0.9 * data  # reading the weights maps them back


@pytest.mark.slow
def test_peak_rss_sd15(tmp_path) -> None:
    path = tmp_path / "sd15.safetensors"
    with torch.device("meta"):
        shapes = LatentDiffusion(ModelConfig.sd15()).state_dict()
    safetensors.torch.save_file({k: torch.full(v.shape, 0.01) for k, v in shapes.items()}, path)
    assert os.path.getsize(path) > 4e9
    assert _peak_rss_ratio(path) <= 1.3
