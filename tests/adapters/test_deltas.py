"""The ΔW formulas against independent computations: explicit sums, the layers they stand for, known properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lokr.layer import factorization as peft_factorization

from nijimi.adapters import deltas
from nijimi.errors import CheckpointError


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_lora_linear_and_kohya_conv_layouts() -> None:
    down, up = randn(3, 5), randn(4, 3, seed=1)
    assert torch.allclose(deltas.lora_delta(down, up, torch.Size((4, 5))), up @ down)
    # kohya's conv layout: down is a k×k convolution, up a 1×1 convolution; ΔW is their composition.
    down4, up4 = randn(3, 5, 3, 3, seed=2), randn(4, 3, 1, 1, seed=3)
    delta = deltas.lora_delta(down4, up4, torch.Size((4, 5, 3, 3)))
    x = randn(2, 5, 7, 7, seed=4)
    composed = F.conv2d(F.conv2d(x, down4, padding=1), up4)
    assert torch.allclose(F.conv2d(x, delta, padding=1), composed, atol=1e-12)


def test_lora_tucker_mid_is_down_mid_up_convolutions() -> None:
    down, mid, up = randn(3, 5, 1, 1), randn(3, 3, 3, 3, seed=1), randn(4, 3, 1, 1, seed=2)
    delta = deltas.lora_delta(down, up, torch.Size((4, 5, 3, 3)), mid)
    x = randn(2, 5, 6, 6, seed=3)
    composed = F.conv2d(F.conv2d(F.conv2d(x, down), mid, stride=2, padding=1), up)
    assert torch.allclose(F.conv2d(x, delta, stride=2, padding=1), composed, atol=1e-12)


def test_tucker_is_the_explicit_double_sum() -> None:
    core, wa, wb = randn(2, 3, 3, 3), randn(2, 4, seed=1), randn(3, 5, seed=2)
    want = torch.zeros(4, 5, 3, 3, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            want += core[i, j][None, None] * wa[i][:, None, None, None] * wb[j][None, :, None, None]
    assert torch.allclose(deltas.tucker(core, wa, wb), want)


def test_loha_is_the_hadamard_product_of_two_low_rank_products() -> None:
    w1a, w1b, w2a, w2b = randn(6, 2), randn(2, 4 * 9, seed=1), randn(6, 2, seed=2), randn(2, 4 * 9, seed=3)
    shape = torch.Size((6, 4, 3, 3))
    want = ((w1a @ w1b) * (w2a @ w2b)).reshape(shape)
    assert torch.allclose(deltas.loha_delta(w1a, w1b, w2a, w2b, shape), want)
    t1, t2 = randn(2, 2, 3, 3, seed=4), randn(2, 2, 3, 3, seed=5)
    a1, b1, a2, b2 = randn(2, 6, seed=6), randn(2, 4, seed=7), randn(2, 6, seed=8), randn(2, 4, seed=9)
    tucker = deltas.loha_delta(a1, b1, a2, b2, shape, t1, t2)
    assert torch.allclose(tucker, deltas.tucker(t1, a1, b1) * deltas.tucker(t2, a2, b2))


def test_lokr_blocks_are_scaled_copies_of_the_second_factor() -> None:
    w1, w2 = randn(2, 3), randn(4, 5, seed=1)
    delta = deltas.lokr_delta(w1, w2, torch.Size((8, 15)))
    for i in range(2):
        for k in range(3):
            assert torch.allclose(delta[4 * i:4 * i + 4, 5 * k:5 * k + 5], w1[i, k] * w2)
    # A 4-D second factor: w1 acts on the channel blocks, the kernel comes from w2; the flattened form agrees.
    w2c = randn(4, 5, 3, 3, seed=2)
    conv = deltas.lokr_delta(w1, w2c, torch.Size((8, 15, 3, 3)))
    assert torch.allclose(conv[4:8, 5:10], w1[1, 1] * w2c)
    assert torch.allclose(deltas.lokr_delta(w1, w2c.reshape(4, 45), torch.Size((8, 15, 3, 3))), conv)


def test_ia3_scales_rows_or_columns() -> None:
    w, gains_out, gains_in = randn(4, 3, 3, 3), randn(4, seed=1), randn(3, seed=2)
    assert torch.allclose(deltas.ia3_delta(w, gains_out, on_input=False), w * gains_out[:, None, None, None])
    assert torch.allclose(deltas.ia3_delta(w, gains_in, on_input=True), w * gains_in[None, :, None, None])


def test_glora_formula_on_linear_and_kxk_weights() -> None:
    w, a1, a2, b1, b2 = randn(6, 5), randn(2, 5, seed=1), randn(5, 2, seed=2), randn(2, 5, seed=3), randn(6, 2, seed=4)
    assert torch.allclose(deltas.glora_delta(w, a1, a2, b1, b2), b2 @ b1 + w @ a2 @ a1)
    conv, b1_conv = randn(6, 5, 3, 3, seed=5), randn(2, 5, 3, 3, seed=6)
    got = deltas.glora_delta(conv, a1, a2, b1_conv, b2)
    for y, x in ((0, 0), (1, 2)):  # every tap: its own W·a2·a1, plus its slice of b2·b1
        assert torch.allclose(got[..., y, x], b2 @ b1_conv[..., y, x] + conv[..., y, x] @ a2 @ a1, atol=1e-5)
    with pytest.raises(CheckpointError, match="GLoRA factors"):
        deltas.glora_delta(conv, a1, a2, b1, b2)  # a Linear's b1 on a 3×3 weight


def test_cayley_blocks_are_orthogonal_and_constrained() -> None:
    blocks = randn(3, 4, 4)
    rotations = deltas.cayley(blocks, constraint=0.0)
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(rotations @ rotations.transpose(-1, -2), eye.expand(3, 4, 4), atol=1e-12)
    # COFT: the skew part is shrunk to the constraint's norm before the transform.
    q = blocks - blocks.transpose(-1, -2)
    shrunk = q * (0.5 + 1e-8) / (q.norm() + 1e-8)
    want = (eye + shrunk) @ torch.linalg.inv(eye - shrunk)
    assert torch.allclose(deltas.cayley(blocks, constraint=0.5), want)


def test_oft_rotates_blocks_of_output_rows() -> None:
    w = randn(8, 5)
    rotations = deltas.cayley(randn(2, 4, 4, seed=1), 0.0)
    rotated = w + deltas.oft_delta(w, rotations)
    assert torch.allclose(rotated, torch.block_diag(*rotations).T @ w)
    assert torch.allclose(rotated.norm(dim=0), w.norm(dim=0))  # an orthogonal map keeps column norms


def test_boft_one_stage_is_a_permuted_block_rotation() -> None:
    w = randn(8, 3)
    rotations = deltas.cayley(randn(1, 2, 4, 4, seed=1), 0.0)
    # stage 0 groups rows (c, g, k) → (c, k, g) with k = b/2 = 2: rows 0,2,1,3 | 4,6,5,7 form the blocks.
    perm = torch.tensor([0, 2, 1, 3, 4, 6, 5, 7])
    p = torch.eye(8, dtype=torch.float64)[perm]
    want = p.T @ torch.block_diag(*rotations[0]) @ p @ w
    assert torch.allclose(w + deltas.boft_delta(w, rotations), want)
    two_stages = deltas.cayley(randn(2, 2, 4, 4, seed=2), 0.0)
    assert torch.allclose((w + deltas.boft_delta(w, two_stages)).norm(dim=0), w.norm(dim=0))


@pytest.mark.parametrize("per_output", [True, False])
def test_dora_gives_the_stored_magnitudes(per_output: bool) -> None:
    w, d = randn(6, 4, 3, 3), 0.1 * randn(6, 4, 3, 3, seed=1)
    magnitude = randn(6, 1, 1, 1, seed=2).abs() if per_output else randn(1, 4, 1, 1, seed=2).abs()
    adapted = w + deltas.dora_delta(w, d, magnitude)
    got = deltas.column_norm(adapted, per_output)
    assert torch.allclose(got, magnitude)
    direction = (w + d) / deltas.column_norm(w + d, per_output)
    assert torch.allclose(adapted / magnitude, direction)
    with pytest.raises(CheckpointError, match="DoRA magnitude"):
        deltas.dora_delta(w, d, randn(5))


def test_dora_detached_norm_drops_the_norm_gradient() -> None:
    w = randn(4, 3)
    d = (0.1 * randn(4, 3, seed=1)).requires_grad_()
    magnitude = randn(4, 1, seed=2).abs()
    (g_full,) = torch.autograd.grad(deltas.dora_delta(w, d, magnitude).sum(), d)
    (g_detached,) = torch.autograd.grad(deltas.dora_delta(w, d, magnitude, detach_norm=True).sum(), d)
    norm = deltas.column_norm(w + d.detach(), True)
    assert torch.allclose(g_detached, (magnitude / norm).expand(4, 3))  # d/dΔ of m·(W+Δ)/c with c constant
    assert not torch.allclose(g_full, g_detached)


def test_module_delta_scales_before_dora_as_a1111() -> None:
    down, up, w = randn(2, 5), randn(4, 2, seed=1), randn(4, 5, seed=2)
    magnitude = randn(1, 5, seed=3).abs()  # early LyCORIS: one magnitude per input column, as A1111 computes it
    got = deltas.module_delta("lora", {"lora_down": down, "lora_up": up, "dora_scale": magnitude}, w, 0.25)
    merged = w + 0.25 * up @ down
    column_norms = merged.transpose(0, 1).reshape(5, -1).norm(dim=1, keepdim=True).reshape(5, 1).transpose(0, 1)
    assert torch.allclose(got, merged * (magnitude / column_norms) - w)


def test_bias_delta_of_full_and_norm_kinds() -> None:
    b = randn(4)
    assert torch.equal(deltas.bias_delta("full", {"diff": randn(4, 3), "diff_b": b}, 1.0), b)
    assert torch.equal(deltas.bias_delta("norm", {"w_norm": randn(4), "b_norm": b}, 2.0), 2 * b)
    assert deltas.bias_delta("lora", {"lora_down": randn(1, 3), "lora_up": randn(4, 1)}, 1.0) is None
    with pytest.raises(CheckpointError, match="unknown adapter kind 'dylora'"):
        deltas.raw_delta("dylora", {}, randn(4, 3), None)


@pytest.mark.parametrize("factor", [-1, 2, 4, 8])
def test_factorization_matches_peft_and_lycoris_examples(factor: int) -> None:
    for dimension in (127, 128, 250, 320, 360, 512, 768, 1024, 1280):
        m, n = deltas.factorization(dimension, factor)
        assert (m, n) == tuple(sorted(peft_factorization(dimension, factor)))
        assert m * n == dimension and m <= n
    # LyCORIS's documented examples (lycoris/modules/lokr.py)
    assert deltas.factorization(128, 16) == (8, 16)
    assert deltas.factorization(360, -1) == (18, 20)
    assert deltas.factorization(250, 8) == (5, 50)
