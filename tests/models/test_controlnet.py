"""ControlNet parity with diffusers' ControlNetModel on random weights, zero-init behaviour, init from a U-Net."""

from __future__ import annotations

import dataclasses

import diffusers
import pytest
import torch
from helpers import PARITY_UNET_SD1, PARITY_UNET_SD2, PARITY_UNET_TINY, randomize, rel_err

from nijimi.errors import ConfigError
from nijimi.io.keys.controlnet import controlnet_config_to_diffusers, controlnet_key_table
from nijimi.models.controlnet import ControlNetConfig, ControlNetModel, residual_scales
from nijimi.models.unet import UNetModel

CONFIGS = {"sd1": ControlNetConfig(PARITY_UNET_SD1), "sd2": ControlNetConfig(PARITY_UNET_SD2),
           "tiny": ControlNetConfig(PARITY_UNET_TINY, hint_channels=1, hint_widths=(8, 16, 16, 32))}
TOLERANCE = 1e-4  # max |nijimi − diffusers| / max |diffusers| per residual, fp32


def make_pair(cfg: ControlNetConfig, seed: int = 0) -> tuple[ControlNetModel, diffusers.ControlNetModel]:
    """A random nijimi ControlNet and the diffusers one holding the same weights, moved by nijimi's key table."""
    ours = ControlNetModel(cfg).eval()
    randomize(ours, seed)
    theirs = diffusers.ControlNetModel.from_config(controlnet_config_to_diffusers(cfg)).eval()
    theirs.load_state_dict(controlnet_key_table(cfg).to_foreign(ours.state_dict()), strict=True)
    return ours, theirs


