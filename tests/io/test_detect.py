"""Architecture detection from single-file keys and shapes (nijimi/io/detect.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from helpers import SD1

from nijimi.errors import CheckpointError
from nijimi.io.checkpoint import single_file_state_dict
from nijimi.io.detect import (
    detect_single_file,
    probe_v_prediction,
    probe_value,
    read_sidecar_yaml,
    text_layout,
    with_v_prediction,
)
from nijimi.io.keys.unet import unet_config_to_diffusers
from nijimi.models.ldm import LatentDiffusion, ModelConfig
from nijimi.models.text_encoder import TextEncoderConfig
from nijimi.models.unet import UNetConfig, UNetModel
from nijimi.models.vae import VAEConfig

# Small configs that follow the real families' conventions (SD1: 8 heads; SD2: 64-wide heads, linear proj; text
# encoders: 64-wide heads; 32 norm groups), so a foreign file of these sizes is detected exactly. SD1 is the shared
# small SD1 config; SD2 here has attention at both levels, unlike the shared one.
SD2_SMALL = ModelConfig(
    UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=None,
               head_dim=64, context_dim=128, linear_proj=True, upcast_attention=True),
    VAEConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1),
    TextEncoderConfig(width=128, num_layers=3, num_heads=2, mlp_width=256, activation="gelu", clip_skip=2,
                      projection_dim=96), "sd2", 0)


def _shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = LatentDiffusion(config)
    return {k: tuple(v.shape) for k, v in single_file_state_dict(model).items()}


@pytest.mark.parametrize("name", ["sd15", "sd15_inpaint", "sd15_pix2pix", "sd21"])
def test_full_size_presets_are_detected(name: str) -> None:
    shapes = _shapes(ModelConfig.preset(name))
    assert detect_single_file(shapes) == ModelConfig.preset(name)
    assert text_layout(shapes) == ("openclip" if name == "sd21" else "clip")


def test_v_model_is_sd21_until_the_probe_speaks() -> None:
    detected = detect_single_file(_shapes(ModelConfig.sd21_v()))
    assert detected == ModelConfig.sd21()
    assert with_v_prediction(detected) == ModelConfig.sd21_v()
    assert with_v_prediction(SD2_SMALL).unet == SD2_SMALL.unet  # custom sizes keep their sample size


def test_detection_reads_family_channels_and_context() -> None:
    shapes = _shapes(ModelConfig.sd15())
    unet_in = shapes["model.diffusion_model.input_blocks.0.0.weight"]
    assert unet_in == (320, 4, 3, 3)
    assert shapes["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, 768)
    sd21 = _shapes(ModelConfig.sd21())
    assert sd21["model.diffusion_model.middle_block.1.proj_in.weight"] == (1280, 1280)  # linear, SD2
    assert shapes["model.diffusion_model.middle_block.1.proj_in.weight"] == (1280, 1280, 1, 1)  # 1x1 conv, SD1
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in sd21


@pytest.mark.parametrize("config", [SD1, SD2_SMALL], ids=["sd1", "sd2"])
def test_small_custom_sizes_are_detected(config: ModelConfig) -> None:
    assert detect_single_file(_shapes(config)) == config


def test_sd1_text_encoder_without_text_model_level() -> None:
    shapes = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
              for k, v in _shapes(ModelConfig.sd15()).items()}
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in shapes
    assert detect_single_file(shapes) == ModelConfig.sd15()


def test_openclip_tower_without_projection_is_used_at_its_last_layer() -> None:
    shapes = {k: v for k, v in _shapes(SD2_SMALL).items()
              if not k.endswith(("text_projection", "logit_scale")) and ".resblocks.2." not in k}
    text = detect_single_file(shapes).text
    assert (text.num_layers, text.clip_skip, text.projection_dim) == (2, 1, None)


@pytest.mark.parametrize(("drop", "message"), [
    ("cond_stage_model.", "no text encoder"),
    ("model.diffusion_model.middle_block.", "middle_block.1.transformer_blocks.0.attn2.to_k.weight"),
    ("model.diffusion_model.input_blocks.2.", "not an SD layout"),
    ("first_stage_model.encoder.conv_in", "encoder.conv_in.weight"),
])
def test_unknown_architecture(drop: str, message: str) -> None:
    shapes = {k: v for k, v in _shapes(SD1).items() if not k.startswith(drop)}
    with pytest.raises(CheckpointError, match="unknown architecture") as info:
        detect_single_file(shapes, "x.safetensors")
    assert message in str(info.value) and "x.safetensors" in str(info.value)


def test_shapes_that_fit_no_config() -> None:
    shapes = _shapes(SD1)
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (30, 4, 3, 3)  # 30 channels: not 8-head divisible
    with pytest.raises(CheckpointError, match="unknown architecture"):
        detect_single_file(shapes)


def _forced_unet(bias: float) -> UNetModel:
    torch.manual_seed(0)
    unet = UNetModel(SD2_SMALL.unet)
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(bias)
    return unet


def test_probe_decision_follows_a1111_threshold() -> None:
    # With the output conv zeroed the U-Net returns its bias everywhere: mean(out - x) = bias - 0.5 exactly.
    assert probe_value(_forced_unet(-3.0)) == pytest.approx(-3.5)
    assert probe_v_prediction(_forced_unet(-3.0))
    assert not probe_v_prediction(_forced_unet(0.0))
    assert not probe_v_prediction(_forced_unet(-0.49))  # -0.99: just above the threshold


def test_probe_value_matches_diffusers_unet() -> None:
    torch.manual_seed(1)
    unet = UNetModel(SD2_SMALL.unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prefixed = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    diffusers_config = unet_config_to_diffusers(SD2_SMALL.unet)
    reference = UNet2DConditionModel(**{k: v for k, v in diffusers_config.items() if not k.startswith("_")})
    reference.load_state_dict(convert_ldm_unet_checkpoint(prefixed, reference.config), strict=True)
    x = torch.full((1, 4, 8, 8), 0.5)
    with torch.no_grad():
        out = reference(x, torch.tensor([999]), encoder_hidden_states=torch.full((1, 2, 128), 0.5)).sample
    assert probe_value(unet) == pytest.approx((out - x).mean().item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(("text", "expected"), [
    ('model:\n  params:\n    parameterization: "v"\n', "v_prediction"),
    ("model:\n  params:\n    parameterization: v  # 768-v\n", "v_prediction"),
    ("model:\n  params:\n    parameterization: 'eps'\n", "epsilon"),
    ("model:\n  params:\n    linear_start: 0.00085\n", None),
])
def test_sidecar_yaml(tmp_path, text: str, expected: str | None) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    assert read_sidecar_yaml(path) == expected


def test_sidecar_yaml_unknown_parameterization(tmp_path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("parameterization: x0\n")
    with pytest.raises(CheckpointError, match="'x0'"):
        read_sidecar_yaml(path)


def test_with_v_prediction_changes_only_the_target() -> None:
    v = with_v_prediction(SD1)
    assert v.prediction_type == "v_prediction" and v.schedule == dataclasses.replace(SD1.schedule,
                                                                                     prediction_type="v_prediction")
    assert (v.unet, v.vae, v.text) == (SD1.unet, SD1.vae, SD1.text)
