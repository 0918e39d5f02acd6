"""Single files in the CompVis layout, checked against diffusers' own single-file converters.

nijimi writes a small random SD1-, SD2- and inpainting-style model as one file; diffusers' converters
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` /
``convert_open_clip_checkpoint``, with configs made by diffusers from an LDM inference yaml) turn the same tensors into
diffusers/transformers models, which must load strictly and give nijimi's outputs. Files in the real layouts without
nijimi's metadata (EMA copies, schedule buffers, float ``position_ids``, no ``text_model.`` level) load to the same
tensors by detection alone.
"""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from helpers import SD1, SD2, output_errors, random_model
from transformers import CLIPTextConfig, CLIPTextModel

from nijimi.io.checkpoint import load_model, save_single
from nijimi.models.ldm import LatentDiffusion, ModelConfig

INPAINT = dataclasses.replace(SD1, unet=dataclasses.replace(SD1.unet, in_channels=9))
TOLERANCE = 1e-4


def ldm_yaml(config: ModelConfig) -> dict:
    """The CompVis inference yaml (as a dict) of ``config``, what diffusers builds its configs from."""
    u = config.unet
    unet = {"in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
            "attention_resolutions": [2**lv for lv in u.attention_levels], "num_res_blocks": u.num_res_blocks,
            "channel_mult": list(u.channel_mult), "transformer_depth": u.transformer_depth,
            "context_dim": u.context_dim, "use_linear_in_transformer": u.linear_proj}
    unet.update({"num_heads": u.num_heads} if u.num_heads else {"num_head_channels": u.head_dim})
    v = config.vae
    ddconfig = {"ch": v.channels, "ch_mult": list(v.channel_mult), "num_res_blocks": v.num_res_blocks,
                "z_channels": v.z_channels, "in_channels": v.in_channels, "out_ch": v.out_channels}
    return {"model": {"params": {"scale_factor": v.scaling_factor, "unet_config": {"params": unet},
                                 "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}


def diffusers_reference(ckpt: dict[str, torch.Tensor], config: ModelConfig):
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel) converted by diffusers from a single file's tensors."""
    yaml = ldm_yaml(config)
    unet_config = create_unet_diffusers_config_from_ldm(yaml, ckpt)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, unet_config), strict=True)
    vae_config = create_vae_diffusers_config_from_ldm(yaml, ckpt)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vae_config), strict=True)
    t = config.text
    used = t.num_layers - t.clip_skip + 1  # SD2 uses the penultimate layer: diffusers' CLIPTextModel stops there
    text = CLIPTextModel(CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_width,
                                        num_hidden_layers=used, num_attention_heads=t.num_heads,
                                        max_position_embeddings=t.max_positions, hidden_act=t.activation))
    if config.family == "sd2":
        # diffusers drops OpenCLIP's last layer and projection by a fixed ViT-H key list; the same for this size.
        converted = convert_open_clip_checkpoint(text, ckpt)
        converted = {k: v for k, v in converted.items()
                     if k != "text_projection.weight" and f"encoder.layers.{used}." not in k}
    else:
        converted = convert_ldm_clip_checkpoint(ckpt)
    text.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()}, strict=True)
    return unet.eval(), vae.eval(), text.eval()


def assert_same_outputs(model: LatentDiffusion, reference, seed: int = 0) -> None:
    errors = output_errors(model, *reference, seed)
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize("config", [SD1, SD2, INPAINT], ids=["sd1", "sd2", "inpaint"])
def test_saved_file_converts_with_diffusers_to_same_outputs(tmp_path, config: ModelConfig) -> None:
    model = random_model(config, seed=3)
    path = tmp_path / "model.safetensors"
    save_single(model, path)
    ckpt = safetensors.torch.load_file(path)
    text_prefix = "cond_stage_model.model." if config.family == "sd2" else "cond_stage_model.transformer.text_model."
    assert any(k.startswith(text_prefix) for k in ckpt)
    loaded, report = load_model(path)
    assert report.config_source == "metadata" and loaded.config == config
    assert_same_outputs(loaded, diffusers_reference(ckpt, config))


def _foreign(model: LatentDiffusion, tmp_path, name: str, edit) -> tuple:
    """Write the model's single-file tensors, edited as real files are, without nijimi's metadata."""
    path = tmp_path / name
    save_single(model, path)
    ckpt = dict(safetensors.torch.load_file(path))
    edit(ckpt)
    safetensors.torch.save_file(ckpt, path)
    return path, ckpt


def _sd1_extras(ckpt: dict) -> None:
    ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    for key in [k for k in ckpt if k.startswith("model.diffusion_model.")]:
        ckpt["model_ema." + key.removeprefix("model.").replace(".", "")] = ckpt[key] + 1
    ckpt["model_ema.decay"] = torch.tensor(0.9999)
    ckpt["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    ckpt["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    ckpt["betas"] = torch.linspace(0.00085, 0.012, 1000)
    ckpt["first_stage_model.loss.logvar"] = torch.zeros(())


def _no_text_model_level(ckpt: dict) -> None:
    for key in [k for k in ckpt if k.startswith("cond_stage_model.transformer.text_model.")]:
        ckpt[key.replace(".text_model.", ".")] = ckpt.pop(key)


def test_real_sd1_file_with_extras_loads_by_detection(tmp_path) -> None:
    model = random_model(SD1, seed=4)
    path, ckpt = _foreign(model, tmp_path, "sd1.safetensors", _sd1_extras)
    loaded, report = load_model(path)
    assert report.config_source == "detected" and report.prediction_source == "default"
    assert loaded.config == SD1
    assert len(report.ignored) == sum(k.startswith("model_ema.") for k in ckpt) + 4 and report.unknown == ()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
    ema, report = load_model(path, ema=True)
    assert report.ema
    for key, value in ema.unet.state_dict().items():
        assert torch.equal(value, model.unet.state_dict()[key] + 1), key


def test_real_sd1_file_without_text_model_level(tmp_path) -> None:
    model = random_model(SD1, seed=5)
    path, ckpt = _foreign(model, tmp_path, "old.safetensors", _no_text_model_level)
    assert "cond_stage_model.transformer.final_layer_norm.weight" in ckpt
    loaded, _ = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
    assert_same_outputs(loaded, diffusers_reference(dict(safetensors.torch.load_file(path)), SD1), seed=1)


def test_real_sd2_file_loads_by_detection(tmp_path) -> None:
    model = random_model(SD2, seed=6)
    path, ckpt = _foreign(model, tmp_path, "sd2.safetensors", lambda ckpt: None)
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in ckpt
    loaded, report = load_model(path)
    assert report.config_source == "detected" and report.prediction_source == "probe"
    assert loaded.config == SD2  # the random U-Net's probe says ε
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))


def test_fp16_file_loads_to_float32(tmp_path) -> None:
    model = random_model(INPAINT, seed=7)
    path = tmp_path / "half.safetensors"
    save_single(model, path, half=True)
    loaded, report = load_model(path)
    assert report.stored_dtypes == ("float16",)
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, model.state_dict()[key].half().float()), key
