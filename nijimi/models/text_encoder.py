"""The CLIP text transformer that turns token ids into the U-Net's cross-attention context.

CLIP (Radford et al., arXiv 2103.00020) encodes text with a pre-LayerNorm causal transformer; Stable Diffusion
(LDM, arXiv 2112.10752) feeds the per-token hidden states, after the final LayerNorm, to the U-Net. SD 1.x uses
OpenAI's CLIP ViT-L/14 text tower (12 layers, quick-GELU) at its last layer; SD 2.x uses OpenCLIP ViT-H/14
(24 layers, GELU) at its penultimate layer. "Clip skip" (A1111 numbering) picks the layer: 1 is the last layer,
2 the penultimate, …; the final LayerNorm is applied to whichever layer is used.

The module tree is the SD 1.x single-file key tree after ``cond_stage_model.transformer.`` (the transformers
``CLIPTextModel`` layout: ``text_model.encoder.layers.3.self_attn.q_proj``). Encoders converted from OpenCLIP
additionally keep ``text_projection.weight`` and ``logit_scale`` (``projection_dim`` set), unused by Stable Diffusion
but carried so a single-file checkpoint round-trips without loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nijimi.errors import ConfigError, PromptError
from nijimi.models.config import StoredConfig

_LN_EPS = 1e-5
_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class TextEncoderConfig(StoredConfig):
    """Shape of a CLIP text transformer.

    ``clip_skip`` is the default layer used (1 = last); ``projection_dim`` is set for encoders that carry
    OpenCLIP's ``text_projection`` and ``logit_scale`` (``None``: no such parameters).
    """

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"
    clip_skip: int = 1
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        self.require_positive(("vocab_size", "max_positions", "width", "num_layers", "num_heads", "mlp_width"))
        if self.width % self.num_heads:
            raise ConfigError(f"TextEncoderConfig: width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"TextEncoderConfig.activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if not 1 <= self.clip_skip <= self.num_layers:
            raise ConfigError(f"TextEncoderConfig.clip_skip must be in [1, {self.num_layers}], got {self.clip_skip}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ConfigError(f"TextEncoderConfig.projection_dim must be >= 1 or None, got {self.projection_dim}")

    @classmethod
    def clip_l(cls) -> TextEncoderConfig:
        """SD 1.x: OpenAI CLIP ViT-L/14 text tower (123.1 M parameters), used at its last layer."""
        return cls()

    @classmethod
    def openclip_h(cls) -> TextEncoderConfig:
        """SD 2.x: OpenCLIP ViT-H/14 text tower (24 layers, GELU), used at its penultimate layer."""
        return cls(
            width=1024, num_layers=24, num_heads=16, mlp_width=4096, activation="gelu", clip_skip=2, projection_dim=1024
        )

    @classmethod
    def tiny(cls) -> TextEncoderConfig:
        """A small encoder over the full CLIP vocabulary, for the embedded model and tests; provisional."""
        return cls(width=256, num_layers=4, num_heads=4, mlp_width=1024)


class TextEncoding(NamedTuple):
    """``hidden``: ``(B, T, width)`` context for the U-Net; ``pooled``: ``(B, width)``, the last layer's final-LN
    state at the end-of-text token (transformers' ``pooler_output``; not projected)."""

    hidden: torch.Tensor
    pooled: torch.Tensor


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: ``x · σ(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


class Embeddings(nn.Module):
    """``token_embedding[ids] + position_embedding[0:T]``; ids from ``vocab_size`` on are rows of ``extra``."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """``ids: (B, T) -> (B, T, width)``. ``extra: (E, width)``: textual-inversion vectors, id ``vocab_size + j``
        is row ``j`` (gradients flow into ``extra``, which is how an embedding is trained)."""
        vocab = self.token_embedding.num_embeddings
        top = vocab + (0 if extra is None else extra.shape[0])
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < top:
            raise PromptError(f"token ids must be within [0, {top}): {vocab} words and "
                              f"{0 if extra is None else extra.shape[0]} extra vectors, got {int(ids.max())}")
        if extra is None or not bool((ids >= vocab).any()):
            tokens = self.token_embedding(ids)
        else:
            known = ids < vocab
            words = self.token_embedding(torch.where(known, ids, 0))
            tokens = torch.where(known.unsqueeze(-1), words, extra.to(words)[(ids - vocab).clamp(min=0)])
        return tokens + self.position_embedding.weight[: ids.shape[1]]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with separate ``q_proj, k_proj, v_proj`` and ``out_proj``."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, T, width) -> (B, T, width)``; position t attends to positions ≤ t."""
        b, t, c = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.num_heads, c // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj), is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    """``fc2(act(fc1(x)))`` with ``act`` quick-GELU or GELU."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)
        self.act = quick_gelu if cfg.activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, T, width) -> (B, T, width)``."""
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer: ``x += attn(ln1(x)); x += mlp(ln2(x))``."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=_LN_EPS)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=_LN_EPS)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, T, width) -> (B, T, width)``."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """The stack of ``layers``."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))


class TextTransformer(nn.Module):
    """``embeddings``, ``encoder.layers``, ``final_layer_norm`` (the ``text_model.`` level of the key tree)."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=_LN_EPS)


class TextEncoder(nn.Module):
    """CLIP text encoder: ``te(ids, clip_skip=None) -> (B, T, width)`` hidden states as the U-Net consumes them."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.text_model = TextTransformer(cfg)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.zeros(()))

    def _check(self, ids: torch.Tensor, clip_skip: int | None) -> int:
        cfg = self.config
        if ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise PromptError(f"token ids must be an integer tensor (B, T), got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > cfg.max_positions:
            raise PromptError(f"{ids.shape[1]} tokens exceed the text encoder's {cfg.max_positions} positions")
        skip = cfg.clip_skip if clip_skip is None else clip_skip
        if not 1 <= skip <= cfg.num_layers:
            raise ConfigError(f"clip_skip must be in [1, {cfg.num_layers}], got {skip}")
        return skip

    def forward(self, ids: torch.Tensor, clip_skip: int | None = None,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        """``ids: (B, T)`` → final-LN hidden states of layer ``-clip_skip``, ``(B, T, width)``.

        ``clip_skip=None`` uses the config's default (1 for CLIP-L, 2 for OpenCLIP-H); layers after the one used
        are not run. ``extra: (E, width)``: textual-inversion vectors for the ids from ``vocab_size`` on
        (:class:`Embeddings`).
        """
        skip = self._check(ids, clip_skip)
        x = self.text_model.embeddings(ids, extra)
        for layer in self.text_model.encoder.layers[: self.config.num_layers - skip + 1]:
            x = layer(x)
        return self.text_model.final_layer_norm(x)

    def encode(self, ids: torch.Tensor, clip_skip: int | None = None,
               extra: torch.Tensor | None = None) -> TextEncoding:
        """Like :meth:`forward`, also returning the pooled output; runs every layer.

        ``ids: (B, T)`` → ``TextEncoding(hidden (B, T, width), pooled (B, width))``. The pooled state is taken at
        the highest token id of each row below ``vocab_size`` (extra ids do not count), which is the end-of-text token
        in CLIP's vocabulary.
        """
        skip = self._check(ids, clip_skip)
        x = self.text_model.embeddings(ids, extra)
        used = None
        for i, layer in enumerate(self.text_model.encoder.layers):
            x = layer(x)
            if i == self.config.num_layers - skip:
                used = x
        ln = self.text_model.final_layer_norm
        last = ln(x)
        hidden = last if skip == 1 else ln(used)
        words = ids.masked_fill(ids >= self.config.vocab_size, -1)
        pooled = last[torch.arange(ids.shape[0], device=ids.device), words.argmax(dim=-1)]
        return TextEncoding(hidden, pooled)
