"""extract, resize, describe and load: SVD results against numpy's SVD, end-to-end behaviour on a small model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nijimi.adapters.formats import read_adapter, save_adapter
from nijimi.adapters.inject import adapter_names, apply_adapter
from nijimi.adapters.tools import describe_adapter, extract_lora, resize_lora
from nijimi.adapters.weights import Adapter, ModuleWeights
from nijimi.errors import CheckpointError, ConfigError
from nijimi.models.ldm import LatentDiffusion

U = "model.diffusion_model."
Q = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
CONV = U + "input_blocks.1.0.in_layers.2"
FC = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2"


@pytest.fixture
def model(small, randomize) -> LatentDiffusion:
    model = LatentDiffusion(small.model).eval()
    randomize(model, 0)
    return model


def best_rank_error(delta: torch.Tensor, rank: int) -> float:
    """Frobenius error of the best rank-``rank`` approximation (Eckart–Young), from numpy's SVD in float64."""
    s = np.linalg.svd(delta.reshape(delta.shape[0], -1).double().numpy(), compute_uv=False)
    return float(np.sqrt((s[rank:] ** 2).sum()))


def low_rank(shape: tuple[int, ...], rank: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cols = int(np.prod(shape[1:]))
    return (torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, cols, generator=gen) * 0.05).reshape(shape)


def tuned_copy(model: LatentDiffusion) -> tuple[LatentDiffusion, dict[str, torch.Tensor]]:
    """A copy with rank-3 changes to a Linear, a 3×3 convolution and a text-encoder Linear; the changes."""
    tuned = copy.deepcopy(model)
    changes = {}
    with torch.no_grad():
        for i, path in enumerate((Q, CONV, FC)):
            weight = tuned.get_submodule(path).weight
            changes[path] = low_rank(tuple(weight.shape), 3, i)
            weight.add_(changes[path])
    return tuned, changes


def test_extract_recovers_low_rank_changes_and_is_optimal_below(model, rel_err, unet_inputs) -> None:
    tuned, changes = tuned_copy(model)
    exact = extract_lora(model, tuned, rank=3, targets="all")
    assert sorted(exact.modules) == sorted(changes)  # unchanged layers are left out
    for path, change in changes.items():
        got = exact.modules[path].delta(model.get_submodule(path).weight)
        assert rel_err(got, change) <= 1e-5
    assert exact.modules[CONV].tensors["lora_down"].shape == (3, 32, 3, 3)
    assert exact.modules[CONV].tensors["lora_up"].shape == (32, 3, 1, 1)
    truncated = extract_lora(model, tuned, rank=2, targets="all", conv_rank=1)
    for path, change in changes.items():
        rank = 1 if path == CONV else 2
        error = (truncated.modules[path].delta(model.get_submodule(path).weight) - change).norm().item()
        assert error == pytest.approx(best_rank_error(change, rank), rel=1e-4)
    apply_adapter(model, exact)
    x, t, context = unet_inputs(model.config.unet)
    with torch.no_grad():
        assert rel_err(model.unet(x, t, context), tuned.unet(x, t, context)) <= 1e-5


def test_extract_errors(model, small) -> None:
    other = LatentDiffusion(small.model)
    with pytest.raises(ConfigError, match="rank must be ≥ 1"):
        extract_lora(model, other, rank=0)
    with pytest.raises(CheckpointError, match="the tuned model has no layer"):
        extract_lora(model, other.unet, rank=2)


def lora(rank: int, out: int, inp: int, alpha: float, seed: int) -> ModuleWeights:
    gen = torch.Generator().manual_seed(seed)
    return ModuleWeights("lora", {"lora_down": torch.randn(rank, inp, generator=gen) * 0.1,
                                  "lora_up": torch.randn(out, rank, generator=gen) * 0.1}, alpha)


