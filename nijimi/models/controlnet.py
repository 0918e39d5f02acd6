"""ControlNet (Zhang, Rao & Agrawala, arXiv:2302.05543): a trainable copy of the U-Net's encoder steered by a map.

A ControlNet sees the same noisy latents, timestep and text context as the U-Net it steers, plus a control map
(edges, depth, pose …) at the output image's pixel size. It returns one residual per U-Net skip and one for the middle
block output; the U-Net adds them before its decoder uses them (``UNetModel.forward(down_residuals=,
mid_residual=)``).

The module tree is the original key tree (lllyasviel's ``cldm.ControlNet``, the keys after ``control_model.``), so
an original file loads with one strict ``load_state_dict``:

- ``time_embed.{0,2}``: the timestep MLP (a copy of the U-Net's);
- ``input_hint_block.{0,2,…,14}``: the hint encoder, eight 3×3 convolutions with SiLU between them (the odd indices)
  taking the map from pixel size to latent size with three stride-2 convolutions (2, 4 and 6 → indices 4, 8, 12),
  widths 16, 16, 32, 32, 96, 96, 256, then ``model_channels`` (the last one zero-initialised);
- ``input_blocks.*`` and ``middle_block.*``: a copy of the U-Net's encoder (same names as in ``nijimi.models.unet``);
- ``zero_convs.{i}.0``: a zero-initialised 1×1 convolution on the output of input block ``i``;
- ``middle_block_out.0``: the zero-initialised 1×1 convolution on the middle block output.

Forward (paper §3.2, eq. 2): ``h₀ = conv_in(x) + hint_encoder(c)``, then the encoder as in the U-Net;
residual ``i`` is ``zero_conv_i(h_i)``. Because every zero convolution starts at zero, a fresh ControlNet leaves the
U-Net's output exactly unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nijimi.errors import ConfigError
from nijimi.models.config import check_field_types, require_mapping
from nijimi.models.layers import Conv2d
from nijimi.models.unet import (
    UNetConfig,
    UNetModel,
    build_input_blocks,
    build_middle_block,
    build_time_embed,
    embed_timesteps,
)

HINT_WIDTHS = (16, 32, 96, 256)
"""Widths of the hint encoder's levels in every released SD 1.x/2.x ControlNet (diffusers'
``conditioning_embedding_out_channels``)."""


@dataclass(frozen=True)
class ControlNetConfig:
    """Architecture of a ControlNet: the U-Net encoder it copies and the hint encoder in front of it.

    ``unet`` is the steered U-Net's config (only the encoder part — channels, levels, attention, context — shapes the
    ControlNet; ``out_channels`` and ``sample_size`` are carried along). ``hint_channels``: channels of the control
    map (3 for RGB maps). ``hint_widths``: the hint encoder's level widths; the map is ``2^(len-1)`` times the
    latent size. ``global_pool``: residuals are averaged over space (diffusers ``global_pool_conditions``, the
    "shuffle" ControlNet), which also makes the control apply to the conditional half of a guided batch only.
    """

    unet: UNetConfig
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = HINT_WIDTHS
    global_pool: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hint_widths", tuple(self.hint_widths))
        if self.hint_channels < 1:
            raise ConfigError(f"ControlNetConfig.hint_channels must be ≥ 1, got {self.hint_channels}")
        if not self.hint_widths or min(self.hint_widths) < 1:
            raise ConfigError(f"ControlNetConfig.hint_widths must be non-empty positive integers, got "
                              f"{self.hint_widths}")

    # ---- presets ----------------------------------------------------------------------------------------------

    @classmethod
    def sd15(cls, hint_channels: int = 3) -> ControlNetConfig:
        """A ControlNet for Stable Diffusion 1.x (control_v11p_sd15_* and friends)."""
        return cls(UNetConfig.sd15(), hint_channels)

    @classmethod
    def sd21(cls, hint_channels: int = 3) -> ControlNetConfig:
        """A ControlNet for Stable Diffusion 2.x (64-wide heads, linear projections, 1024-wide context)."""
        return cls(UNetConfig.sd21(), hint_channels)

    @classmethod
    def tiny(cls, hint_channels: int = 3) -> ControlNetConfig:
        """A ControlNet for the tiny demo U-Net (``UNetConfig.tiny()``)."""
        return cls(UNetConfig.tiny(), hint_channels)

    # ---- derived sizes and checks -----------------------------------------------------------------------------

    @property
    def hint_downscale(self) -> int:
        """How many times larger than the latents the control map is (8 for SD: three stride-2 convolutions)."""
        return 2 ** (len(self.hint_widths) - 1)

    @property
    def hint_conv_indices(self) -> tuple[int, ...]:
        """Indices of the convolutions in ``input_hint_block`` (0, 2, …, 14 for the usual four widths)."""
        return tuple(range(0, 4 * len(self.hint_widths) - 1, 2))

    def check_fits(self, unet: UNetConfig) -> None:
        """Raise :class:`ConfigError` unless this ControlNet's residuals fit the skips of a U-Net with ``unet``."""
        fields = ("model_channels", "channel_mult", "num_res_blocks", "context_dim")
        wrong = [f"{f} {getattr(self.unet, f)} vs {getattr(unet, f)}" for f in fields
                 if getattr(self.unet, f) != getattr(unet, f)]
        if wrong:
            raise ConfigError(f"ControlNet does not fit the U-Net (ControlNet vs U-Net): {'; '.join(wrong)}")

    # ---- storage ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples as lists), stored next to the weights."""
        return {"unet": self.unet.to_dict(), "hint_channels": self.hint_channels,
                "hint_widths": list(self.hint_widths), "global_pool": self.global_pool}

    @classmethod
    def from_dict(cls, d: dict) -> ControlNetConfig:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise :class:`ConfigError` naming them."""
        expected = {"unet", "hint_channels", "hint_widths", "global_pool"}
        if set(require_mapping(d, "ControlNetConfig")) != expected:
            raise ConfigError(f"ControlNetConfig dict: missing keys {sorted(expected - set(d))}, "
                              f"unknown keys {sorted(set(d) - expected)}")
        check_field_types(cls, d)
        return cls(UNetConfig.from_dict(d["unet"]), d["hint_channels"], tuple(d["hint_widths"]), d["global_pool"])


def build_hint_block(cfg: ControlNetConfig) -> nn.Sequential:
    """``input_hint_block``: convolutions (even indices) with SiLU between them (odd indices).

    For widths ``w₀ … w_{L-1}``: ``hint_channels → w₀``, then per level ``wᵢ → wᵢ`` and a stride-2 ``wᵢ → wᵢ₊₁``,
    then ``w_{L-1} → model_channels`` (zero-initialised). Maps (B, hint_channels, f·H, f·W) → (B, mc, H, W),
    ``f = hint_downscale``.
    """
    widths = cfg.hint_widths
    convs = [Conv2d(cfg.hint_channels, widths[0], 3, padding=1)]
    for width, wider in zip(widths[:-1], widths[1:], strict=True):
        convs += [Conv2d(width, width, 3, padding=1), Conv2d(width, wider, 3, padding=1, stride=2)]
    convs.append(_zeroed(Conv2d(widths[-1], cfg.unet.model_channels, 3, padding=1)))
    layers: list[nn.Module] = []
    for conv in convs:
        layers += [conv, nn.SiLU()]
    return nn.Sequential(*layers[:-1])


def _zeroed(module: nn.Module) -> nn.Module:
    """``module`` with every parameter set to zero (the paper's "zero convolution")."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def _zero_conv(channels: int) -> nn.Sequential:
    """``zero_convs.{i}`` / ``middle_block_out``: a zero-initialised 1×1 convolution (key ``.0``)."""
    return nn.Sequential(_zeroed(Conv2d(channels, channels, 1)))


def residual_scales(count: int, scale: float, guess_mode: bool) -> list[float]:
    """Multipliers of the ``count`` down residuals and (last) the mid residual: ``count + 1`` values.

    Normally all equal ``scale``. In guess mode ("control without prompt") they grow geometrically from the
    shallowest skip to the middle block, ``scale · 10^(-1 + i/count)`` for ``i = 0 … count`` — diffusers'
    ``torch.logspace(-1, 0, count + 1)``, used here for parity. lllyasviel's original and AUTOMATIC1111 use
    ``scale · 0.825^(12 - i)``; since ``10^(-1/12) = 0.8254``, the two differ by under 0.6 % at any position.
    """
    if not guess_mode:
        return [scale] * (count + 1)
    return [scale * s for s in torch.logspace(-1.0, 0.0, count + 1, dtype=torch.float64).tolist()]


class ControlNetModel(nn.Module):
    """ControlNet: residuals for a U-Net's skips and middle block from a control map. See the module docstring."""

    def __init__(self, cfg: ControlNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.time_embed = build_time_embed(cfg.unet)
        self.input_hint_block = build_hint_block(cfg)
        self.input_blocks, skip_channels = build_input_blocks(cfg.unet)
        self.zero_convs = nn.ModuleList(_zero_conv(ch) for ch in skip_channels)
        self.middle_block = build_middle_block(cfg.unet)
        self.middle_block_out = _zero_conv(cfg.unet.model_channels * cfg.unet.channel_mult[-1])

    @classmethod
    def from_unet(cls, unet: UNetModel, hint_channels: int = 3, hint_widths: Sequence[int] = HINT_WIDTHS,
                  generator: torch.Generator | None = None) -> ControlNetModel:
        """The paper's initialisation (§3.2): the encoder (``time_embed``, ``input_blocks``, ``middle_block``)
        copied from ``unet``, zero convolutions at zero, the hint encoder's other convolutions drawn from
        ``generator`` with PyTorch's default convolution initialisation. Returned in train mode, on ``unet``'s
        device and dtype. Built on the ``meta`` device, so no global random state is used or spent."""
        param = next(unet.parameters())
        with torch.device("meta"):
            model = cls(ControlNetConfig(unet.config, hint_channels, tuple(hint_widths)))
        model.to_empty(device=param.device).to(param.dtype)
        for name in ("time_embed", "input_blocks", "middle_block"):
            getattr(model, name).load_state_dict(getattr(unet, name).state_dict(), strict=True)
        _zeroed(model.zero_convs)
        _zeroed(model.middle_block_out)
        model.reset_hint_block(generator)
        return model

    def reset_hint_block(self, generator: torch.Generator | None = None) -> None:
        """Re-draw the hint encoder's weights from ``generator`` (PyTorch's default convolution init: Kaiming-uniform
        with a = √5, biases U(±1/√fan_in)); its last convolution stays zero."""
        convs = [m for m in self.input_hint_block if isinstance(m, Conv2d)]
        with torch.no_grad():
            for conv in convs[:-1]:
                nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(conv.weight[0].numel())
                nn.init.uniform_(conv.bias, -bound, bound, generator=generator)
            _zeroed(convs[-1])

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor,
                scale: float = 1.0, guess_mode: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for the U-Net's skips and middle block.

        x: (B, in_channels, H, W) noisy latents; t: (B,) or () timesteps; context: (B, M, context_dim);
        hint: (B, hint_channels, f·H, f·W) control map in [0, 1], ``f = config.hint_downscale``. ``scale`` and
        ``guess_mode``: see :func:`residual_scales`. Returns (down residuals, one per input block, each shaped like
        the U-Net's skip there; mid residual (B, C_mid, H/2^(L-1), W/2^(L-1))); with ``global_pool`` every
        residual is averaged to (B, C, 1, 1).
        """
        self._check_inputs(x, context, hint)
        cfg = self.config
        emb = embed_timesteps(self.time_embed, t, cfg.unet.model_channels, x.shape[0], x.dtype)
        h = self.input_blocks[0](x, emb, context) + self.input_hint_block(hint)
        down = [self.zero_convs[0](h)]
        for block, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:], strict=True):
            h = block(h, emb, context)
            down.append(zero_conv(h))
        mid = self.middle_block_out(self.middle_block(h, emb, context))
        scales = residual_scales(len(down), scale, guess_mode and not cfg.global_pool)
        down = [r * s for r, s in zip(down, scales[:-1], strict=True)]
        mid = mid * scales[-1]
        if cfg.global_pool:
            down = [r.mean(dim=(2, 3), keepdim=True) for r in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor, hint: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.unet.in_channels:
            raise ConfigError(f"ControlNet input must be (B, {cfg.unet.in_channels}, H, W), got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.unet.context_dim:
            raise ConfigError(f"ControlNet context must be ({x.shape[0]}, M, {cfg.unet.context_dim}), "
                              f"got {tuple(context.shape)}")
        f = cfg.hint_downscale
        want = (x.shape[0], cfg.hint_channels, f * x.shape[2], f * x.shape[3])
        if tuple(hint.shape) != want:
            raise ConfigError(f"control map must be {want} ({f}× the latent size {tuple(x.shape[2:])}), "
                              f"got {tuple(hint.shape)}")
