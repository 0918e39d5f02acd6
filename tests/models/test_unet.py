"""U-Net parity with diffusers' UNet2DConditionModel on random weights, full-size architecture checks, options."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import PARITY_UNET_SD1, PARITY_UNET_SD2, PARITY_UNET_TINY, randomize, rel_err

from nijimi.errors import ConfigError
from nijimi.io.keys.unet import unet_config_to_diffusers, unet_key_table
from nijimi.models.unet import FeatureCache, UNetConfig, UNetModel, embed_timesteps

PARITY_CONFIGS = {"sd1": PARITY_UNET_SD1, "sd2": PARITY_UNET_SD2,
                  "inpaint9": dataclasses.replace(PARITY_UNET_SD1, in_channels=9), "tiny": PARITY_UNET_TINY}
TOLERANCE = 1e-4  # max |nijimi − diffusers| / max |diffusers|, fp32


def make_pair(cfg: UNetConfig, seed: int = 0) -> tuple[UNetModel, UNet2DConditionModel]:
    """A random nijimi U-Net and the diffusers U-Net holding the same weights, moved over by nijimi's key table."""
    ours = UNetModel(cfg).eval()
    randomize(ours, seed)
    theirs = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)).eval()
    theirs.load_state_dict(unet_key_table(cfg).to_foreign(ours.state_dict()), strict=True)
    return ours, theirs


def inputs(cfg: UNetConfig, batch: int = 2, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=gen)
    context = torch.randn(batch, 7, cfg.context_dim, generator=gen)
    t = torch.tensor([999.0, 0.5, 321.0, 17.0][:batch])
    return x, t, context


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_parity_with_diffusers(name: str) -> None:
    cfg = PARITY_CONFIGS[name]
    ours, theirs = make_pair(cfg)
    x, t, context = inputs(cfg)
    with torch.inference_mode():
        got = ours(x, t, context)
        want = theirs(x, t, encoder_hidden_states=context).sample
    assert got.shape == (2, cfg.out_channels, 16, 16)
    assert want.abs().max() > 0.1
    assert rel_err(got, want) <= TOLERANCE


def test_parity_controlnet_residuals_and_int_timesteps() -> None:
    cfg = PARITY_UNET_SD1
    ours, theirs = make_pair(cfg, seed=3)
    x, _, context = inputs(cfg)
    t = torch.tensor([10, 500])
    gen = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        down = [torch.randn(shape, generator=gen) for shape in skip_shapes(ours, x, context)]
        mid = torch.randn(2, 128, 2, 2, generator=gen)
        got = ours(x, t, context, down_residuals=down, mid_residual=mid)
        want = theirs(x, t, encoder_hidden_states=context, down_block_additional_residuals=tuple(down),
                      mid_block_additional_residual=mid).sample
        plain = ours(x, t, context)
    assert rel_err(got, want) <= TOLERANCE
    assert rel_err(plain, got) > 1e-2  # the residuals did change the output


def skip_shapes(unet: UNetModel, x: torch.Tensor, context: torch.Tensor) -> list[torch.Size]:
    """The shapes of the skips the encoder leaves for the decoder (one per input block)."""
    emb = torch.zeros(x.shape[0], unet.config.time_embed_dim)
    shapes, h = [], x
    for block in unet.input_blocks:
        h = block(h, emb, context)
        shapes.append(h.shape)
    return shapes


def test_gradients_match_diffusers() -> None:
    """Training goes through the same in-place fast paths: gradients must be diffusers' too."""
    cfg = PARITY_UNET_TINY
    ours, theirs = make_pair(cfg, seed=9)
    x, t, context = inputs(cfg)
    weights = torch.randn(2, cfg.out_channels, 16, 16, generator=torch.Generator().manual_seed(4))
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ours(x_ours, t, context) * weights).sum().backward()
    (theirs(x_theirs, t, encoder_hidden_states=context).sample * weights).sum().backward()
    assert rel_err(x_ours.grad, x_theirs.grad) <= TOLERANCE
    grads_theirs = dict(theirs.named_parameters())
    for native, foreign in unet_key_table(cfg):
        got, want = ours.get_parameter(native).grad, grads_theirs[foreign].grad
        assert rel_err(got, want) <= TOLERANCE, native


def test_attention_slicing_gives_same_result() -> None:
    ours = UNetModel(PARITY_UNET_TINY).eval()
    randomize(ours, 7)
    x, t, context = inputs(PARITY_UNET_TINY, batch=1)
    with torch.inference_mode():
        whole = ours(x, t, context)
        ours.set_attention_slice(5)
        sliced = ours(x, t, context)
    assert rel_err(sliced, whole) <= 1e-5  # fp32 rounding: chunked SDPA blocks the sums differently


