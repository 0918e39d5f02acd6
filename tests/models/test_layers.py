"""Shared layers against their formulas: timestep embedding, the CPU convolution paths, GEGLU, attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nijimi.models.layers import GEGLU, Attention, Conv2d, GroupNorm32, SpatialTransformer, timestep_embedding


def test_timestep_embedding_formula() -> None:
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = [10000 ** (-k / 4) for k in range(4)]
    want = [math.cos(999 * f) for f in freqs] + [math.sin(999 * f) for f in freqs]
    assert torch.allclose(emb[2], torch.tensor(want), atol=1e-4)
    assert torch.allclose(timestep_embedding(torch.tensor([0.5]), 8), timestep_embedding(torch.tensor([0.5]), 9)[:, :8])
    assert timestep_embedding(t, 9)[:, 8].abs().sum() == 0


@pytest.mark.parametrize(("c_in", "c_out", "kernel", "stride", "padding", "size", "batch"), [
    (6, 5, 1, 1, 0, 7, 2),      # 1×1: always one GEMM
    (6, 64, 3, 1, 1, 4, 2),     # few output pixels: unfold + GEMM
    (6, 64, 3, 2, 1, 8, 1),     # strided, few output pixels
    (6, 8, 3, 1, 1, 16, 2),     # many output pixels: oneDNN
])
def test_conv2d_paths_match_reference(c_in: int, c_out: int, kernel: int, stride: int, padding: int, size: int,
                                      batch: int) -> None:
    gen = torch.Generator().manual_seed(0)
    conv = Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)
    x = torch.randn(batch, c_in, size, size, generator=gen, requires_grad=True)
    got = conv(x)
    want = F.conv2d(x, conv.weight, conv.bias, stride, padding)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    (grad_want,) = torch.autograd.grad(want.square().sum(), x)
    assert torch.allclose(grad_got, grad_want, atol=1e-4, rtol=1e-4)


def test_geglu_formula_and_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    layer = GEGLU(6, 4)
    x = torch.randn(2, 3, 6, generator=gen, requires_grad=True)
    a, gate = F.linear(x, layer.proj.weight, layer.proj.bias).chunk(2, dim=-1)
    want = a * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    got = layer(x)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0], atol=1e-5)


def test_attention_formula_and_slicing() -> None:
    gen = torch.Generator().manual_seed(2)
    attn = Attention(8, heads=2, head_dim=3, context_dim=5)
    x, ctx = torch.randn(2, 7, 8, generator=gen), torch.randn(2, 4, 5, generator=gen)
    q = attn.to_q(x).view(2, 7, 2, 3).transpose(1, 2)
    k = attn.to_k(ctx).view(2, 4, 2, 3).transpose(1, 2)
    v = attn.to_v(ctx).view(2, 4, 2, 3).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(3), dim=-1)
    want = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(2, 7, 6))
    assert torch.allclose(attn(x, ctx), want, atol=1e-6)
    attn.slice_size = 3
    assert torch.allclose(attn(x, ctx), want, atol=1e-6)


def test_group_norm_computes_half_inputs_in_float32() -> None:
    gen = torch.Generator().manual_seed(3)
    norm = GroupNorm32(2, 4)
    x = (100 + torch.randn(1, 4, 3, 3, generator=gen)).bfloat16()
    got = norm(x)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), F.group_norm(x.float(), 2, norm.weight, norm.bias), atol=2e-2)


@pytest.mark.parametrize("linear_proj", [False, True])
def test_spatial_transformer_is_residual_and_keeps_layout(linear_proj: bool) -> None:
    block = SpatialTransformer(32, heads=2, head_dim=16, context_dim=8, linear_proj=linear_proj)
    torch.nn.init.zeros_(block.proj_out.weight)
    torch.nn.init.zeros_(block.proj_out.bias)
    x = torch.randn(2, 32, 4, 5)
    out = block(x, torch.randn(2, 3, 8))
    assert torch.equal(out, x)
    assert out.is_contiguous()
    expected_proj = (32, 32) if linear_proj else (32, 32, 1, 1)
    assert block.state_dict()["proj_in.weight"].shape == expected_proj
