"""ControlNet in a pipeline (arXiv:2302.05543): the residuals each sampling step adds to the U-Net's skips.

During sampling, :func:`control_residuals` runs every active :class:`ControlUnit` on the batched U-Net inputs and
sums their residuals (several ControlNets at once, as diffusers' ``MultiControlNetModel``). A unit is active on the
sampling steps inside its ``[start, end]`` fraction of the run (diffusers' ``control_guidance_start/end``). In
guess mode (and for "shuffle"-style ControlNets with ``global_pool``) a unit steers only the conditional half of a
classifier-free-guidance batch, the unconditional half gets zero residuals, and its residuals are scaled up
geometrically from the shallowest skip to the middle block (:func:`nijimi.models.controlnet.residual_scales`).
The pipeline adds this to its model stack with :func:`with_controlnets`, which receives the sampling step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nijimi.embedded import CONTROLNET
from nijimi.errors import ConfigError, ImageError
from nijimi.io.controlnet import load_controlnet
from nijimi.models.controlnet import ControlNetModel
from nijimi.models.ldm import ModelConfig
from nijimi.models.unet import UNetConfig
from nijimi.pipelines.control_maps import ControlSpec


@dataclass(frozen=True, eq=False)
class ControlUnit:
    """One ControlNet steering a generation.

    ``model``: the ControlNet; ``image``: its control map (1, hint_channels, H, W) in [0, 1] at the output size
    (:mod:`nijimi.pipelines.control_maps`); ``scale``: multiplier of its residuals (diffusers'
    ``controlnet_conditioning_scale``); ``start``/``end``: the fraction of the sampling steps it is active on.
    """

    model: ControlNetModel
    image: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    def __post_init__(self) -> None:
        channels = self.model.config.hint_channels
        if self.image.ndim != 4 or self.image.shape[:2] != (1, channels):
            raise ConfigError(f"control map must be (1, {channels}, H, W), got {tuple(self.image.shape)}")
        if self.image.numel() and (self.image.min() < 0 or self.image.max() > 1):
            raise ConfigError(f"control map values must lie in [0, 1], got [{self.image.min().item():.3g}, "
                              f"{self.image.max().item():.3g}]")
        if not math.isfinite(self.scale):
            raise ConfigError(f"control scale must be finite, got {self.scale}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ConfigError(f"control start/end must satisfy 0 <= start < end <= 1, got start={self.start}, "
                              f"end={self.end}")

    def active(self, begin: float, finish: float) -> bool:
        """Whether the unit acts on a step covering ``[begin, finish]`` of the run (diffusers' ``controlnet_keep``:
        ``start <= i/N`` and ``(i+1)/N <= end``); a zero scale never acts."""
        return self.scale != 0 and self.start <= begin and finish <= self.end

    @property
    def cond_only(self) -> bool:
        """Steers only the conditional rows of a guided batch (guess mode, or a ``global_pool`` ControlNet)."""
        return self.guess_mode or self.model.config.global_pool


ControlInput = ControlUnit | ControlSpec
"""What ``Pipeline.generate(control=…)`` takes: a unit, or a ``--control`` spec loaded at the output size."""


def step_fraction(step: int, steps: int) -> tuple[float, float]:
    """The part of the run sampling step ``step`` (0-based) of ``steps`` covers: ``(step/steps, (step+1)/steps)``."""
    if not 0 <= step < steps:
        raise ConfigError(f"step {step} outside 0…{steps - 1}")
    return step / steps, (step + 1) / steps


def control_residuals(units: Sequence[ControlUnit], x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      step_fraction: float | tuple[float, float], cond_only_mask: torch.Tensor | None = None,
                      ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """Summed ControlNet residuals for one U-Net call, or ``(None, None)`` when no unit is active.

    x: (B, C, h, w) noisy latents (the ControlNet's ``in_channels``: pass an inpainting U-Net's latent part only);
    t: (B,) or () timesteps; context: (B, M, D); each unit's map must be (1, 3, f·h, f·w), ``f`` = 8 for SD.
    ``step_fraction``: :func:`step_fraction` of the current step (a single number is a point in the run).
    ``cond_only_mask``: (B,) bool, True on the conditional rows of a classifier-free-guidance batch; guess-mode
    units run on those rows only and leave zeros on the others (without a mask they run on every row).
    Returns (down residuals, one per U-Net skip; mid residual) for ``UNetModel.forward``.
    """
    begin, finish = (step_fraction, step_fraction) if isinstance(step_fraction, int | float) else step_fraction
    cond_rows = None
    if cond_only_mask is not None:
        if cond_only_mask.dtype != torch.bool or cond_only_mask.shape != (x.shape[0],):
            raise ConfigError(f"cond_only_mask must be a ({x.shape[0]},) bool tensor, got "
                              f"{tuple(cond_only_mask.shape)} {cond_only_mask.dtype}")
        cond_rows = cond_only_mask.nonzero().squeeze(1)
    down_sum: list[torch.Tensor] | None = None
    mid_sum: torch.Tensor | None = None
    for unit in units:
        rows = cond_rows if unit.cond_only else None
        if not unit.active(begin, finish) or (rows is not None and rows.numel() == 0):
            continue
        down, mid = _unit_residuals(unit, x, t, context, rows)
        down_sum = down if down_sum is None else [a + b for a, b in zip(down_sum, down, strict=True)]
        mid_sum = mid if mid_sum is None else mid_sum + mid
    return down_sum, mid_sum


def _unit_residuals(unit: ControlUnit, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    rows: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One unit's residuals on all rows, or on ``rows`` only with zeros on the others."""
    batch = x.shape[0]
    if rows is not None:
        x, context = x[rows], context[rows]
        t = t if t.ndim == 0 else t[rows]
    hint = unit.image.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)
    down, mid = unit.model(x, t, context, hint, unit.scale, unit.guess_mode)
    if rows is None:
        return down, mid
    return [_scatter(r, rows, batch) for r in down], _scatter(mid, rows, batch)


