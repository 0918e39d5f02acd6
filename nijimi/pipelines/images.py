"""Pixels in and out of a pipeline: PIL ↔ [-1, 1] tensors, init images and masks, sizes, memory-based tiling."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from nijimi.errors import ConfigError, ImageError

SIZE_MULTIPLE = 8
"""Widths and heights must be multiples of 8 pixels, the SD VAE's downscale factor."""


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            raise ConfigError(f"{name} {value!r} must be a positive multiple of {SIZE_MULTIPLE} pixels")


def open_image(image: Image.Image | str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """A PIL image from a path or an image, converted to ``mode``; unreadable files raise ImageError naming them."""
    if isinstance(image, Image.Image):
        return image.convert(mode)
    path = Path(image)
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"{path}: cannot read image ({exc})") from None


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


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` in about [-1, 1] → RGB PIL images (rounded as diffusers does: ×255, round, clip)."""
    array = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def available_memory() -> int:
    """Bytes of memory the OS says are available (MemAvailable), or 8 GiB when it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def vae_tile_for(width: int, height: int, channels: int, batch: int, memory: int | None = None) -> int | None:
    """Decoder tile size in pixels, or None when a whole-image decode fits in a quarter of the free memory.

    The decoder's largest activations are a few tensors of ``batch · channels · H · W`` floats at full resolution.
    """
    need = 6 * batch * channels * width * height * 4
    memory = available_memory() if memory is None else memory
    return None if need <= memory // 4 else 512
