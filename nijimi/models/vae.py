"""The KL-regularised autoencoder of latent diffusion (LDM, arXiv 2112.10752, §3 and appendix G).

An image ``x ∈ [-1, 1]^(3×H×W)`` is encoded into a diagonal Gaussian over latents ``z`` of shape
``(z_channels, H/f, W/f)`` with ``f = 2^(len(channel_mult)-1)`` (8 for Stable Diffusion); the decoder maps ``z`` back
to an image. The diffusion model works on ``scaling_factor · z`` so the latents have roughly unit variance (LDM §4.3.2,
appendix D.1); :meth:`VAE.decode_latents` applies that factor, :meth:`VAE.encode` / :meth:`VAE.decode` do not.

The module tree is the original checkpoint key tree after ``first_stage_model.`` (``encoder.down.1.block.0.norm1``,
``decoder.up.3.upsample.conv``, ``encoder.mid.attn_1.q``), so an SD single file loads with one strict
``load_state_dict``. Note that ``decoder.up`` is indexed by resolution level: ``up.0`` is the full-resolution level
and runs *last*.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nijimi.errors import ConfigError, ImageError, NijimiError
from nijimi.models.config import StoredConfig

_NORM_EPS = 1e-6
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


@dataclass(frozen=True)
class VAEConfig(StoredConfig):
    """Shape of an autoencoder; ``channels · channel_mult[i]`` is the width of resolution level ``i``.

    ``scaling_factor`` multiplies latents before the diffusion model sees them (0.18215 for SD 1.x/2.x).
    """

    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"VAEConfig.channel_mult must be non-empty positive integers, got {self.channel_mult}")
        self.require_positive(("in_channels", "out_channels", "channels", "num_res_blocks", "z_channels",
                               "norm_groups"))
        for width in (self.channels * m for m in self.channel_mult):
            if width % self.norm_groups:
                raise ConfigError(f"VAEConfig: width {width} is not divisible by norm_groups={self.norm_groups}")
        if not self.scaling_factor > 0:
            raise ConfigError(f"VAEConfig.scaling_factor must be > 0, got {self.scaling_factor}")

    @classmethod
    def sd(cls) -> VAEConfig:
        """The Stable Diffusion 1.x / 2.x autoencoder (kl-f8, 83.7 M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """A small autoencoder (downscale factor 4) for the embedded model and tests; provisional."""
        return cls(channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, z_channels=4, norm_groups=32)

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent cell along each side: ``2^(levels - 1)``."""
        return 2 ** (len(self.channel_mult) - 1)


class DiagonalGaussian:
    """The posterior ``q(z|x) = N(mean, diag(exp(logvar)))`` produced by the encoder (LDM §3, appendix G).

    ``moments: (B, 2·C, h, w)`` holds the mean in the first C channels and the log-variance (clamped to
    [-30, 20]) in the last C.
    """

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std · ε`` with ``ε`` drawn from ``generator``; returns ``(B, C, h, w)``."""
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """``KL(q ‖ N(0, I))`` summed over (C, h, w), shape ``(B,)``."""
        var = torch.exp(self.logvar)
        return 0.5 * torch.sum(self.mean.pow(2) + var - 1.0 - self.logvar, dim=(1, 2, 3))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=_NORM_EPS)