def _scatter(residual: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    out = residual.new_zeros((batch, *residual.shape[1:]))
    out[rows] = residual
    return out


@dataclass(frozen=True, eq=False)
class ControlRun:
    """The ControlNets steering one generation whose sampling runs steps ``first … steps-1``; start/end fractions
    count the steps that run (img2img: those after the strength cut, as in diffusers' ControlNet img2img)."""

    units: tuple[ControlUnit, ...]
    first: int
    steps: int


def with_controlnets(net: Callable[..., torch.Tensor], run: ControlRun) -> Callable[..., torch.Tensor]:
    """A model-stack layer that adds the residuals of the units active at the current sampling step to the U-Net
    call: ``net(x, t, context, step=…, is_cond=…, down_residuals=…, mid_residual=…)``. ``is_cond`` (B,) marks the
    conditional rows of a guided batch, which guess-mode units steer alone."""

    def controlled(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *, step: int,
                   is_cond: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        fraction = step_fraction(step - run.first, run.steps - run.first)
        down, mid = control_residuals(run.units, x, t, context, fraction, is_cond)
        return net(x, t, context, step=step, is_cond=is_cond, down_residuals=down, mid_residual=mid, **kwargs)

    return controlled


def prepare_control(control: Sequence[ControlInput] | None, config: ModelConfig, width: int, height: int,
                    first: int, steps: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    ) -> ControlRun:
    """Load specs (in ``dtype``), check every unit against the model (``config``), the ``width × height`` output and
    ``dtype``, and move its ControlNet to ``device`` (in place). Raises ``ConfigError`` for a ControlNet that does not
    fit the U-Net, the VAE's scale or the dtype, ``ImageError`` for a map not at the output size."""
    units = [load_control_unit(c, width, height, config.unet, dtype) if isinstance(c, ControlSpec) else c
             for c in control or ()]
    f = config.vae.downscale_factor
    for i, unit in enumerate(units):
        cfg = unit.model.config
        cfg.check_fits(config.unet)
        if cfg.hint_downscale != f:
            raise ConfigError(f"ControlNet {i} reads maps {cfg.hint_downscale}× the latent size, but this model's "
                              f"latents are 1/{f} of the image: a ControlNet made for another VAE")
        if tuple(unit.image.shape[2:]) != (height, width):
            raise ImageError(f"control map {i} is {unit.image.shape[3]}×{unit.image.shape[2]}, the output is "
                             f"{width}×{height}; prepare maps at the output size")
        if (held := next(unit.model.parameters()).dtype) != dtype:
            raise ConfigError(f"ControlNet {i} holds {held} weights, the pipeline runs {dtype}: load it in that dtype")
        unit.model.to(device)
    return ControlRun(tuple(units), first, steps)


def controlnet_source(model: str) -> str:
    """A ControlNet file or folder as an absolute path; ``embedded`` is the embedded model's demo ControlNet
    (:data:`nijimi.embedded.CONTROLNET`)."""
    return str(CONTROLNET if model == "embedded" else Path(model).absolute())


def load_control_unit(spec: ControlSpec, width: int, height: int, unet: UNetConfig | None = None,
                      dtype: torch.dtype = torch.float32) -> ControlUnit:
    """Load the spec's ControlNet (checked against the steered ``unet`` config when given) and prepare its map for
    a ``width × height`` output. The model is returned in eval mode without gradients."""
    model, _ = load_controlnet(spec.model, dtype=dtype)
    if unet is not None:
        model.config.check_fits(unet)
    model.requires_grad_(False)
    return ControlUnit(model, spec.control_map(width, height), spec.scale, spec.start, spec.end, spec.guess)