@pytest.mark.parametrize("depth", [1, 4])
def test_deepcache_full_call_is_plain_and_cached_call_runs_the_shallow_branch(depth: int) -> None:
    unet = UNetModel(PARITY_UNET_SD1).eval()
    randomize(unet, 5)
    x, t, context = inputs(PARITY_UNET_SD1)
    x2, t2, context2 = inputs(PARITY_UNET_SD1, seed=2)
    cache = FeatureCache(depth)
    with torch.inference_mode():
        assert torch.equal(unet(x, t, context, cache=cache), unet(x, t, context))
        assert cache.feature.shape == ((2, 32, 16, 16) if depth == 1 else (2, 64, 8, 8))
        got = unet(x2, t2, context2, cache=cache)
        emb = embed_timesteps(unet.time_embed, t2, unet.config.model_channels, 2, x2.dtype)
        skips, h = [], x2
        for block in unet.input_blocks[:depth]:  # conv_in … (depth 4: level 0's res blocks and its downsampling)
            h = block(h, emb, context2)
            skips.append(h)
        h = cache.feature
        for block in unet.output_blocks[-depth:]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context2, skips[-1].shape[-2:] if skips else None)
        assert torch.equal(got, unet.out(h))
    with pytest.raises(ConfigError, match="cache depth 13"):
        unet(x, t, context, cache=FeatureCache(13))


def test_half_precision_upcast_attention_stays_close() -> None:
    ours = UNetModel(PARITY_UNET_SD2).eval()
    randomize(ours, 11)
    x, t, context = inputs(PARITY_UNET_SD2, batch=1)
    with torch.inference_mode():
        want = ours(x, t, context)
        got = ours.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want) < 0.1


def build_on_meta(cfg: UNetConfig) -> tuple[UNetModel, UNet2DConditionModel]:
    with torch.device("meta"):
        return UNetModel(cfg), UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg))


@pytest.mark.parametrize(("preset", "params"), [("sd15", 859_520_964), ("sd21", 865_910_724),
                                                 ("sd15_inpaint", 859_535_364)])
def test_full_size_matches_diffusers(preset: str, params: int) -> None:
    cfg = getattr(UNetConfig, preset)()
    ours, theirs = build_on_meta(cfg)
    assert sum(p.numel() for p in ours.parameters()) == params
    assert sum(p.numel() for p in theirs.parameters()) == params
    converted = {k: v.shape for k, v in unet_key_table(cfg).to_foreign(ours.state_dict()).items()}
    assert converted == {k: v.shape for k, v in theirs.state_dict().items()}


def test_sd15_original_key_positions() -> None:
    with torch.device("meta"):
        sd = UNetModel(UNetConfig.sd15()).state_dict()
    assert sd["input_blocks.0.0.weight"].shape == (320, 4, 3, 3)
    assert sd["input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape == (640, 768)
    assert sd["input_blocks.4.0.skip_connection.weight"].shape == (640, 320, 1, 1)
    assert sd["input_blocks.3.0.op.weight"].shape == (320, 320, 3, 3)
    assert sd["middle_block.1.proj_in.weight"].shape == (1280, 1280, 1, 1)
    assert sd["output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd["output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd["output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight"].shape == (2560, 320)
    assert sd["out.2.weight"].shape == (4, 320, 3, 3)
    assert "input_blocks.1.0.skip_connection.weight" not in sd


def test_sd21_uses_linear_projections_and_64_channel_heads() -> None:
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.sd21())
    assert unet.state_dict()["input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    heads = [m.heads for name, m in unet.named_modules() if name.endswith("attn1")]
    assert heads[:3] == [5, 5, 10] and max(heads) == 20
    assert {m.head_dim for name, m in unet.named_modules() if name.endswith("attn2")} == {64}


def test_presets_and_dict_round_trip() -> None:
    assert UNetConfig.sd21_v() == dataclasses.replace(UNetConfig.sd21(), sample_size=96)
    assert UNetConfig.sd15_pix2pix().in_channels == 8
    for cfg in (UNetConfig.sd15(), UNetConfig.sd21_v(), UNetConfig.tiny(), PARITY_UNET_SD2):
        assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="frobnicate"):
        UNetConfig.from_dict({**UNetConfig.tiny().to_dict(), "frobnicate": 1})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_heads": None}, "exactly one"),
    ({"head_dim": 64}, "exactly one"),
    ({"attention_levels": (4,)}, r"\[4\]"),
    ({"model_channels": 40}, "norm_groups"),
    ({"num_heads": 7}, "num_heads=7"),
])
def test_config_errors_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UNetConfig(**kwargs)


def test_forward_shape_errors() -> None:
    unet = UNetModel(PARITY_UNET_TINY)
    x, t, context = inputs(PARITY_UNET_TINY, batch=1)
    with pytest.raises(ConfigError, match=r"\(1, 5, 16, 16\)"):
        unet(torch.zeros(1, 5, 16, 16), t, context)
    with pytest.raises(ConfigError, match="context"):
        unet(x, t, torch.zeros(1, 7, 3))
    with pytest.raises(ConfigError, match="down residuals"):
        unet(x, t, context, down_residuals=[x])
    with pytest.raises(ConfigError, match="slice"):
        unet.set_attention_slice(0)
