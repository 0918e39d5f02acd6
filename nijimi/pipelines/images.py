"""Pixels in and out of a pipeline: PIL ↔ tensors, init images and masks, sizes."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from nijimi.errors import ConfigError
from nijimi.io.image_file import read_image

SIZE_MULTIPLE = 8
"""Widths and heights must be multiples of 8 pixels, the SD VAE's downscale factor (or of a model's larger VAE
factor, see :func:`check_size`); the U-Net takes any latent size."""


def check_size(width: int, height: int, multiple: int = SIZE_MULTIPLE) -> None:
    """Raise ConfigError unless width and height are positive multiples of ``multiple`` (and of 8) pixels."""
    multiple = math.lcm(multiple, SIZE_MULTIPLE)
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
            raise ConfigError(f"{name} {value!r} must be a positive multiple of {multiple} pixels for this model")


def open_image(image: Image.Image | str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """A PIL image from a path or an image, turned upright by its EXIF orientation and converted to ``mode``;
    missing, special, unreadable and too large files raise ImageError naming them
    (:func:`nijimi.io.image_file.read_image`)."""
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).convert(mode)
    return ImageOps.exif_transpose(read_image(image)).convert(mode)


def to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB image → ``(1, 3, height, width)`` in [-1, 1], resized with Lanczos when its size differs."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def mask_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """Greyscale mask → ``(1, 1, height, width)`` in {0, 1} (resized with Lanczos, then thresholded at ½ as
    diffusers does): 1 (white) is the region to repaint."""
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    array = (np.asarray(mask.convert("L"), dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)
    return torch.from_numpy(array)[None, None]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """VAE output ``(B, 3, H, W)`` in about [-1, 1] → float32 in [0, 1] on the CPU (diffusers' ``x/2 + 0.5``, clipped:
    its ``output_type="np"`` images, channels first)."""
    return (images.detach().float().cpu() / 2 + 0.5).clamp(0, 1)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` in [0, 1] → RGB PIL images (rounded as diffusers does: ×255, round)."""
    array = pixels.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
