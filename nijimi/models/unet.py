"""The Stable Diffusion denoising U-Net (LDM, arXiv:2112.10752), SD 1.x and 2.x.

The module tree is the original checkpoint key tree (CompVis ``openaimodel.UNetModel``, the keys after
``model.diffusion_model.``), so ``UNetModel(cfg).load_state_dict(sd)`` of a real file is strict. Positions, for a
config with ``n = num_res_blocks`` and levels ``0 … L-1`` (level ``l`` has ``model_channels · channel_mult[l]``
channels and ``2^l`` downsampling):

- ``time_embed.{0,2}``: the timestep MLP (Linear, SiLU, Linear).
- ``input_blocks.0.0``: the input convolution ("conv_in").
- ``input_blocks.{1 + l(n+1) + j}``: level ``l``, res block ``j``: ``.0`` ResBlock, ``.1`` SpatialTransformer when the
  level has attention.
- ``input_blocks.{1 + l(n+1) + n}.0.op``: the stride-2 downsampling convolution after level ``l`` (not the last).
- ``middle_block.{0,1,2}``: ResBlock, SpatialTransformer, ResBlock.
- ``output_blocks.{u(n+1) + j}`` for ``u = 0 … L-1`` (level ``L-1-u``) and ``j = 0 … n``: ``.0`` ResBlock over the
  concatenated skip, ``.1`` SpatialTransformer when the level has attention, then ``.conv`` of the 2× upsampling as the
  last sub-module of the level's last block (except at level 0).
- ``out.{0,2}``: the final GroupNorm and convolution ("conv_out").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nijimi.errors import ConfigError
from nijimi.models.config import StoredConfig
from nijimi.models.layers import Attention, Conv2d, GroupNorm32, SpatialTransformer, timestep_embedding


@dataclass(frozen=True)
class UNetConfig(StoredConfig):
    """Hyper-parameters of the U-Net. Presets are class methods; any other size is a plain constructor call.

    Exactly one of ``num_heads`` (same head count at every level, SD 1.x) and ``head_dim`` (heads = channels / head_dim
    per level, SD 2.x) is set. ``attention_levels`` are the level indices (0 = full latent resolution) that get
    transformer blocks; the middle block always has one. ``linear_proj``: the transformers' ``proj_in``/``proj_out``
    are Linear layers (SD 2.x) instead of 1×1 convolutions. ``upcast_attention``: attention runs in float32 for
    half-precision inputs (the SD 2.x reference always does; fp16 SD 2.1 overflows otherwise). ``sample_size`` is the
    latent side the weights were trained at (stored with the weights, not used by the network).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    num_heads: int | None = 8
    head_dim: int | None = None
    context_dim: int = 768
    transformer_depth: int = 1
    linear_proj: bool = False
    upcast_attention: bool = False
    norm_groups: int = 32
    dropout: float = 0.0
    sample_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if (self.num_heads is None) == (self.head_dim is None):
            raise ConfigError(f"UNetConfig: set exactly one of num_heads={self.num_heads} and head_dim={self.head_dim}")
        self.require_positive(("in_channels", "out_channels", "model_channels", "num_res_blocks", "context_dim",
                               "norm_groups", "transformer_depth",
                               "num_heads" if self.num_heads is not None else "head_dim"))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"UNetConfig.channel_mult must be non-empty positive integers, got {self.channel_mult}")
        bad_levels = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channel_mult)]
        if bad_levels:
            raise ConfigError(f"UNetConfig.attention_levels {bad_levels} outside levels 0…{len(self.channel_mult) - 1}")
        for mult in self.channel_mult:
            channels = self.model_channels * mult
            if channels % self.norm_groups:
                raise ConfigError(f"UNetConfig: {channels} channels not divisible by norm_groups={self.norm_groups}")
            self.heads_for(channels)

    # ---- presets ----------------------------------------------------------------------------------------------

    @classmethod
    def sd15(cls) -> UNetConfig:
        """Stable Diffusion 1.x (v1-inference.yaml): 320 channels, 8 heads everywhere, CLIP ViT-L/14 context (768)."""
        return cls()

    @classmethod
    def sd15_inpaint(cls) -> UNetConfig:
        """SD 1.5 inpainting: 9 input channels (noisy latent 4 + mask 1 + masked-image latent 4)."""
        return dataclasses.replace(cls.sd15(), in_channels=9)

    @classmethod
    def sd15_pix2pix(cls) -> UNetConfig:
        """InstructPix2Pix: 8 input channels (noisy latent 4 + input-image latent 4)."""
        return dataclasses.replace(cls.sd15(), in_channels=8)

    @classmethod
    def sd21(cls) -> UNetConfig:
        """Stable Diffusion 2.x base (512, ε-prediction): 64-channel heads, linear projections, OpenCLIP-H context."""
        return cls(num_heads=None, head_dim=64, context_dim=1024, linear_proj=True, upcast_attention=True)

    @classmethod
    def sd21_v(cls) -> UNetConfig:
        """Stable Diffusion 2.x 768 (v-prediction): the ``sd21`` architecture, trained at 96×96 latents."""
        return dataclasses.replace(cls.sd21(), sample_size=96)

    @classmethod
    def tiny(cls) -> UNetConfig:
        """A small U-Net of the same architecture for the embedded demo model and fast tests (16.8 M parameters).

        Provisional: the size is tuned together with the embedded model's training.
        """
        return cls(model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(1, 2),
                   num_heads=4, context_dim=256, sample_size=32)

    # ---- derived sizes and storage ----------------------------------------------------------------------------

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding MLP (4 × model_channels)."""
        return 4 * self.model_channels

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of a transformer over ``channels`` channels."""
        if self.num_heads is not None:
            heads = self.num_heads
            if channels % heads:
                raise ConfigError(f"UNetConfig: {channels} channels not divisible by num_heads={heads}")
            return heads, channels // heads
        if channels % self.head_dim:
            raise ConfigError(f"UNetConfig: {channels} channels not divisible by head_dim={self.head_dim}")
        return channels // self.head_dim, self.head_dim


