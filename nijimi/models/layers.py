"""Building blocks shared by the denoising networks: timestep embedding, norms, attention, GEGLU, transformer blocks.

Module and parameter names follow the original Stable Diffusion checkpoints (CompVis ``ldm.modules.attention``), so a
``SpatialTransformer`` here loads the ``...transformer_blocks.0.attn2.to_k.weight`` keys of a real file unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first then sines.

    The transformer position encoding (Vaswani et al., arXiv:1706.03762) applied to the diffusion step, as in DDPM
    (arXiv:2006.11239) and LDM (arXiv:2112.10752): ``[cos(t·ω_k), sin(t·ω_k)]`` with ``ω_k = max_period^(-k/half)``.

    t: (B,) int or float timesteps. Returns (B, dim) float32; an odd ``dim`` gets one zero column at the end.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (half-precision statistics drift), as in the original."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, ...) → same shape and dtype."""
        if x.dtype == torch.float32:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same keys) that runs the U-Net's small CPU convolutions as one matrix product.

    On CPU ``F.conv2d`` goes through oneDNN, which copies the whole weight into its blocked layout on every call.
    When the output has few pixels (B·H'·W' ≤ out_channels / 2: the U-Net's deepest levels) that copy costs more than
    the arithmetic, and for 1×1 kernels it is never needed; there the convolution is computed as
    ``weight (C_out, C_in·k·k) @ unfold(x) (B, C_in·k·k, H'·W')`` — the same sums, measured 1.2× faster at 1280
    channels and 16×16, 2–3× at 8×8 and 4×4. Anything else (GPU, groups, padding modes) is plain ``nn.Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) → (B, C_out, H', W')."""
        if x.device.type != "cpu" or self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        B, C, H, W = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        out_h, out_w = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        pointwise = (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0)
        if not pointwise and 2 * B * out_h * out_w > self.out_channels:
            return super().forward(x)
        cols = x.flatten(2) if pointwise else F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        out = torch.matmul(self.weight.view(self.out_channels, -1), cols)
        if self.bias is not None:
            out += self.bias[:, None]
        return out.view(B, self.out_channels, out_h, out_w)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (arXiv:1706.03762): self-attention, or cross-attention over a context.

    Parameters ``to_q``, ``to_k``, ``to_v`` (no bias) and ``to_out.0``. Runs through
    ``torch.nn.functional.scaled_dot_product_attention``. ``slice_size`` (rows of queries per chunk, ``None`` = all)
    bounds the memory of the attention scores for very long sequences; the result is the same.
    ``upcast`` computes the attention itself in float32 for half-precision inputs (SD 2.x needs it in fp16).
    ``probe`` (None by default: nothing is computed for it) is called as ``probe(q, k)`` with the split heads of
    every call, (B, heads, L, head_dim) and (B, heads, M, head_dim) — how per-token attention maps are read
    (:mod:`nijimi.explain.daam`); the attention itself stays the fused kernel either way.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 upcast: bool = False) -> None:
        super().__init__()
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.head_dim, self.upcast = heads, head_dim, upcast
        self.slice_size: int | None = None
        self.probe: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # A list (not a bare Linear) only to keep the checkpoint key `to_out.0`; the original's `to_out.1` is Dropout.
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, query_dim), context: (B, M, context_dim) or None for self-attention → (B, L, query_dim)."""
        ctx = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(ctx))
        v = self._split_heads(self.to_v(ctx))
        if self.probe is not None:
            self.probe(q, k)
        out = self._attend(q, k, v)
        B, _, L, _ = out.shape
        return self.to_out[0](out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, heads·head_dim) → (B, heads, L, head_dim), a view."""
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (B, h, L, d), k/v: (B, h, M, d) → softmax(q·kᵀ/√d)·v: (B, h, L, d), sliced over L if asked."""
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        if self.slice_size is None or self.slice_size >= q.shape[2]:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            chunks = [F.scaled_dot_product_attention(q_part, k, v) for q_part in q.split(self.slice_size, dim=2)]
            out = torch.cat(chunks, dim=2)
        return out.to(dtype)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer, arXiv:2002.05202): ``a · gelu(g)`` with ``[a, g] = proj(x)``. Param ``proj``.

    The two halves of ``proj`` are applied as two matrix products into separate buffers, then combined in place:
    the same arithmetic as splitting one product, with two fewer (B, L, dim_out) temporaries. It reads
    ``proj.weight``/``proj.bias`` directly, so an adapter wrapping ``proj`` must expose its adapted weight there.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.dim_out = dim_out
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, dim_in) → (B, L, dim_out)."""
        w_a, w_gate = self.proj.weight.split(self.dim_out)
        b_a, b_gate = self.proj.bias.split(self.dim_out)
        gate = torch.ops.aten.gelu_(F.linear(x, w_gate, b_gate))
        return F.linear(x, w_a, b_a).mul_(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward ``dim → mult·dim → dim``. Parameters ``net.0.proj`` (GEGLU) and ``net.2`` (output Linear)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, dim) → (B, L, dim)."""
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block of LDM (arXiv:2112.10752 §3.3): self-attention, cross-attention, GEGLU feed-forward.

    ``x = x + attn1(norm1(x)); x = x + attn2(norm2(x), context); x = x + ff(norm3(x))``.
    Parameters ``attn1``, ``attn2``, ``ff``, ``norm1``, ``norm2``, ``norm3``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0,
                 upcast_attention: bool = False) -> None:
        super().__init__()
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast_attention)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, upcast=upcast_attention)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, L, dim), context: (B, M, context_dim) → (B, L, dim)."""
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a context sequence (LDM, arXiv:2112.10752).

    GroupNorm → ``proj_in`` → ``depth`` transformer blocks over the H·W tokens → ``proj_out`` → + input.
    ``proj_in``/``proj_out`` are 1×1 convolutions (SD 1.x) or Linear layers (SD 2.x, ``linear_proj``); both are
    applied as one matrix product on the token layout, which is the same arithmetic as the 1×1 convolution.
    Parameters ``norm``, ``proj_in``, ``transformer_blocks.{k}``, ``proj_out``.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int, depth: int = 1,
                 linear_proj: bool = False, groups: int = 32, dropout: float = 0.0,
                 upcast_attention: bool = False) -> None:
        super().__init__()
        inner = heads * head_dim
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear_proj else Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, dropout, upcast_attention) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear_proj else Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), context: (B, M, context_dim) → (B, C, H, W)."""
        B, C, H, W = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        tokens = F.linear(tokens, _as_matrix(self.proj_in.weight), self.proj_in.bias)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = F.linear(tokens, _as_matrix(self.proj_out.weight), self.proj_out.bias)
        return x + tokens.view(B, H, W, C).permute(0, 3, 1, 2)  # x first: the sum keeps x's contiguous layout


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A Linear weight (out, in) or a 1×1 convolution weight (out, in, 1, 1) as the (out, in) matrix it applies."""
    return weight.view(weight.shape[0], weight.shape[1])
