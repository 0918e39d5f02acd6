"""Control maps for ControlNet (arXiv:2302.05543): from any picture to the (1, 3, H, W) map a ControlNet reads.

A control map is an RGB image at the output size with values in [0, 1] (edges, masks, depth, scribbles …).
:func:`prepare_control_map` makes one: bring the picture to the output size (``resize``: stretch; ``crop``: scale
to cover and centre-crop; ``fill``: scale to fit and fill the borders from the image's edges — the three modes of
diffusers' ``VaeImageProcessor`` and AUTOMATIC1111; ``none``: use it as it is, it must already have the output size,
for crisp maps that resampling would blur), then run a preprocessor on it (``map``: use as is; ``invert``: black ↔
white, for dark-on-white scribbles and line art; ``canny``: OpenCV's Canny edge detector, the detector lllyasviel's
canny models were trained with). Preprocessing at the output size matches how the training pairs were made.
A ``--control`` flag (:func:`parse_control_spec`) names a ControlNet, a picture and these choices.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image

from nijimi.errors import ConfigError, ImageError, optional_import
from nijimi.pipelines.images import open_image

RESIZE_MODES = ("resize", "crop", "fill", "none")
PREPROCESSORS = ("map", "invert", "canny")


def resize_image(image: Image.Image, width: int, height: int, mode: str = "resize") -> Image.Image:
    """An RGB ``image`` brought to ``width × height`` (Lanczos), by ``mode`` (see the module docstring).

    The arithmetic (integer sizes, centring, the edge-filled borders of ``fill``) is diffusers'
    ``VaeImageProcessor.resize``, so a map prepared here equals the one diffusers' ControlNet pipelines make.
    ``none`` raises :class:`ImageError` naming both sizes unless the image is already ``width × height``.
    """
    if mode not in RESIZE_MODES:
        raise ConfigError(f"unknown control resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    image = image.convert("RGB")
    if mode == "none":
        if image.size != (width, height):
            raise ImageError(f"control map is {image.width}×{image.height} but the output is {width}×{height} "
                             "(resize=none uses the map as it is; choose resize, crop or fill to adapt it)")
        return image
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
    Needs OpenCV, the ``nijimi[control]`` extra.
    """
    cv2 = optional_import("cv2", "canny needs OpenCV", "control")
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


# ---- the --control flag -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlSpec:
    """One ``--control`` flag: ControlNet file or folder, map image and how to use them (:func:`parse_control_spec`).

    ``low``/``high`` are canny's thresholds (``None``: 100 and 200); ``guess`` is guess mode. ``image`` is a file, or
    an image in memory (an HTTP client's), which a recipe cannot record.
    """

    model: str
    image: str | Image.Image
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
    [,resize=resize|crop|fill|none][,guess=false]``. Unknown or repeated keys, a missing model or image, and values that
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
