"""ControlNet files: key table and config.json conversion, detection, original files vs diffusers' own single-file
converter, diffusers folders both ways, round trips, malformed files (nijimi/io/controlnet.py, io/keys.py)."""

from __future__ import annotations

import dataclasses
import json

import diffusers
import pytest
import safetensors.torch
import torch
from helpers import randomize, rel_err

from nijimi.errors import CheckpointError, ConfigError
from nijimi.io.controlnet import (
    detect_controlnet,
    load_controlnet,
    save_diffusers,
    save_original,
)
from nijimi.io.keys.controlnet import (
    controlnet_config_from_diffusers,
    controlnet_config_to_diffusers,
    controlnet_key_table,
)
from nijimi.models.controlnet import ControlNetConfig, ControlNetModel
from nijimi.models.unet import UNetConfig

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
# config.json of lllyasviel/control_v11p_sd15_canny, and of an SD 2.1 ControlNet as diffusers converts thibaud's.
SD15_CONFIG_JSON = {
    "_class_name": "ControlNetModel", "_diffusers_version": "0.16.0.dev0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256], "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768, "down_block_types": _DOWN, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None, "resnet_time_scale_shift": "default", "upcast_attention": False,
    "use_linear_projection": False,
}
SD21_CONFIG_JSON = {**SD15_CONFIG_JSON, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                    "use_linear_projection": True}
# Small, detectable configs: SD 1.x-style with 8 heads, SD 2.x-style with 64-wide heads, 32 norm groups (what
# detection assumes: neither is in the shapes).
SD1_SMALL = ControlNetConfig(UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                                        attention_levels=(0, 1, 2), num_heads=8, context_dim=32))
SD2_SMALL = ControlNetConfig(UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                                        attention_levels=(1, 2), num_heads=None, head_dim=64, context_dim=48,
                                        linear_proj=True, upcast_attention=True))
# The same architectures as hand-written diffusers config.json files (independent of nijimi's conversion).
SD1_SMALL_JSON = {"_class_name": "ControlNetModel", "in_channels": 4, "conditioning_channels": 3,
                  "down_block_types": _DOWN, "block_out_channels": [32, 64, 128, 128], "layers_per_block": 2,
                  "cross_attention_dim": 32, "attention_head_dim": 8}
SD2_SMALL_JSON = {"_class_name": "ControlNetModel", "in_channels": 4, "conditioning_channels": 3,
                  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  "block_out_channels": [64, 128, 128], "layers_per_block": 1, "cross_attention_dim": 48,
                  "attention_head_dim": [1, 2, 2], "use_linear_projection": True, "upcast_attention": True}
TOLERANCE = 1e-4


def random_controlnet(cfg: ControlNetConfig, seed: int) -> ControlNetModel:
    """Every parameter seeded noise (zero convolutions too), so no residual is trivially zero."""
    model = ControlNetModel(cfg)
    randomize(model, seed)
    return model.eval()


def residuals(model, cfg: ControlNetConfig, size: int = 8, diffusers_model: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, size, size, generator=gen)
    context = torch.randn(2, 5, cfg.unet.context_dim, generator=gen)
    hint = torch.rand(2, cfg.hint_channels, 8 * size, 8 * size, generator=gen)
    t = torch.tensor([900, 40])
    with torch.inference_mode():
        if diffusers_model:
            down, mid = model(x, t, context, hint, conditioning_scale=0.9, return_dict=False)
        else:
            down, mid = model(x, t, context, hint, scale=0.9)
    return [*down, mid]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert b.abs().max() > 1e-3
        assert rel_err(a, b) <= TOLERANCE


def shapes_of(cfg: ControlNetConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in ControlNetModel(cfg).state_dict().items()}


# ---- key table and config.json ------------------------------------------------------------------------------------

def test_real_diffusers_configs_map_to_presets() -> None:
    assert controlnet_config_from_diffusers(SD15_CONFIG_JSON) == ControlNetConfig.sd15()
    sd21 = ControlNetConfig.sd21()
    assert controlnet_config_from_diffusers(SD21_CONFIG_JSON) == dataclasses.replace(
        sd21, unet=dataclasses.replace(sd21.unet, upcast_attention=False))
    ours = controlnet_config_to_diffusers(ControlNetConfig.sd15())
    for key, value in SD15_CONFIG_JSON.items():
        if not key.startswith("_"):
            assert ours[key] == value, key
    assert controlnet_config_to_diffusers(sd21)["attention_head_dim"] == [5, 10, 20, 20]