def inputs(cfg: ControlNetConfig, batch: int = 2, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """x (B, C, size, size), t (B,), context (B, 7, D), hint (B, hint_channels, f·size, f·size) in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.unet.in_channels, size, size, generator=gen)
    context = torch.randn(batch, 7, cfg.unet.context_dim, generator=gen)
    side = size * cfg.hint_downscale
    hint = torch.rand(batch, cfg.hint_channels, side, side, generator=gen)
    return x, torch.tensor([999.0, 321.5, 17.0][:batch]), context, hint


@pytest.mark.parametrize("guess_mode", [False, True], ids=["plain", "guess"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_diffusers(name: str, guess_mode: bool) -> None:
    cfg = CONFIGS[name]
    ours, theirs = make_pair(cfg)
    x, t, context, hint = inputs(cfg)
    with torch.inference_mode():
        down, mid = ours(x, t, context, hint, scale=0.7, guess_mode=guess_mode)
        want_down, want_mid = theirs(x, t, context, hint, conditioning_scale=0.7, guess_mode=guess_mode,
                                     return_dict=False)
    assert len(down) == len(want_down) == len(ours.input_blocks)
    for got, want in zip([*down, mid], [*want_down, want_mid], strict=True):
        assert got.shape == want.shape
        assert want.abs().max() > 1e-3
        assert rel_err(got, want) <= TOLERANCE


def test_global_pool_matches_diffusers_global_pool_conditions() -> None:
    cfg = dataclasses.replace(CONFIGS["tiny"], global_pool=True)
    ours, theirs = make_pair(cfg, seed=4)
    assert theirs.config.global_pool_conditions
    x, t, context, hint = inputs(cfg)
    with torch.inference_mode():
        down, mid = ours(x, t, context, hint, scale=0.5, guess_mode=True)
        want_down, want_mid = theirs(x, t, context, hint, conditioning_scale=0.5, guess_mode=True, return_dict=False)
    assert [r.shape[2:] for r in down] == [(1, 1)] * len(down)
    for got, want in zip([*down, mid], [*want_down, want_mid], strict=True):
        assert rel_err(got, want) <= TOLERANCE


def test_guess_mode_scales_match_diffusers_and_the_original() -> None:
    scales = residual_scales(12, 0.5, guess_mode=True)
    assert len(scales) == 13
    assert scales == pytest.approx((0.5 * torch.logspace(-1, 0, 13)).tolist(), rel=1e-6)
    original = [0.5 * 0.825 ** (12 - i) for i in range(13)]  # lllyasviel's cldm / AUTOMATIC1111
    assert scales == pytest.approx(original, rel=6e-3)
    assert residual_scales(12, 0.5, guess_mode=False) == [0.5] * 13


@pytest.mark.parametrize(("preset", "params"), [("sd15", 361_279_120), ("sd21", 364_228_240)])
def test_full_size_matches_diffusers_parameter_layout(preset: str, params: int) -> None:
    cfg = getattr(ControlNetConfig, preset)()
    with torch.device("meta"):
        ours = ControlNetModel(cfg)
        theirs = diffusers.ControlNetModel.from_config(controlnet_config_to_diffusers(cfg))
    ours_shapes = {k: v.shape for k, v in controlnet_key_table(cfg).to_foreign(ours.state_dict()).items()}
    assert ours_shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == params
    assert list(ours.state_dict())[:4] == ["time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight",
                                           "time_embed.2.bias"]
    hint_keys = [k for k in ours.state_dict() if k.startswith("input_hint_block.") and k.endswith(".weight")]
    assert hint_keys == [f"input_hint_block.{i}.weight" for i in range(0, 15, 2)]
    assert ours.zero_convs[11][0].weight.shape == (1280, 1280, 1, 1)
    assert ours.middle_block_out[0].weight.shape == (1280, 1280, 1, 1)


def test_fresh_controlnet_leaves_unet_output_unchanged_exactly() -> None:
    unet = UNetModel(PARITY_UNET_TINY).eval()
    control = ControlNetModel(ControlNetConfig(PARITY_UNET_TINY)).eval()
    cfg = control.config
    x, t, context, hint = inputs(cfg)
    with torch.inference_mode():
        down, mid = control(x, t, context, hint, scale=2.0)
        steered = unet(x, t, context, down_residuals=down, mid_residual=mid)
        plain = unet(x, t, context)
    assert all(torch.count_nonzero(r) == 0 for r in [*down, mid])
    assert torch.equal(steered, plain)


def test_from_unet_copies_the_encoder_and_starts_at_zero() -> None:
    unet = UNetModel(PARITY_UNET_TINY).eval()
    randomize(unet, 2)
    global_state = torch.random.get_rng_state()
    control = ControlNetModel.from_unet(unet, hint_channels=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), global_state)  # randomness only from the generator
    again = ControlNetModel.from_unet(unet, hint_channels=3, generator=torch.Generator().manual_seed(0))
    theirs = diffusers.ControlNetModel.from_config(controlnet_config_to_diffusers(control.config))
    theirs.load_state_dict(controlnet_key_table(control.config).to_foreign(control.state_dict()))
    unet_sd, control_sd = unet.state_dict(), control.state_dict()
    copied = [k for k in control_sd if k.startswith(("time_embed.", "input_blocks.", "middle_block."))]
    assert len(copied) == len([k for k in unet_sd if k.startswith(("time_embed.", "input_blocks.", "middle_block."))])
    assert all(torch.equal(control_sd[k], unet_sd[k]) for k in copied)
    zeroed = [k for k in control_sd if k.startswith(("zero_convs.", "middle_block_out.", "input_hint_block.14."))]
    assert len(zeroed) == 2 * (len(control.zero_convs) + 2)
    assert all(torch.count_nonzero(control_sd[k]) == 0 for k in zeroed)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in control_sd.items())  # seeded hint encoder
    first = control.input_hint_block[0].weight
    assert 0.1 < first.abs().max().item() <= 1 / (3 * 9) ** 0.5  # PyTorch's default bound 1/√fan_in
    x, t, context, hint = inputs(control.config)
    with torch.inference_mode():
        down, mid = control(x, t, context, hint)
        assert torch.equal(unet(x, t, context, down_residuals=down, mid_residual=mid), unet(x, t, context))


def test_bad_inputs_are_named() -> None:
    control = ControlNetModel(CONFIGS["tiny"])
    x, t, context, hint = inputs(control.config)
    with pytest.raises(ConfigError, match=r"control map must be \(2, 1, 128, 128\).*got \(2, 1, 120, 128\)"):
        control(x, t, context, hint[:, :, :120])
    with pytest.raises(ConfigError, match=r"ControlNet input must be \(B, 4, H, W\)"):
        control(x[:, :3], t, context, hint)
    with pytest.raises(ConfigError, match=r"context must be \(2, M, 40\)"):
        control(x, t, context[..., :8], hint)
    with pytest.raises(ConfigError, match="model_channels 32 vs 64; channel_mult"):
        smaller = dataclasses.replace(PARITY_UNET_TINY, model_channels=64, channel_mult=(1, 2), attention_levels=(1,))
        control.config.check_fits(smaller)
    control.config.check_fits(dataclasses.replace(PARITY_UNET_TINY, out_channels=8, sample_size=96))
    with pytest.raises(ConfigError, match="hint_channels must be ≥ 1, got 0"):
        ControlNetConfig(PARITY_UNET_TINY, hint_channels=0)
    with pytest.raises(ConfigError, match=r"unknown keys \['extra'\]"):
        ControlNetConfig.from_dict({**control.config.to_dict(), "extra": 1})
    assert ControlNetConfig.from_dict(control.config.to_dict()) == control.config
