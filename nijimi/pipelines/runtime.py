"""Where and how a pipeline runs: the device, the networks' dtype, and what the free memory allows (VAE tiles,
attention slices). Tiling changes the pixels slightly, slicing does not; a generation records both so that it can
be replayed exactly."""

from __future__ import annotations

from pathlib import Path

import torch

from nijimi.errors import ConfigError
from nijimi.models.unet import UNetConfig
from nijimi.models.vae import VAEConfig

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Weight dtypes of the U-Net and text encoder a pipeline can run in; the VAE and the samplers stay float32."""
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` as a torch device; ConfigError when it is not available."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type not in DEVICE_TYPES:
        raise ConfigError(f"device {device} is not supported; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device}: CUDA is not available to this torch {torch.__version__}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device}: Apple MPS is not available")
    return device


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bf16"`` (the names of :data:`WEIGHT_DTYPES`); ConfigError for any other dtype."""
    for name, value in WEIGHT_DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"dtype {dtype} is not one of {', '.join(map(str, WEIGHT_DTYPES.values()))}")


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


def attention_slice_for(tokens: int, heads: int, rows: int, memory: int | None = None) -> int | None:
    """Query rows per attention chunk, or None when the whole score matrix fits in a quarter of the free memory.

    Self-attention over ``tokens`` latent cells holds ``rows · heads · tokens²`` float32 scores (rows: the U-Net's
    batch, doubled by classifier-free guidance); a slice of ``s`` query rows holds ``rows · heads · s · tokens``.
    """
    per_row = rows * heads * tokens * 4
    budget = (available_memory() if memory is None else memory) // 4
    return None if per_row * tokens <= budget else max(1, budget // per_row)


def _requested(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{what} {value!r} must be 0 (off), a positive integer, or None (automatic)")


def choose_vae_tile(requested: int | None, cfg: VAEConfig, width: int, height: int, batch: int) -> int | None:
    """The VAE tile in pixels (None: whole images) for ``requested``: None = by free memory, 0 = off, else that
    size (a multiple of the VAE factor)."""
    _requested(requested, "VAE tile")
    if requested is None:
        return vae_tile_for(width, height, cfg.channels * max(cfg.channel_mult), batch)
    if requested % cfg.downscale_factor:
        raise ConfigError(f"VAE tile {requested} must be a multiple of the VAE factor {cfg.downscale_factor} pixels")
    return requested or None


def choose_attention_slice(requested: int | None, cfg: UNetConfig, latent: tuple[int, int], rows: int) -> int | None:
    """Query rows per attention slice (None: unsliced) for ``requested``: None = by free memory for the U-Net's
    largest self-attention (over the latent cells at its first attention level), 0 = off, else that many rows.
    ``latent``: (h, w) latent cells; ``rows``: U-Net batch rows."""
    _requested(requested, "attention slice")
    if requested is not None or not cfg.attention_levels:
        return requested or None
    level = min(cfg.attention_levels)
    heads, _ = cfg.heads_for(cfg.model_channels * cfg.channel_mult[level])
    return attention_slice_for((latent[0] >> level) * (latent[1] >> level), heads, rows)