@pytest.mark.parametrize("cfg", [ControlNetConfig.sd15(), ControlNetConfig.sd21(), SD2_SMALL,
                                 ControlNetConfig(SD1_SMALL.unet, 1, (8, 16, 32), global_pool=True)],
                         ids=["sd15", "sd21", "sd2-small", "other-hint"])
def test_config_and_key_table_round_trip_and_fit_diffusers(cfg: ControlNetConfig) -> None:
    as_json = controlnet_config_to_diffusers(cfg)
    assert controlnet_config_from_diffusers(json.loads(json.dumps(as_json))) == cfg
    with torch.device("meta"):
        theirs = diffusers.ControlNetModel.from_config(as_json)
    table, shapes = controlnet_key_table(cfg), shapes_of(cfg)
    assert [native for native, _ in table] == list(shapes)
    assert {foreign: shapes[native] for native, foreign in table} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize(("native", "foreign"), [
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight"),
    ("input_hint_block.2.bias", "controlnet_cond_embedding.blocks.0.bias"),
    ("input_hint_block.12.weight", "controlnet_cond_embedding.blocks.5.weight"),
    ("input_hint_block.14.weight", "controlnet_cond_embedding.conv_out.weight"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.6.0.op.bias", "down_blocks.1.downsamplers.0.conv.bias"),
    ("input_blocks.8.1.transformer_blocks.0.attn1.to_q.weight",
     "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.weight"),
    ("input_blocks.11.0.out_layers.3.weight", "down_blocks.3.resnets.1.conv2.weight"),
    ("zero_convs.0.0.weight", "controlnet_down_blocks.0.weight"),
    ("zero_convs.11.0.bias", "controlnet_down_blocks.11.bias"),
    ("middle_block.1.proj_out.weight", "mid_block.attentions.0.proj_out.weight"),
    ("middle_block.2.emb_layers.1.weight", "mid_block.resnets.1.time_emb_proj.weight"),
    ("middle_block_out.0.weight", "controlnet_mid_block.weight"),
])
def test_key_table_entries(native: str, foreign: str) -> None:
    assert dict(controlnet_key_table(ControlNetConfig.sd15()))[native] == foreign


def test_renames_are_strict() -> None:
    sd = {k: torch.zeros(1) for k in shapes_of(SD2_SMALL)}
    assert list(controlnet_key_table(SD2_SMALL).to_native(controlnet_key_table(SD2_SMALL).to_foreign(sd))) == list(sd)
    del sd["zero_convs.2.0.bias"]
    with pytest.raises(CheckpointError, match=r"native ControlNet .* missing \['zero_convs.2.0.bias'\] \(1\)"):
        controlnet_key_table(SD2_SMALL).to_foreign({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match="controlnet_conditioning_channel_order='bgr' is not supported"):
        controlnet_config_from_diffusers({**SD15_CONFIG_JSON, "controlnet_conditioning_channel_order": "bgr"})


# ---- detection and original files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [ControlNetConfig.sd15(), ControlNetConfig.sd21(), ControlNetConfig.sd15(1),
                                 SD1_SMALL, SD2_SMALL], ids=["sd15", "sd21", "sd15-1ch", "sd1-small", "sd2-small"])
def test_detection_from_shapes(cfg: ControlNetConfig) -> None:
    assert detect_controlnet(shapes_of(cfg)) == cfg


def test_original_file_matches_diffusers_single_file_loader(tmp_path) -> None:
    """A ``control_model.*`` file: nijimi detects and loads it; diffusers' ``from_single_file`` (its own key
    converter, a hand-written local config, no network) gives the same residuals."""
    model = random_controlnet(SD1_SMALL, 1)
    path = tmp_path / "control_sd15_small.safetensors"
    safetensors.torch.save_file({"control_model." + k: v for k, v in model.state_dict().items()}, path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps(SD1_SMALL_JSON))
    theirs = diffusers.ControlNetModel.from_single_file(str(path), config=str(tmp_path / "config")).eval()
    ours, report = load_controlnet(path)
    assert (report.layout, report.config_source, report.prefixed, report.family) == ("original", "detected", True,
                                                                                     "sd1")
    assert ours.config == SD1_SMALL
    assert_close(residuals(ours, SD1_SMALL), residuals(theirs, SD1_SMALL, diffusers_model=True))