class ResnetBlock(nn.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))``, with a 1×1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, in_ch, H, W) -> (B, out_ch, H, W)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all ``H·W`` positions, with 1×1-conv projections ``q, k, v, proj_out``.

    The 1×1 convs are applied as matrix products on ``(B, H·W, C)`` and attention runs through
    ``scaled_dot_product_attention`` (memory-efficient kernels, no ``(HW)²`` matrix where the backend avoids it).
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, H, W) -> (B, C, H, W)``."""
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = (F.linear(t, conv.weight.view(c, c), conv.bias) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        out = F.linear(out, self.proj_out.weight.view(c, c), self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding one pixel on the right and bottom only (the original's asymmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, H, W) -> (B, C, ⌈H/2⌉, ⌈W/2⌉)`` for even ``H, W``."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, H, W) -> (B, C, 2H, 2W)``."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """``block_2(attn_1(block_1(x)))`` at the lowest resolution."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, h, w) -> (B, C, h, w)``."""
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks) then an optional resampler registered as ``name``
    (``downsample`` in the encoder, ``upsample`` in the decoder)."""

    def __init__(self, widths: list[tuple[int, int]], groups: int, resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, groups) for i, o in widths)
        self.resample_name = name if resample is not None else None
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C_in, H, W) -> (B, C_out, H', W')``."""
        for block in self.block:
            x = block(x)
        return x if self.resample_name is None else getattr(self, self.resample_name)(x)


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` → moments ``(B, 2·z_channels, H/f, W/f)`` (before ``quant_conv``)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        prev = widths[0]
        for i, width in enumerate(widths):
            pairs = [(prev if j == 0 else width, width) for j in range(cfg.num_res_blocks)]
            last = i == len(widths) - 1
            self.down.append(Level(pairs, g, None if last else Downsample(width), "downsample"))
            prev = width
        self.mid = MidBlock(prev, g)
        self.norm_out = _norm(prev, g)
        self.conv_out = nn.Conv2d(prev, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, in_channels, H, W) -> (B, 2·z_channels, H/f, W/f)``."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` (after ``post_quant_conv``) → image ``(B, out_channels, h·f, w·f)``.

    ``up[i]`` is resolution level ``i``; the levels run from the deepest (``up[-1]``) to ``up[0]``.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], g)
        levels = []
        prev = widths[-1]
        for i in reversed(range(len(widths))):
            pairs = [(prev if j == 0 else widths[i], widths[i]) for j in range(cfg.num_res_blocks + 1)]
            levels.append(Level(pairs, g, None if i == 0 else Upsample(widths[i]), "upsample"))
            prev = widths[i]
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _norm(prev, g)
        self.conv_out = nn.Conv2d(prev, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z: (B, z_channels, h, w) -> (B, out_channels, h·f, w·f)``."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """The autoencoder: ``encoder`` + ``quant_conv`` → posterior; ``post_quant_conv`` + ``decoder`` → image."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def _check(self, x: torch.Tensor, what: str) -> None:
        """Images must be ``(B, in_channels, H, W)`` with H, W multiples of f (:class:`ImageError`), latents
        ``(B, z_channels, h, w)`` (:class:`ConfigError`)."""
        image = what.endswith("encode")
        channels = self.config.in_channels if image else self.config.z_channels
        multiple = self.config.downscale_factor if image else 1
        if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % multiple or x.shape[3] % multiple:
            error = ImageError if image else ConfigError
            raise error(
                f"VAE {what} expects (B, {channels}, H, W) with H, W multiples of {multiple}, got {tuple(x.shape)}"
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """``x: (B, in_channels, H, W)`` in [-1, 1] → posterior over unscaled latents ``(B, z, H/f, W/f)``."""
        self._check(x, "encode")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ``z: (B, z_channels, h, w)`` → image ``(B, out_channels, h·f, w·f)``, about [-1, 1]."""
        self._check(z, "decode")
        return self.decoder(self.post_quant_conv(z))

    def tiled_encode(self, x: torch.Tensor, tile: int = 512, overlap: float = 0.25) -> DiagonalGaussian:
        """:meth:`encode` over ``tile``×``tile`` pixel tiles overlapping by ``overlap``, moments blended linearly.

        Activation memory is bounded by the tile size; the result differs slightly from :meth:`encode` because each
        tile is normalised with its own statistics and attends only within itself.
        ``x: (B, in_channels, H, W)`` → posterior over ``(B, z, H/f, W/f)``.
        """
        self._check(x, "tiled_encode")
        f = self.config.downscale_factor
        size, stride = _tile_grid(tile // f, overlap)
        moments = _tiled(lambda t: self.quant_conv(self.encoder(t)), x, (size * f, stride * f), (size, stride))
        return DiagonalGaussian(moments)

    def tiled_decode(self, z: torch.Tensor, tile: int = 512, overlap: float = 0.25) -> torch.Tensor:
        """:meth:`decode` over latent tiles of ``tile / f`` cells (``tile`` pixels), overlapping and blended.

        ``z: (B, z_channels, h, w)`` → ``(B, out_channels, h·f, w·f)``.
        """
        self._check(z, "tiled_decode")
        f = self.config.downscale_factor
        size, stride = _tile_grid(tile // f, overlap)
        return _tiled(lambda t: self.decoder(self.post_quant_conv(t)), z, (size, stride), (size * f, stride * f))

    def decode_latents(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Scaled latents ``(B, z, h, w)`` → images ``(B, 3, h·f, w·f)`` in about [-1, 1].

        In half precision (float16, bfloat16) a VAE can overflow to inf/NaN (a black image); then the decode is rerun
        with float32 weights (restored afterwards, exactly) and a warning, and the result is returned in the latents'
        dtype. NaN/inf in a float32 decode raise :class:`NijimiError`. ``tile`` (pixels) enables :meth:`tiled_decode`.
        """
        z = latents / self.config.scaling_factor
        image = self._decode_maybe_tiled(z, tile)
        if torch.isfinite(image).all():
            return image
        if image.dtype not in (torch.float16, torch.bfloat16):
            raise _non_finite(image, latents)
        warnings.warn(f"VAE decode overflowed in {image.dtype}; decoding again in float32", stacklevel=2)
        weights_dtype = next(self.parameters()).dtype
        try:
            self.to(torch.float32)
            image = self._decode_maybe_tiled(latents.float() / self.config.scaling_factor, tile)
        finally:
            self.to(weights_dtype)
        if not torch.isfinite(image).all():
            raise _non_finite(image, latents)
        return image.to(latents.dtype)

    def _decode_maybe_tiled(self, z: torch.Tensor, tile: int | None) -> torch.Tensor:
        big = tile is not None and max(z.shape[-2:]) * self.config.downscale_factor > tile
        return self.tiled_decode(z, tile) if big else self.decode(z)


def _non_finite(image: torch.Tensor, latents: torch.Tensor) -> NijimiError:
    bad = int((~torch.isfinite(latents)).sum())
    return NijimiError(f"VAE decode produced NaN/inf in {image.dtype} ({bad} non-finite latents)")


def _ramp(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Blend the first ``extent`` rows (``dim`` 2) or columns (``dim`` 3) of ``b`` with the last ones of ``a``, in
    place: weight ``t/extent`` on ``b`` and ``1 - t/extent`` on ``a`` at offset ``t``."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return
    t = torch.arange(extent, dtype=torch.float64) / extent
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    w_b = t.to(b.dtype).view(shape).to(b.device)
    w_a = (1 - t).to(b.dtype).view(shape).to(b.device)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * w_a + head * w_b)


def _tile_grid(latent_tile: int, overlap: float) -> tuple[int, int]:
    """Tile size and stride in latent cells; the stride is ``⌊tile · (1 - overlap)⌋`` as in diffusers."""
    if latent_tile < 1 or not 0 <= overlap < 1:
        raise ConfigError(f"VAE tiles need >= 1 latent cell and overlap in [0, 1), got {latent_tile}, {overlap}")
    return latent_tile, max(1, int(latent_tile * (1 - overlap)))


def _tiled(fn, x: torch.Tensor, grid_in: tuple[int, int], grid_out: tuple[int, int]) -> torch.Tensor:
    """Apply a resolution-changing ``fn`` to overlapping tiles of ``x: (B, C, H, W)`` and stitch the results.

    ``grid_in = (tile, stride)`` cuts the input; ``grid_out`` is the same grid in output units. Each output tile is
    blended linearly into its upper and left neighbours over ``tile - stride`` rows/columns, then cropped to
    ``stride``. Returns ``(B, C', H·r, W·r)`` with ``r = grid_out / grid_in``.
    """
    (tile, stride), (tile_out, keep) = grid_in, grid_out
    rows = [
        [fn(x[:, :, i : i + tile, j : j + tile]) for j in range(0, x.shape[3], stride)]
        for i in range(0, x.shape[2], stride)
    ]
    for i, row in enumerate(rows):
        for j, out in enumerate(row):
            if i:
                _ramp(rows[i - 1][j], out, tile_out - keep, 2)
            if j:
                _ramp(row[j - 1], out, tile_out - keep, 3)
    return torch.cat([torch.cat([t[:, :, :keep, :keep] for t in row], dim=3) for row in rows], dim=2)
