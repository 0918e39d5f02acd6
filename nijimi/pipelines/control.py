"""ControlNet in a pipeline (arXiv:2302.05543): control maps, preprocessors, and the residuals each step adds.

A control map is an RGB image at the output size with values in [0, 1] (edges, depth, pose, scribbles …).
:func:`prepare_control_map` makes one from any picture: resize it to the output size (``resize``: stretch;
``crop``: scale to cover and centre-crop; ``fill``: scale to fit and fill the borders from the image's edges — the
three modes of diffusers' ``VaeImageProcessor`` and AUTOMATIC1111), then run a preprocessor on it (``map``: use as
is; ``invert``: black ↔ white, for dark-on-white scribbles and line art; ``canny``: OpenCV's Canny edge detector, the
detector lllyasviel's canny models were trained with). Preprocessing at the output size matches how the training
pairs were made.

During sampling, :func:`control_residuals` runs every active :class:`ControlUnit` on the batched U-Net inputs and
sums their residuals (several ControlNets at once, as diffusers' ``MultiControlNetModel``). A unit is active on the
sampling steps inside its ``[start, end]`` fraction of the run (diffusers' ``control_guidance_start/end``). In
guess mode (and for "shuffle"-style ControlNets with ``global_pool``) a unit steers only the conditional half of a
classifier-free-guidance batch, the unconditional half gets zero residuals, and its residuals are scaled up
geometrically from the shallowest skip to the middle block (:func:`nijimi.models.controlnet.residual_scales`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image

from nijimi.errors import ConfigError
from nijimi.io.controlnet import load_controlnet
from nijimi.models.controlnet import ControlNetModel
from nijimi.models.unet import UNetConfig
from nijimi.pipelines.images import open_image

RESIZE_MODES = ("resize", "crop", "fill")
PREPROCESSORS = ("map", "invert", "canny")

# ---- control maps -------------------------------------------------------------------------------------------------


def resize_image(image: Image.Image, width: int, height: int, mode: str = "resize") -> Image.Image:
    """An RGB ``image`` brought to ``width × height`` (Lanczos), by ``mode`` (see the module docstring).

    The arithmetic (integer sizes, centring, the edge-filled borders of ``fill``) is diffusers'
    ``VaeImageProcessor.resize``, so a map prepared here equals the one diffusers' ControlNet pipelines make.
    """
    if mode not in RESIZE_MODES:
        raise ConfigError(f"unknown control resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    image = image.convert("RGB")
    if mode == "resize":
        return image.resize((width, height), Image.LANCZOS)
    target_wider = width / height > image.width / image.height
    if (mode == "crop") == target_wider:
        size = (width, image.height * width // image.width)
    else:
        size = (image.width * height // image.height, height)
    scaled = image.resize(size, Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    left, top = width // 2 - size[0] // 2, height // 2 - size[1] // 2
    out.paste(scaled, (left, top))
    if mode == "fill":
        _fill_borders(out, scaled, left, top)
    return out


def _fill_borders(out: Image.Image, scaled: Image.Image, left: int, top: int) -> None:
    """Paint the empty bands around ``scaled`` (pasted at ``left, top``) with its first and last rows (or columns)
    stretched across them (bicubic resampling of a zero-height box, as diffusers does)."""
    w, h = scaled.size
    if top > 0:
        out.paste(scaled.resize((w, top), Image.BICUBIC, box=(0, 0, w, 0)), (0, 0))
        out.paste(scaled.resize((w, top), Image.BICUBIC, box=(0, h, w, h)), (0, top + h))
    if left > 0:
        out.paste(scaled.resize((left, h), Image.BICUBIC, box=(0, 0, 0, h)), (0, 0))
        out.paste(scaled.resize((left, h), Image.BICUBIC, box=(w, 0, w, h)), (left + w, 0))


def canny(image: Image.Image, low: float = 100, high: float = 200) -> Image.Image:
    """Canny edges (OpenCV, on the RGB image: per pixel the strongest channel gradient) as a white-on-black RGB map.

    ``low``/``high``: hysteresis thresholds on the Sobel gradient magnitude (ControlNet's defaults 100 and 200).
    Needs ``opencv-python-headless``.
    """
    try:
        import cv2
    except ImportError:
        raise ConfigError("the canny preprocessor needs OpenCV: pip install opencv-python-headless") from None
    if not 0 <= low <= high:
        raise ConfigError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    edges = cv2.Canny(np.asarray(image.convert("RGB")), float(low), float(high))
    return Image.fromarray(edges).convert("RGB")


def preprocess(image: Image.Image, name: str, low: float = 100, high: float = 200) -> Image.Image:
    """Run preprocessor ``name`` (``map``, ``invert``, ``canny``; thresholds for canny) on an image → RGB map."""
    if name == "map":
        return image.convert("RGB")
    if name == "invert":
        return Image.fromarray(255 - np.asarray(image.convert("RGB")))
    if name == "canny":
        return canny(image, low, high)
    raise ConfigError(f"unknown control preprocessor {name!r}; choose one of {', '.join(PREPROCESSORS)}")


def map_tensor(image: Image.Image) -> torch.Tensor:
    """RGB map → (1, 3, H, W) float32 in [0, 1] (``pixel / 255``)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def prepare_control_map(image: Image.Image | str | os.PathLike, width: int, height: int, resize: str = "resize",
                        pre: str = "map", low: float = 100, high: float = 200) -> torch.Tensor:
    """A control map for a ``width × height`` output: open, :func:`resize_image`, :func:`preprocess`, to tensor.

    Returns (1, 3, height, width) in [0, 1]. A missing or unreadable file raises ``ImageError`` naming it.
    """
    if width < 1 or height < 1:
        raise ConfigError(f"control map size must be positive, got {width}×{height}")
    return map_tensor(preprocess(resize_image(open_image(image), width, height, resize), pre, low, high))


# ---- units and residuals ------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ControlUnit:
    """One ControlNet steering a generation.

    ``model``: the ControlNet; ``image``: its control map (1, hint_channels, H, W) in [0, 1] at the output size;
    ``scale``: multiplier of its residuals (diffusers' ``controlnet_conditioning_scale``); ``start``/``end``: the
    fraction of the sampling steps it is active on; ``guess_mode``: see the module docstring.
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
    down_sum: list[torch.Tensor] | None = None
    mid_sum: torch.Tensor | None = None
    for unit in units:
        if not unit.active(begin, finish):
            continue
        rows = None
        if unit.cond_only and cond_only_mask is not None:
            rows = _mask_rows(cond_only_mask, x.shape[0])
            if rows.numel() == 0:
                continue
        down, mid = _unit_residuals(unit, x, t, context, rows)
        down_sum = down if down_sum is None else [a + b for a, b in zip(down_sum, down, strict=True)]
        mid_sum = mid if mid_sum is None else mid_sum + mid
    return down_sum, mid_sum


def _mask_rows(mask: torch.Tensor, batch: int) -> torch.Tensor:
    if mask.dtype != torch.bool or mask.shape != (batch,):
        raise ConfigError(f"cond_only_mask must be a ({batch},) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    return mask.nonzero().squeeze(1)


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
    """(len(rows), …) → (batch, …) with the values at ``rows`` and zeros elsewhere."""
    out = residual.new_zeros((batch, *residual.shape[1:]))
    out[rows] = residual
    return out


# ---- the --control flag -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlSpec:
    """One ``--control`` flag: ControlNet file or folder, map image and how to use them (:func:`parse_control_spec`).

    ``low``/``high`` are canny's thresholds (``None``: 100 and 200); ``guess`` is guess mode.
    """

    model: str
    image: str
    scale: float = 1.0
    pre: str = "map"
    start: float = 0.0
    end: float = 1.0
    low: float | None = None
    high: float | None = None
    resize: str = "resize"
    guess: bool = False

    def __post_init__(self) -> None:
        if self.pre not in PREPROCESSORS:
            raise ConfigError(f"unknown control preprocessor pre={self.pre!r}; choose one of "
                              f"{', '.join(PREPROCESSORS)}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"unknown control resize mode resize={self.resize!r}; choose one of "
                              f"{', '.join(RESIZE_MODES)}")
        if self.pre != "canny" and (self.low is not None or self.high is not None):
            raise ConfigError(f"low/high are canny thresholds; they need pre=canny, not pre={self.pre}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ConfigError(f"control start/end must satisfy 0 <= start < end <= 1, got start={self.start}, "
                              f"end={self.end}")

    def control_map(self, width: int, height: int) -> torch.Tensor:
        """The spec's map for a ``width × height`` output (:func:`prepare_control_map`): (1, 3, height, width)."""
        low = 100 if self.low is None else self.low
        high = 200 if self.high is None else self.high
        return prepare_control_map(self.image, width, height, self.resize, self.pre, low, high)


_FLOAT_KEYS = ("scale", "start", "end", "low", "high")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_control_spec(spec: str) -> ControlSpec:
    """Parse ``model=PATH,image=IMG[,scale=1.0][,pre=map|invert|canny][,low=100,high=200][,start=0][,end=1]
    [,resize=resize|crop|fill][,guess=false]``. Unknown or repeated keys, a missing model or image, and values that
    do not parse raise :class:`ConfigError` naming them."""
    known = [f.name for f in fields(ControlSpec)]
    values: dict[str, str] = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--control: {item.strip()!r} is not key=value (in {spec!r})")
        if key in values:
            raise ConfigError(f"--control: key {key!r} given twice")
        values[key] = value.strip()
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ConfigError(f"--control: unknown keys {unknown}; known: {', '.join(known)}")
    missing = [k for k in ("model", "image") if not values.get(k)]
    if missing:
        raise ConfigError(f"--control: missing {' and '.join(missing)} (need model=PATH,image=IMG)")
    return ControlSpec(**{k: _convert(k, v) for k, v in values.items()})


def _convert(key: str, value: str) -> str | float | bool:
    if key in _FLOAT_KEYS:
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"--control: {key}={value!r} is not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"--control: {key}={value!r} must be finite")
        return number
    if key == "guess":
        if value.lower() not in _TRUE + _FALSE:
            raise ConfigError(f"--control: guess={value!r} must be true or false")
        return value.lower() in _TRUE
    return value


def load_control_unit(spec: ControlSpec, width: int, height: int, unet: UNetConfig | None = None,
                      dtype: torch.dtype = torch.float32) -> ControlUnit:
    """Load the spec's ControlNet (checked against the steered ``unet`` config when given) and prepare its map for
    a ``width × height`` output. The model is returned in eval mode without gradients."""
    model, _ = load_controlnet(spec.model, dtype=dtype)
    if unet is not None:
        model.config.check_fits(unet)
    model.requires_grad_(False)
    return ControlUnit(model, spec.control_map(width, height), spec.scale, spec.start, spec.end, spec.guess)