def test_bare_sd2_file_matches_diffusers_converter(tmp_path) -> None:
    """Keys without ``control_model.`` (control_v11 / thibaud SD 2.1 files) in a ``.pth``; diffusers'
    ``convert_controlnet_checkpoint`` moves them into its ControlNetModel."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    model = random_controlnet(SD2_SMALL, 2)
    path = tmp_path / "controlnet_sd21_small.pth"
    torch.save(model.state_dict(), path)
    theirs = diffusers.ControlNetModel.from_config(SD2_SMALL_JSON).eval()
    theirs.load_state_dict(convert_controlnet_checkpoint(torch.load(path), SD2_SMALL_JSON), strict=True)
    ours, report = load_controlnet(path)
    assert (report.config_source, report.prefixed, report.family) == ("detected", False, "sd2")
    assert_close(residuals(ours, SD2_SMALL), residuals(theirs, SD2_SMALL, diffusers_model=True))


def test_v10_file_with_whole_sd_model_loads_only_the_controlnet(tmp_path) -> None:
    model = random_controlnet(SD2_SMALL, 3)
    sd = {"control_model." + k: v.half() for k, v in model.state_dict().items()}
    extras = {"model.diffusion_model.out.2.weight": torch.zeros(4, 64, 3, 3), "first_stage_model.quant_conv.bias":
              torch.zeros(8), "lvlb_weights": torch.ones(1000)}
    path = tmp_path / "control_sd21_full.safetensors"
    safetensors.torch.save_file({**sd, **extras}, path)
    ours, report = load_controlnet(path)
    assert sorted(report.ignored) == sorted(extras)
    assert report.stored_dtypes == ("float16",)
    assert "3 keys outside 'control_model.' ignored" in report.summary()
    assert all(v.dtype == torch.float32 and torch.equal(v, sd["control_model." + k].float())
               for k, v in ours.state_dict().items())
    kept, _ = load_controlnet(path, dtype=None)
    assert next(kept.parameters()).dtype == torch.float16


# ---- diffusers folders and round trips ----------------------------------------------------------------------------

def test_diffusers_reads_our_folder_and_we_read_theirs(tmp_path) -> None:
    cfg = ControlNetConfig(SD2_SMALL.unet, 1, (8, 16, 16, 32))
    model = random_controlnet(cfg, 4)
    save_diffusers(model, tmp_path / "ours")
    theirs = diffusers.ControlNetModel.from_pretrained(tmp_path / "ours").eval()
    assert_close(residuals(model, cfg), residuals(theirs, cfg, diffusers_model=True))
    foreign = diffusers.ControlNetModel.from_config({**SD2_SMALL_JSON, "conditioning_channels": 1,
                                                     "conditioning_embedding_out_channels": [8, 16, 16, 32]})
    foreign.load_state_dict(theirs.state_dict(), strict=True)
    foreign.save_pretrained(tmp_path / "theirs")  # without nijimi's "_nijimi_config", which diffusers would keep
    loaded, report = load_controlnet(tmp_path / "theirs")
    assert (report.layout, report.config_source) == ("diffusers", "diffusers")
    assert loaded.config == cfg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_round_trips_are_bit_exact(tmp_path) -> None:
    model = random_controlnet(SD2_SMALL, 5).half()
    save_original(model, tmp_path / "a.safetensors")
    save_diffusers(load_controlnet(tmp_path / "a.safetensors", dtype=None)[0], tmp_path / "folder")
    converted, report = load_controlnet(tmp_path / "folder", dtype=None)
    save_original(converted, tmp_path / "b.safetensors")
    assert (report.layout, report.config_source, report.stored_dtypes) == ("diffusers", "metadata", ("float16",))
    a = safetensors.torch.load_file(tmp_path / "a.safetensors")
    b = safetensors.torch.load_file(tmp_path / "b.safetensors")
    assert list(a) == list(b) and all(k.startswith("control_model.") for k in a)
    assert all(a[k].dtype == torch.float16 and torch.equal(a[k], b[k]) for k in a)
    save_diffusers(load_controlnet(tmp_path / "b.safetensors", dtype=None)[0], tmp_path / "folder2")
    first = safetensors.torch.load_file(tmp_path / "folder" / "diffusion_pytorch_model.safetensors")
    second = safetensors.torch.load_file(tmp_path / "folder2" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    tiny = ControlNetModel(ControlNetConfig.tiny())  # sample size and head count survive through nijimi's config
    save_diffusers(tiny, tmp_path / "tiny")
    assert load_controlnet(tmp_path / "tiny")[0].config == ControlNetConfig.tiny()


def test_sharded_folder_loads_and_folders_are_written_whole(tmp_path, monkeypatch) -> None:
    cfg = ControlNetConfig(SD2_SMALL.unet, 1, (8, 16, 16, 32))
    model = random_controlnet(cfg, 6)
    save_diffusers(model, tmp_path / "ours")
    theirs = diffusers.ControlNetModel.from_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    loaded, report = load_controlnet(tmp_path / "sharded")
    assert report.layout == "diffusers"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    before = {p.name: p.read_bytes() for p in (tmp_path / "ours").iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("nijimi.io.diffusers_folder._write_json", fail)
    with pytest.raises(OSError, match="disk full"):  # weights written, config.json not: nothing changes
        save_diffusers(random_controlnet(cfg, 7), tmp_path / "ours")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ours").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "sharded"]  # no temp folder left behind
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_diffusers(model, tmp_path / "keep")


# ---- malformed files ----------------------------------------------------------------------------------------------

def test_missing_and_misshaped_keys_are_named(tmp_path) -> None:
    sd = random_controlnet(SD2_SMALL, 6).state_dict()
    del sd["zero_convs.3.0.bias"]
    sd["middle_block_out.0.weight"] = torch.zeros(128, 128, 3, 3)
    path = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_controlnet(path, config=SD2_SMALL)
    message = str(info.value)
    assert "broken.safetensors: weights do not fit the model" in message
    assert "1 missing keys, e.g. ['zero_convs.3.0.bias']" in message
    assert "middle_block_out.0.weight: file (128, 128, 3, 3) vs model (128, 128, 1, 1)" in message


@pytest.mark.parametrize(("tensors", "match"), [
    ({"difference": torch.zeros(1)}, "'difference' ControlNet .* not supported"),
    ({"controlnet_cond_embedding.conv_in.weight": torch.zeros(1)}, "diffusers ControlNetModel keys; load its folder"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)},
     r"not a ControlNet: .*top-level key groups: \['model'\]"),
    ({"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)},
     "unknown ControlNet architecture: missing key 'middle_block.1.proj_in.weight'"),
    ({**{f"input_hint_block.{i}.weight": torch.zeros(16, 3, 3, 3) for i in (0, 2, 4)},
      "middle_block.1.proj_in.weight": torch.zeros(8, 8)},
     "unknown ControlNet architecture: missing key 'input_blocks.0.0.weight'"),
])
def test_non_controlnet_files_are_refused(tmp_path, tensors: dict, match: str) -> None:
    path = tmp_path / "file.safetensors"
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(CheckpointError, match=match):
        load_controlnet(path)


def test_bad_folders_and_names(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="missing.safetensors: no such file"):
        load_controlnet(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_controlnet(tmp_path / "empty")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="not a ControlNetModel config .*'UNet2DConditionModel'"):
        load_controlnet(tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text(json.dumps(SD2_SMALL_JSON))
    with pytest.raises(CheckpointError, match="no weights file"):
        load_controlnet(tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**SD2_SMALL_JSON, "class_embed_type": "timestep"}))
    with pytest.raises(CheckpointError, match="unsupported diffusers ControlNetModel: .*class_embed_type='timestep'"):
        load_controlnet(tmp_path / "unet")
    with pytest.raises(ConfigError, match=r"a\.ckpt: ControlNet files are written as \.safetensors"):
        save_original(ControlNetModel(ControlNetConfig.tiny()), tmp_path / "a.ckpt")
