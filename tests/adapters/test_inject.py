"""Adapters on a whole (small) model: every kind at once, merge/unmerge, multipliers, stacking, training."""

from __future__ import annotations

import pytest
import torch

from nijimi.adapters.inject import (
    adapted_layers,
    adapter_names,
    adapter_parameters,
    apply_adapter,
    get_adapter,
    inject,
    merge_adapters,
    remove_adapter,
    unmerge_adapters,
)
from nijimi.adapters.modules import AdaptedLayer
from nijimi.adapters.targets import AdapterSpec
from nijimi.adapters.weights import Adapter, ModuleWeights
from nijimi.errors import CheckpointError, ConfigError
from nijimi.models.ldm import LatentDiffusion

U = "model.diffusion_model."
T = "cond_stage_model.transformer.text_model.encoder.layers."
BLOCK = U + "input_blocks.1.1.transformer_blocks.0."
# One module per kind and layout, over the U-Net and the text encoder of the small model.
EVERY_KIND = {
    BLOCK + "attn1.to_q": "lora", BLOCK + "attn1.to_k": "dora", BLOCK + "attn2.to_v": "loha",
    BLOCK + "ff.net.2": "lokr", BLOCK + "ff.net.0.proj": "glora", BLOCK + "attn1.to_out.0": "full",
    U + "input_blocks.1.1.proj_in": "ia3", U + "input_blocks.1.0.in_layers.2": "lora",
    U + "input_blocks.1.0.out_layers.3": "lora-tucker", U + "input_blocks.2.0.op": "oft",
    U + "output_blocks.0.0.in_layers.2": "boft", U + "input_blocks.1.1.norm": "norm", BLOCK + "norm1": "norm",
    U + "output_blocks.1.1.proj_out": "loha", U + "middle_block.1.transformer_blocks.0.attn2.to_q": "oft-diag",
    T + "0.self_attn.q_proj": "lora", T + "0.mlp.fc1": "loha", T + "1.self_attn.out_proj": "dora",
}


@pytest.fixture
def model(small, randomize) -> LatentDiffusion:
    model = LatentDiffusion(small.model).eval()
    randomize(model, 0)
    return model


def every_kind(model: LatentDiffusion, random_weights, seed: int = 1) -> Adapter:
    return Adapter({path: random_weights(kind, model.get_submodule(path), seed + i)
                    for i, (path, kind) in enumerate(EVERY_KIND.items())})


def outputs(model: LatentDiffusion, unet_inputs, token_ids) -> tuple[torch.Tensor, torch.Tensor]:
    x, t, context = unet_inputs(model.config.unet)
    with torch.no_grad():
        return model.unet(x, t, context), model.text_encoder(token_ids(model.config.text))


def test_merge_then_unmerge_restores_the_weights(model, random_weights, rel_err, unet_inputs, token_ids) -> None:
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base = outputs(model, unet_inputs, token_ids)
    assert apply_adapter(model, every_kind(model, random_weights), "all_kinds") == {}
    adapted = outputs(model, unet_inputs, token_ids)
    assert rel_err(adapted[0], base[0]) > 0.02 and rel_err(adapted[1], base[1]) > 0.02
    merge_adapters(model)
    changed = [k for k, v in model.state_dict().items() if "adapters" not in k and ".base." in k
               and not torch.equal(v, original[k.replace(".base.", ".")])]
    assert len(changed) == len(EVERY_KIND) + 3  # every adapted weight, and the biases of full and two norms
    merged = outputs(model, unet_inputs, token_ids)
    assert rel_err(merged[0], adapted[0]) <= 1e-5 and rel_err(merged[1], adapted[1]) <= 1e-5
    unmerge_adapters(model)
    remove_adapter(model)
    assert model.state_dict().keys() == original.keys()
    worst = max((v - original[k]).abs().max().item() for k, v in model.state_dict().items())
    assert worst <= 1e-6


