"""Target presets and patterns on full-size models (meta device), new adapter weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nijimi.adapters.targets import AdapterSpec, new_weights, select_targets
from nijimi.errors import ConfigError
from nijimi.models.ldm import LatentDiffusion, ModelConfig


@pytest.fixture(scope="module")
def sd15() -> LatentDiffusion:
    with torch.device("meta"):
        return LatentDiffusion(ModelConfig.sd15())


def count(paths: list[str]) -> tuple[int, int]:
    """(U-Net targets, text-encoder targets)."""
    unet = sum(p.startswith("model.diffusion_model.") for p in paths)
    return unet, sum(p.startswith("cond_stage_model.transformer.") for p in paths)


def test_presets_on_sd15(sd15: LatentDiffusion) -> None:
    # 16 transformer blocks × 8 attention projections; 12 CLIP layers × 4.
    assert count(select_targets(sd15, "attn")) == (128, 48)
    # kohya's defaults: + proj_in, proj_out, ff.net.0.proj, ff.net.2 per transformer; + fc1, fc2 per CLIP layer.
    assert count(select_targets(sd15, "attn+ff")) == (192, 72)
    # + 2 time_embed and 22 ResBlock emb_layers Linears, 14 ResBlock skip 1×1 convs (2 encoder, 12 decoder).
    assert count(select_targets(sd15, "all-linear")) == (192 + 2 + 22 + 14, 72)
    # + 44 ResBlock 3×3 convs, 3 downsampling and 3 upsampling convs.
    assert count(select_targets(sd15, "all")) == (230 + 44 + 6, 72)
    paths = select_targets(sd15, "all")
    assert "model.diffusion_model.input_blocks.0.0" not in paths and "model.diffusion_model.out.2" not in paths
    assert not any(p.startswith("first_stage_model.") for p in paths)


def test_parts_and_patterns(sd15: LatentDiffusion) -> None:
    assert count(select_targets(sd15, "attn+ff", parts=("unet",))) == (192, 0)
    picked = select_targets(sd15, ["*attn2.to_k", "*attn2.to_v", "*input_blocks.1.1.proj_in"])
    assert len(picked) == 33 and picked[0] == "model.diffusion_model.input_blocks.1.1.proj_in"
    unet = sd15.unet  # a bare U-Net is taken whole
    assert len(select_targets(unet, "attn")) == 128
    with pytest.raises(ConfigError, match=r"'\*nothing\*' matches no adaptable layer"):
        select_targets(sd15, ["*attn1.to_q", "*nothing*"])
    with pytest.raises(ConfigError, match="unknown target preset 'mlp'"):
        select_targets(sd15, "mlp")
    with pytest.raises(ConfigError, match="unknown model parts"):
        select_targets(sd15, "attn", parts=("vae",))


@pytest.mark.parametrize(("spec", "layer", "shapes"), [
    (AdapterSpec(rank=4), nn.Linear(6, 10), {"lora_down": (4, 6), "lora_up": (10, 4)}),
    (AdapterSpec(rank=4), nn.Conv2d(6, 10, 1), {"lora_down": (4, 6, 1, 1), "lora_up": (10, 4, 1, 1)}),
    (AdapterSpec(rank=4, conv_rank=2), nn.Conv2d(6, 10, 3), {"lora_down": (2, 6, 3, 3), "lora_up": (10, 2, 1, 1)}),
    (AdapterSpec(rank=4, tucker=True), nn.Conv2d(6, 10, 3),
     {"lora_down": (4, 6, 1, 1), "lora_mid": (4, 4, 3, 3), "lora_up": (10, 4, 1, 1)}),
    (AdapterSpec("loha", rank=3), nn.Conv2d(6, 10, 3),
     {"hada_w1_a": (10, 3), "hada_w1_b": (3, 54), "hada_w2_a": (10, 3), "hada_w2_b": (3, 54)}),
    (AdapterSpec("loha", rank=3, tucker=True), nn.Conv2d(6, 10, 3),
     {"hada_t1": (3, 3, 3, 3), "hada_w1_a": (3, 10), "hada_w1_b": (3, 6), "hada_t2": (3, 3, 3, 3),
      "hada_w2_a": (3, 10), "hada_w2_b": (3, 6)}),
    (AdapterSpec("lokr", rank=8), nn.Linear(32, 64), {"lokr_w1": (8, 4), "lokr_w2": (8, 8)}),
    (AdapterSpec("lokr", rank=2, decompose_both=True), nn.Linear(32, 64),
     {"lokr_w1_a": (8, 2), "lokr_w1_b": (2, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}),
])
def test_new_weights_shapes_and_identity_start(spec: AdapterSpec, layer: nn.Module, shapes: dict) -> None:
    weights = new_weights(spec, layer, torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in weights.tensors.items()} == shapes
    assert torch.equal(weights.delta(layer.weight.detach()), torch.zeros_like(layer.weight))
    assert any(v.abs().sum() > 0 for v in weights.tensors.values())


def test_new_weights_init_is_he_uniform_seeded_and_dora_starts_at_the_row_norms() -> None:
    layer = nn.Linear(400, 8)
    weights = new_weights(AdapterSpec(rank=64, alpha=16, dora=True), layer, torch.Generator().manual_seed(1))
    down = weights.tensors["lora_down"]
    assert down.abs().max() <= 1 / 400 ** 0.5 and down.abs().max() > 0.9 / 400 ** 0.5
    assert weights.alpha == 16 and weights.effective_scale == 0.25
    assert torch.allclose(weights.tensors["dora_scale"], layer.weight.detach().norm(dim=1, keepdim=True))
    again = new_weights(AdapterSpec(rank=64, alpha=16, dora=True), layer, torch.Generator().manual_seed(1))
    assert torch.equal(again.tensors["lora_down"], down)
    whole = new_weights(AdapterSpec("lokr", rank=8, alpha=4), nn.Linear(32, 64))
    assert whole.rank is None and whole.effective_scale == 0.5  # alpha/rank kept as an explicit scale


def test_spec_errors() -> None:
    with pytest.raises(ConfigError, match="kind must be one of"):
        AdapterSpec("ia3")
    with pytest.raises(ConfigError, match="rank must be ≥ 1, got 0"):
        AdapterSpec(rank=0)
    with pytest.raises(ConfigError, match="Linear or Conv2d"):
        new_weights(AdapterSpec(), nn.LayerNorm(4))
