"""Kinds recognised from tensor names, A1111's scale rule, the flat state-dict layout."""

from __future__ import annotations

import pytest
import torch

from nijimi.adapters.weights import Adapter, ModuleWeights, kind_of
from nijimi.errors import CheckpointError


@pytest.mark.parametrize(("names", "kind"), [
    ({"lora_down", "lora_up"}, "lora"),
    ({"lora_down", "lora_up", "lora_mid", "dora_scale"}, "lora"),
    ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}, "loha"),
    ({"lokr_w1", "lokr_w2"}, "lokr"),
    ({"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}, "lokr"),
    ({"diff", "diff_b"}, "full"),
    ({"weight", "on_input"}, "ia3"),
    ({"w_norm", "b_norm"}, "norm"),
    ({"a1", "a2", "b1", "b2"}, "glora"),
    ({"oft_blocks"}, "oft"),
    ({"oft_diag", "rescale"}, "oft"),
    ({"lora_down"}, None),
    ({"lokr_w1", "lokr_w2_a"}, None),
    ({"lora_down", "lora_up", "hada_w1_a"}, None),
])
def test_kind_of(names: set[str], kind: str | None) -> None:
    assert kind_of(names) == kind


def lora(rank: int, alpha: float | None = None, scale: float | None = None) -> ModuleWeights:
    return ModuleWeights("lora", {"lora_down": torch.ones(rank, 6), "lora_up": torch.ones(5, rank)}, alpha, scale)


def test_scale_is_alpha_over_rank_unless_given() -> None:
    assert lora(4, alpha=2.0).effective_scale == 0.5
    assert lora(4).effective_scale == 1.0
    assert lora(4, alpha=2.0, scale=3.0).effective_scale == 3.0
    full = ModuleWeights("lokr", {"lokr_w1": torch.ones(2, 2), "lokr_w2": torch.ones(3, 3)}, alpha=8.0)
    assert full.rank is None and full.effective_scale == 1.0  # LyCORIS: whole factors ignore alpha
    low = ModuleWeights("lokr", {"lokr_w1": torch.ones(2, 2), "lokr_w2_a": torch.ones(3, 2),
                                 "lokr_w2_b": torch.ones(2, 3)}, alpha=8.0)
    assert low.rank == 2 and low.effective_scale == 4.0
    oft = ModuleWeights("oft", {"oft_blocks": torch.zeros(2, 3, 3)}, alpha=1e-3)
    assert oft.effective_scale == 1.0  # OFT's alpha is a constraint, not a scale


def test_delta_applies_scale_on_any_weight_dtype() -> None:
    weights = lora(2, alpha=1.0)
    delta = weights.delta(torch.zeros(5, 6, dtype=torch.float16))
    assert delta.dtype == torch.float32
    assert torch.equal(delta, torch.full((5, 6), 1.0))  # (5×2 ones) @ (2×6 ones) · ½


def test_wrong_names_for_the_kind_are_refused() -> None:
    with pytest.raises(CheckpointError, match="do not make a 'loha'"):
        ModuleWeights("loha", {"lora_down": torch.ones(1, 2), "lora_up": torch.ones(2, 1)})
    with pytest.raises(CheckpointError, match="unet_x: tensors"):
        ModuleWeights.from_flat({"lora_down": torch.ones(1, 2)}, "unet_x")


def test_flat_round_trip_and_counts() -> None:
    adapter = Adapter({"a.b": lora(2, alpha=1.5), "c": ModuleWeights("full", {"diff": torch.ones(2)}, scale=0.5)},
                      {"k": "v"})
    flat = adapter.modules["a.b"].flat()
    assert sorted(flat) == ["alpha", "lora_down", "lora_up"]
    assert flat["alpha"].dtype == torch.float32 and flat["alpha"].item() == 1.5
    assert sorted(adapter.modules["c"].flat()) == ["diff", "scale"]
    back = ModuleWeights.from_flat(flat, "a.b")
    assert back.alpha == 1.5 and ModuleWeights.from_flat(adapter.modules["c"].flat(), "c").scale == 0.5
    assert torch.equal(back.tensors["lora_up"], adapter.modules["a.b"].tensors["lora_up"])
    assert adapter.kinds() == {"lora": 1, "full": 1} and adapter.ranks() == {2: 1, None: 1}


@pytest.mark.parametrize("shape", [(6, 5), (5, 5), (6, 5, 3, 3)])
def test_glora_of_current_lycoris_is_read_into_the_a1111_layout(shape) -> None:
    """LyCORIS ≥ 3 names GLoRA's factors the other way round (``ΔW = W·a1·a2 + b1·b2``); both layouts give one ΔW,
    on square weights too, and the rank alpha is divided by is r either way."""
    gen = torch.Generator().manual_seed(0)
    out, inp, taps = shape[0], shape[1], shape[2:]
    w, r = torch.randn(shape, generator=gen), 2
    a1, a2 = torch.randn(inp, r, generator=gen), torch.randn(r, inp, generator=gen)
    b1, b2 = torch.randn(out, r, generator=gen), torch.randn(r, inp, *taps, generator=gen)
    read = ModuleWeights.from_flat({"a1": a1, "a2": a2, "b1": b1, "b2": b2, "alpha": torch.tensor(1.0)}, "m")
    mixed = torch.einsum("o i ..., i r, r j -> o j ...", w, a1, a2)
    assert torch.allclose(read.delta(w), 0.5 * (mixed + (b1 @ b2.reshape(r, -1)).reshape(shape)), atol=1e-5)
    assert read.rank == r
    old = ModuleWeights.from_flat({"a1": a2, "a2": a1, "b1": b2, "b2": b1}, "m")  # A1111's layout is kept as it is
    assert torch.equal(old.tensors["a1"], a2) and torch.equal(old.tensors["b2"], b1)


def test_lycoris_float_on_input_flag_is_read_as_a_flag() -> None:
    """LyCORIS saves IA³'s ``on_input`` in the file's dtype (1.0 in fp16): it still scales the input columns."""
    w, gains = torch.randn(4, 3), torch.randn(3)
    read = ModuleWeights.from_flat({"weight": gains, "on_input": torch.tensor(1.0, dtype=torch.float16)}, "m")
    assert read.tensors["on_input"].dtype == torch.bool and torch.allclose(read.delta(w), w * gains)