def test_multiplier_zero_is_the_base_model(model, random_weights, unet_inputs, token_ids) -> None:
    base = outputs(model, unet_inputs, token_ids)
    apply_adapter(model, every_kind(model, random_weights), multiplier=0.0)
    got = outputs(model, unet_inputs, token_ids)
    assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])


def test_stacking_adds_the_updates(model, random_weights, rel_err, unet_inputs, token_ids, small) -> None:
    first = every_kind(model, random_weights, seed=1)
    second = Adapter({p: random_weights("lora", model.get_submodule(p), 50 + i)
                      for i, p in enumerate(EVERY_KIND) if EVERY_KIND[p] not in ("norm",)})
    expected = LatentDiffusion(small.model).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for adapter, m in ((first, 0.7), (second, -0.4)):
        for path, weights in adapter.modules.items():  # ΔW of each, on the unmodified base weights
            base = model.state_dict()[f"{path}.weight"]
            state[f"{path}.weight"] = state[f"{path}.weight"] + m * weights.delta(base)
            if weights.bias_delta() is not None:
                state[f"{path}.bias"] = state[f"{path}.bias"] + m * weights.bias_delta()
    expected.load_state_dict(state)
    apply_adapter(model, first, "first", 0.7)
    apply_adapter(model, second, "second", -0.4)
    assert adapter_names(model) == ["first", "second"]
    got, want = outputs(model, unet_inputs, token_ids), outputs(expected, unet_inputs, token_ids)
    assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5
    merge_adapters(model)  # both computed on the weights before the merge, as the live stack does
    merged = outputs(model, unet_inputs, token_ids)
    assert rel_err(merged[0], want[0]) <= 1e-5 and rel_err(merged[1], want[1]) <= 1e-5


def test_text_encoder_and_unet_multipliers(model, random_weights, unet_inputs, token_ids, rel_err) -> None:
    base = outputs(model, unet_inputs, token_ids)
    apply_adapter(model, every_kind(model, random_weights), "a", unet_multiplier=1.0, te_multiplier=0.0)
    unet_only = outputs(model, unet_inputs, token_ids)
    assert torch.equal(unet_only[1], base[1]) and rel_err(unet_only[0], base[0]) > 0.02
    remove_adapter(model, "a")
    apply_adapter(model, every_kind(model, random_weights), "a", unet_multiplier=0.0, te_multiplier=1.0)
    text_only = outputs(model, unet_inputs, token_ids)
    assert torch.equal(text_only[0], base[0]) and rel_err(text_only[1], base[1]) > 0.02


def test_remove_puts_back_the_same_layer_objects_and_merge_remove_bakes(model, random_weights, unet_inputs,
                                                                       token_ids, rel_err) -> None:
    layers = {p: model.get_submodule(p) for p in EVERY_KIND}
    apply_adapter(model, every_kind(model, random_weights))
    assert all(isinstance(model.get_submodule(p), AdaptedLayer) for p in EVERY_KIND)
    adapted = outputs(model, unet_inputs, token_ids)
    merge_adapters(model)
    remove_adapter(model, "default")
    assert all(model.get_submodule(p) is layer for p, layer in layers.items())
    baked = outputs(model, unet_inputs, token_ids)
    assert rel_err(baked[0], adapted[0]) <= 1e-5