def test_resize_keeps_the_scale_and_is_the_best_approximation(small, model) -> None:
    big, kept = lora(6, 32, 32, alpha=3.0, seed=0), lora(2, 24, 48, alpha=1.0, seed=1)
    loha = ModuleWeights("loha", {"hada_w1_a": torch.randn(32, 4), "hada_w1_b": torch.randn(4, 32 * 9),
                                  "hada_w2_a": torch.randn(32, 4), "hada_w2_b": torch.randn(4, 32 * 9)}, alpha=2.0)
    dora = lora(5, 32, 32, alpha=5.0, seed=2)
    dora.tensors["dora_scale"] = torch.rand(32, 1) + 0.5
    ia3 = ModuleWeights("ia3", {"weight": torch.randn(32), "on_input": torch.tensor(False)})
    k = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_k"
    proj = U + "input_blocks.1.1.proj_in"
    adapter = Adapter({Q: big, FC: kept, CONV: loha, k: dora, proj: ia3}, {"ss_network_dim": "6"})
    resized = resize_lora(adapter, 3, small.model)
    assert resized.modules[FC] is kept and resized.modules[proj] is ia3
    assert resized.metadata == {"ss_network_dim": "6"}
    small_q = resized.modules[Q]
    assert small_q.rank == 3 and small_q.effective_scale == pytest.approx(big.effective_scale)
    weight = torch.zeros(32, 32)
    error = (small_q.delta(weight) - big.delta(weight)).norm().item()
    assert error == pytest.approx(best_rank_error(big.delta(weight), 3), rel=1e-4)
    conv = resized.modules[CONV]
    assert conv.kind == "lora" and conv.tensors["lora_down"].shape == (3, 32, 3, 3)
    conv_error = (conv.delta(torch.zeros(32, 32, 3, 3)) - loha.delta(torch.zeros(32, 32, 3, 3))).norm().item()
    assert conv_error == pytest.approx(best_rank_error(loha.delta(torch.zeros(32, 32, 3, 3)), 3), rel=1e-4)
    assert torch.equal(resized.modules[k].tensors["dora_scale"], dora.tensors["dora_scale"])
    with pytest.raises(ConfigError, match="pass the model config"):
        resize_lora(Adapter({CONV: loha}), 3)
    with pytest.raises(ConfigError, match="resize rank must be ≥ 1"):
        resize_lora(adapter, 0)


def test_describe_adapter(model, small, random_weights, tmp_path) -> None:
    adapter = Adapter({Q: random_weights("lora", model.get_submodule(Q)),
                       CONV: random_weights("dora", model.get_submodule(CONV)),
                       FC: random_weights("lora", model.get_submodule(FC))},
                      {"ss_tag_frequency": "x" * 500})
    save_adapter(adapter, tmp_path / "ink.safetensors", small.model)
    text = describe_adapter(tmp_path / "ink.safetensors", small.model)
    lines = text.splitlines()
    assert lines[1] == "format: kohya (lycoris.kohya)"
    assert "modules: 3 (U-Net ×2, text encoder ×1)" in lines
    assert "kinds: lora ×2, lora+dora ×1" in lines
    assert "ranks: 2 ×3" in lines and "alphas: 1.5 ×3" in lines
    assert "fits the model: 3 modules, 0 keys unmatched" in lines
    assert "  ss_network_dim: 2" in lines and "  ss_output_name: ink" in lines
    assert f"  ss_tag_frequency: {'x' * 200}… (500 characters)" in lines
    assert "fits the model" not in describe_adapter(tmp_path / "ink.safetensors")


def test_adapter_file_applies_with_a1111_multipliers(model, small, random_weights, rel_err, unet_inputs, token_ids,
                                                      tmp_path) -> None:
    adapter = Adapter({Q: random_weights("lora", model.get_submodule(Q)),
                       FC: random_weights("lora", model.get_submodule(FC))})
    save_adapter(adapter, tmp_path / "my.style.safetensors", small.model)
    x, t, context = unet_inputs(small.unet)
    ids = token_ids(small.text)
    with torch.no_grad():
        base_unet, base_text = model.unet(x, t, context), model.text_encoder(ids)
    loaded = read_adapter(tmp_path / "my.style.safetensors", small.model)
    apply_adapter(model, loaded.adapter, "my_style", unet_multiplier=0.8, te_multiplier=0.0, strict=False)
    assert adapter_names(model) == ["my_style"] and not loaded.unmatched
    with torch.no_grad():
        assert torch.equal(model.text_encoder(ids), base_text)
        assert rel_err(model.unet(x, t, context), base_unet) > 1e-3
    misfit = Adapter({Q: random_weights("lora", model.get_submodule(FC)), FC: adapter.modules[FC]})
    save_adapter(misfit, tmp_path / "misfit.safetensors", small.model)
    partial = read_adapter(tmp_path / "misfit.safetensors", small.model).adapter
    skipped = apply_adapter(model, partial, "misfit", strict=False)
    assert list(skipped) == [Q] and "does not fit the weight (32, 32)" in skipped[Q]
    with pytest.raises(CheckpointError, match="1 adapter modules do not fit"):
        apply_adapter(model, partial, "strict", strict=True)
    reference = LatentDiffusion(small.model).eval()
    reference.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items()
                               if ".adapters." not in k})
    apply_adapter(reference, loaded.adapter, multiplier=0.8, te_multiplier=0.0)
    with torch.no_grad():
        assert rel_err(reference.unet(x, t, context), model.unet(x, t, context)) <= 1e-6
