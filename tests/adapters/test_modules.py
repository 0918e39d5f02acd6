"""One adapted layer: the two output paths, gradients, norms, dtypes, direct weight access."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nijimi.adapters.modules import AdaptedLayer, LayerAdapter
from nijimi.adapters.weights import ModuleWeights
from nijimi.errors import CheckpointError, ConfigError


def adapted(layer: nn.Module, weights: ModuleWeights, multiplier: float = 1.0, trainable: bool = True) -> AdaptedLayer:
    wrapper = AdaptedLayer(layer)
    wrapper.adapters["a"] = LayerAdapter(weights, multiplier, trainable)
    return wrapper


@pytest.mark.parametrize(("layer", "x_shape", "kind"), [
    (nn.Linear(6, 5), (3, 4, 6), "lora"),
    (nn.Conv2d(6, 5, 3, stride=2, padding=1), (2, 6, 7, 7), "lora"),
    (nn.Conv2d(6, 5, 3, padding=1), (2, 6, 7, 7), "lora-tucker"),
])
def test_low_rank_path_equals_the_weight_path_with_gradients(layer, x_shape, kind, random_weights) -> None:
    torch.manual_seed(0)
    weights = random_weights(kind, layer, 3)
    wrapper = adapted(layer, weights, multiplier=0.6)
    x = torch.randn(x_shape)
    out = wrapper(x)  # grad enabled, plain LoRA: base(x) + m·s·up(down(x))
    grads = torch.autograd.grad(out.square().sum(), [wrapper.adapters["a"].lora_down, wrapper.adapters["a"].lora_up])
    down = wrapper.adapters["a"].lora_down.detach().requires_grad_()
    up = wrapper.adapters["a"].lora_up.detach().requires_grad_()
    reference = ModuleWeights("lora", {**weights.tensors, "lora_down": down, "lora_up": up}, weights.alpha)
    w = layer.weight + 0.6 * reference.delta(layer.weight)
    want = F.linear(x, w, layer.bias) if isinstance(layer, nn.Linear) else F.conv2d(
        x, w, layer.bias, layer.stride, layer.padding)
    want_grads = torch.autograd.grad(want.square().sum(), [down, up])
    assert torch.allclose(out, want, atol=1e-5)
    for got, expected in zip(grads, want_grads, strict=True):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(wrapper(x), want, atol=1e-5)  # the weight path
    assert layer.weight.grad is None


def test_norm_layers_take_weight_and_bias_updates(random_weights) -> None:
    for layer, x in ((nn.GroupNorm(2, 6), torch.randn(2, 6, 3, 3)), (nn.LayerNorm(6), torch.randn(2, 4, 6))):
        weights = random_weights("norm", layer, 1)
        wrapper = adapted(layer, weights, multiplier=2.0)
        t = weights.tensors
        if isinstance(layer, nn.GroupNorm):
            want = F.group_norm(x, 2, layer.weight + 2 * t["w_norm"], layer.bias + 2 * t["b_norm"])
        else:
            want = F.layer_norm(x, (6,), layer.weight + 2 * t["w_norm"], layer.bias + 2 * t["b_norm"])
        assert torch.allclose(wrapper(x), want, atol=1e-6)


def test_direct_weight_access_sees_the_adapted_weight(random_weights) -> None:
    conv = nn.Conv2d(4, 6, 1)
    weights = random_weights("loha", conv, 2)
    wrapper = adapted(conv, weights, multiplier=-1.0)
    assert torch.allclose(wrapper.weight, conv.weight - weights.delta(conv.weight))
    assert wrapper.bias is conv.bias  # LoHa leaves the bias alone
    wrapper.adapters["a"].multiplier = 0.0
    assert wrapper.weight is conv.weight


def test_half_precision_base_keeps_its_dtype(random_weights) -> None:
    layer = nn.Linear(8, 8).to(torch.bfloat16)
    weights = random_weights("lora", layer.float(), 4)
    layer.to(torch.bfloat16)
    wrapper = adapted(layer, weights)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        out = wrapper(x)
        want = F.linear(x.float(), layer.weight.float() + weights.delta(layer.weight.float()), layer.bias.float())
    assert wrapper.weight.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert (out.float() - want).abs().max() < 0.05


def test_merge_keeps_the_update_only_when_it_depends_on_the_weight(random_weights) -> None:
    layer = nn.Linear(8, 8)
    wrapper = AdaptedLayer(layer)
    wrapper.adapters["low"] = LayerAdapter(random_weights("lora", layer, 1))
    wrapper.adapters["dora"] = LayerAdapter(random_weights("dora", layer, 2), 0.5)
    wrapper.merge(["low", "dora"])
    assert wrapper.merged["low"] == (1.0, None)
    assert wrapper.merged["dora"][0] == 0.5 and wrapper.merged["dora"][1].shape == (8, 8)
    assert wrapper.active() == []


def test_unsupported_layers_and_biasless_bias_updates(random_weights) -> None:
    with pytest.raises(ConfigError, match="cannot adapt a Embedding"):
        AdaptedLayer(nn.Embedding(4, 4))
    with pytest.raises(ConfigError, match="groups=2"):
        AdaptedLayer(nn.Conv2d(4, 4, 3, groups=2))
    layer = nn.Linear(4, 4, bias=False)
    wrapper = adapted(layer, ModuleWeights("full", {"diff": torch.ones(4, 4), "diff_b": torch.ones(4)}))
    with pytest.raises(CheckpointError, match="changes the bias of a Linear that has none"):
        wrapper(torch.ones(1, 4))