class ResBlock(nn.Module):
    """Residual block with the timestep added between its two convolutions (DDPM, arXiv:2006.11239, Wide-ResNet style).

    ``h = conv(SiLU(GN(x))) + Linear(SiLU(emb)); out = skip(x) + conv(Dropout(SiLU(GN(h))))``.
    Parameters ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, and ``skip_connection`` (1×1 convolution)
    only when the channel count changes.
    """

    def __init__(self, channels: int, emb_dim: int, out_channels: int, groups: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                       Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), emb: (B, emb_dim) → (B, out_channels, H, W)."""
        h = self.in_layers(x)
        h += self.emb_layers(emb)[:, :, None, None]
        out = self.out_layers(h)
        out += self.skip_connection(x)
        return out


class Downsample(nn.Module):
    """Stride-2 3×3 convolution halving H and W. Parameter ``op``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → (B, C, ⌈H/2⌉, ⌈W/2⌉)."""
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2× upsampling then a 3×3 convolution. Parameter ``conv``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        """x: (B, C, H, W) → (B, C, 2H, 2W), or to ``size`` (the skip's) when a side was odd before downsampling."""
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class TimestepSequential(nn.Sequential):
    """A U-Net block: its sub-modules in order, each fed what it takes (ResBlock: emb, SpatialTransformer: context)."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                upsample_size: torch.Size | None = None) -> torch.Tensor:
        """h: (B, C, H, W), emb: (B, time_embed_dim), context: (B, M, context_dim) → (B, C', H', W').

        ``upsample_size``: the spatial size an ``Upsample`` must produce (the next skip's), for latents whose sides
        are not multiples of 2^(levels-1) — e.g. 520 px with SD's 8× VAE."""
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            elif isinstance(layer, Upsample):
                h = layer(h, upsample_size)
            else:
                h = layer(h)
        return h


# ---- builders (also used by a ControlNet, whose encoder copies this one) --------------------------------------

def build_time_embed(cfg: UNetConfig) -> nn.Sequential:
    """The timestep MLP ``time_embed``: Linear(model_channels → 4·mc), SiLU, Linear(4·mc → 4·mc)."""
    return nn.Sequential(nn.Linear(cfg.model_channels, cfg.time_embed_dim), nn.SiLU(),
                         nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim))


def _transformer(cfg: UNetConfig, channels: int) -> SpatialTransformer:
    heads, head_dim = cfg.heads_for(channels)
    return SpatialTransformer(channels, heads, head_dim, cfg.context_dim, cfg.transformer_depth, cfg.linear_proj,
                              cfg.norm_groups, cfg.dropout, cfg.upcast_attention)


def _res_block(cfg: UNetConfig, channels: int, out_channels: int) -> ResBlock:
    return ResBlock(channels, cfg.time_embed_dim, out_channels, cfg.norm_groups, cfg.dropout)


def build_input_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The encoder ``input_blocks`` and the channel count of the skip each block leaves for the decoder."""
    blocks = [TimestepSequential(Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1))]
    skip_channels = [cfg.model_channels]
    ch = cfg.model_channels
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [_res_block(cfg, ch, cfg.model_channels * mult)]
            ch = cfg.model_channels * mult
            if level in cfg.attention_levels:
                layers.append(_transformer(cfg, ch))
            blocks.append(TimestepSequential(*layers))
            skip_channels.append(ch)
        if level < len(cfg.channel_mult) - 1:
            blocks.append(TimestepSequential(Downsample(ch)))
            skip_channels.append(ch)
    return nn.ModuleList(blocks), skip_channels


def build_middle_block(cfg: UNetConfig) -> TimestepSequential:
    """``middle_block``: ResBlock, SpatialTransformer, ResBlock at the deepest level's width."""
    ch = cfg.model_channels * cfg.channel_mult[-1]
    return TimestepSequential(_res_block(cfg, ch, ch), _transformer(cfg, ch), _res_block(cfg, ch, ch))


def build_output_blocks(cfg: UNetConfig, skip_channels: list[int]) -> nn.ModuleList:
    """The decoder ``output_blocks``: per level (deepest first) ``num_res_blocks + 1`` blocks, each eating one skip."""
    skips = list(skip_channels)
    ch = cfg.model_channels * cfg.channel_mult[-1]
    blocks = []
    for level in reversed(range(len(cfg.channel_mult))):
        out_ch = cfg.model_channels * cfg.channel_mult[level]
        for j in range(cfg.num_res_blocks + 1):
            layers: list[nn.Module] = [_res_block(cfg, ch + skips.pop(), out_ch)]
            ch = out_ch
            if level in cfg.attention_levels:
                layers.append(_transformer(cfg, ch))
            if level > 0 and j == cfg.num_res_blocks:
                layers.append(Upsample(ch))
            blocks.append(TimestepSequential(*layers))
    return nn.ModuleList(blocks)


def embed_timesteps(time_embed: nn.Module, t: torch.Tensor, model_channels: int, batch: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal features of ``t`` through the ``time_embed`` MLP. t: () or (B,) → (B, 4·model_channels)."""
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ConfigError(f"timesteps must have shape ({batch},) or (), got {tuple(t.shape)}")
    return time_embed(timestep_embedding(t, model_channels).to(dtype))


@dataclass
class FeatureCache:
    """DeepCache's cached deep feature (Ma et al., arXiv:2312.00858, §3.2): the decoder's input to the skip branch
    at ``depth``, i.e. what enters ``output_blocks[-depth]`` next to the skip of ``input_blocks[depth - 1]``.

    The shallow branch the cache serves runs ``input_blocks[:depth]``, then ``output_blocks[-depth:]`` on the
    cached feature and those blocks' own skips, then ``out``. ``depth`` 1 (conv_in and the last output block) is the
    shallowest branch, the largest saving; the paper's premise (§3.1) is that these deep features change little
    between neighbouring steps, so refreshing them every few steps keeps the image. ``feature``: (B, C, H, W).
    """

    depth: int = 1
    feature: torch.Tensor | None = None


class UNetModel(nn.Module):
    """The conditional denoising U-Net ε_θ(x_t, t, c) (or v_θ / x̂₀ depending on the weights).

    Parameter tree (see the module docstring): ``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``,
    ``out``.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.time_embed = build_time_embed(cfg)
        self.input_blocks, skip_channels = build_input_blocks(cfg)
        self.middle_block = build_middle_block(cfg)
        self.output_blocks = build_output_blocks(cfg, skip_channels)
        self.out = nn.Sequential(GroupNorm32(cfg.norm_groups, cfg.model_channels), nn.SiLU(),
                                 Conv2d(cfg.model_channels, cfg.out_channels, 3, padding=1))

    @property
    def conv_in(self) -> Conv2d:
        """The input convolution ``input_blocks.0.0``."""
        return self.input_blocks[0][0]

    @property
    def conv_out(self) -> Conv2d:
        """The output convolution ``out.2``."""
        return self.out[2]

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Compute every attention ``slice_size`` query rows at a time (``None``: all at once). Same result."""
        if slice_size is not None and slice_size < 1:
            raise ConfigError(f"attention slice size must be ≥ 1 or None, got {slice_size}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.slice_size = slice_size

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *,
                down_residuals: list[torch.Tensor] | None = None,
                mid_residual: torch.Tensor | None = None, cache: FeatureCache | None = None) -> torch.Tensor:
        """Predict the network target for noisy latents ``x`` at timesteps ``t`` given text ``context``.

        x: (B, in_channels, H, W), any H, W (an odd side is upsampled back to its skip's size, as diffusers does);
        t: (B,) or () int/float timesteps;
        context: (B, M, context_dim). ``down_residuals`` (one per input block, each shaped like its skip) and
        ``mid_residual`` (shaped like the middle block output) are ControlNet outputs (arXiv:2302.05543): added to
        the skips before the decoder concatenates them, and to the middle block output.
        ``cache`` (DeepCache, arXiv:2312.00858): an empty one runs the whole network and keeps the deep feature it
        names; a filled one runs only the shallow branch on it (see :class:`FeatureCache`; there only the first
        ``cache.depth`` down residuals are added and ``mid_residual`` is part of the cached feature).
        Returns (B, out_channels, H, W).
        """
        self._check_inputs(x, context, down_residuals)
        if cache is not None and not 1 <= cache.depth <= len(self.input_blocks):
            raise ConfigError(f"cache depth {cache.depth} must be within 1…{len(self.input_blocks)}")
        emb = embed_timesteps(self.time_embed, t, self.config.model_channels, x.shape[0], x.dtype)
        shallow = cache is not None and cache.feature is not None
        skips = []
        h = x
        for block in self.input_blocks[:cache.depth] if shallow else self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        if shallow:
            h = cache.feature
        else:
            h = self.middle_block(h, emb, context)
            if mid_residual is not None:
                h = h + mid_residual
        if down_residuals is not None:
            skips = [skip + residual for skip, residual in zip(skips, down_residuals[:len(skips)], strict=True)]
        for block in self.output_blocks[len(self.output_blocks) - len(skips):]:
            if cache is not None and len(skips) == cache.depth:
                cache.feature = h
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor, down_residuals: list | None) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ConfigError(f"U-Net input must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
            raise ConfigError(f"U-Net context must be ({x.shape[0]}, M, {cfg.context_dim}), got {tuple(context.shape)}")
        if down_residuals is not None and len(down_residuals) != len(self.input_blocks):
            raise ConfigError(f"expected {len(self.input_blocks)} down residuals, got {len(down_residuals)}")