def test_errors_name_the_module(model, random_weights) -> None:
    q = BLOCK + "attn1.to_q"
    good = random_weights("lora", model.get_submodule(q))
    with pytest.raises(CheckpointError, match="nowhere.to_q: the module is not in the model"):
        apply_adapter(model, Adapter({"nowhere.to_q": good, q: good}))
    wrong = random_weights("lora", model.get_submodule(BLOCK + "ff.net.2"))
    with pytest.raises(CheckpointError, match=r"attn1.to_q: lora adapter .*does not fit the weight \(32, 32\)"):
        apply_adapter(model, Adapter({q: wrong}))
    k = BLOCK + "attn1.to_k"
    skipped = apply_adapter(model, Adapter({q: wrong, k: good}), "partial", strict=False)
    assert list(skipped) == [q] and "does not fit" in skipped[q]
    assert [p for p, layer in adapted_layers(model) if "partial" in layer.adapters] == [k]
    with pytest.raises(CheckpointError, match="no module of the adapter fits"):
        apply_adapter(model, Adapter({q: wrong}), "none", strict=False)
    norm = random_weights("norm", model.get_submodule(BLOCK + "norm1"))
    with pytest.raises(CheckpointError, match="a norm adapter cannot sit on a Linear"):
        apply_adapter(model, Adapter({q: norm}))
    ok = Adapter({q: random_weights("lora", model.get_submodule(q))})
    apply_adapter(model, ok, "x")
    with pytest.raises(ConfigError, match="the model already has an adapter named 'x'"):
        apply_adapter(model, ok, "x")
    with pytest.raises(ConfigError, match="without dots"):
        apply_adapter(model, ok, "my.lora")
    with pytest.raises(ConfigError, match="'train' is reserved"):
        apply_adapter(model, ok, "train")
    with pytest.raises(ConfigError, match=r"no adapter named \['y'\]"):
        merge_adapters(model, ["y"])


def test_inject_trains_only_the_adapter(model, unet_inputs, token_ids, rel_err) -> None:
    base = outputs(model, unet_inputs, token_ids)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    paths = inject(model, AdapterSpec(rank=2, targets="all"), "trained", torch.Generator().manual_seed(0))
    assert len(paths) == len(get_adapter(model, "trained").modules) > 50
    start = outputs(model, unet_inputs, token_ids)
    # A new adapter changes nothing (up to the rounding of convolutions over a freshly allocated weight).
    assert rel_err(start[0], base[0]) <= 1e-6 and rel_err(start[1], base[1]) <= 1e-6
    params = adapter_parameters(model, "trained")
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    optimizer = torch.optim.SGD(params, lr=0.1)
    x, t, context = unet_inputs(model.config.unet)
    for _ in range(2):
        optimizer.zero_grad()
        loss = model.unet(x, t, model.text_encoder(token_ids(model.config.text))[:, :5]).square().mean()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    trained = outputs(model, unet_inputs, token_ids)
    assert rel_err(trained[0], base[0]) > 1e-3
    saved = get_adapter(model, "trained")
    remove_adapter(model)
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())  # base weights untouched
    apply_adapter(model, saved, "trained")
    resumed = outputs(model, unet_inputs, token_ids)
    assert rel_err(resumed[0], trained[0]) <= 1e-6 and rel_err(resumed[1], trained[1]) <= 1e-6


def test_inject_dora_loha_lokr_start_as_identity(model, unet_inputs, token_ids) -> None:
    base = outputs(model, unet_inputs, token_ids)
    for i, spec in enumerate([AdapterSpec("lora", dora=True, targets="attn"), AdapterSpec("loha", tucker=True,
                             targets="all"), AdapterSpec("lokr", rank=2, targets="all-linear")]):
        inject(model, spec, f"a{i}", torch.Generator().manual_seed(i))
    got = outputs(model, unet_inputs, token_ids)
    assert (got[0] - base[0]).abs().max() <= 1e-5 * base[0].abs().max()  # DoRA: m·W/‖W‖ = W up to rounding
    assert (got[1] - base[1]).abs().max() <= 1e-5 * base[1].abs().max()


def test_get_adapter_returns_what_was_applied(model, random_weights) -> None:
    adapter = every_kind(model, random_weights)
    apply_adapter(model, adapter, dtype=torch.float64)
    back = get_adapter(model)
    assert back.modules.keys() == adapter.modules.keys()
    for path, weights in adapter.modules.items():
        got: ModuleWeights = back.modules[path]
        assert (got.kind, got.alpha, got.scale) == (weights.kind, weights.alpha, weights.scale)
        for name, tensor in weights.tensors.items():
            assert got.tensors[name].dtype == (torch.float64 if tensor.is_floating_point() else tensor.dtype)
            assert torch.equal(got.tensors[name].to(tensor.dtype), tensor)
