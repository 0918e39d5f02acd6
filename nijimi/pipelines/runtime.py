"""Where and how a pipeline runs: the device, the networks' dtype, what the free memory allows (VAE tiles,
attention slices), and the CPU: its features, its thread count, and whether bf16 is faster on it. Tiling changes the
pixels slightly, slicing does not; a generation records both so that it can be replayed exactly."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from nijimi.errors import ConfigError
from nijimi.io.limits import available_memory
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


def generation_memory(unet: UNetConfig, vae: VAEConfig, width: int, height: int, batch: int, rows: int) -> int:
    """Bytes a generation of ``batch`` images of ``width`` × ``height`` pixels needs at least, estimated from the
    model's config before anything is allocated (``rows``: the U-Net's batch, doubled by classifier-free guidance).

    Counted, in float32: the U-Net's activations (at each level ``rows · channels · cells``, kept for the skip
    connections of each res block and the down-sampler, plus four working tensors at full latent size), eight latents
    per image for the sampler, six of the VAE decoder's widest activations per image (at most a 512 × 512 tile's, as
    :func:`vae_tile_for` tiles larger decodes) and the decoded pixels twice; plus the 8-bit
    images. Attention scores are left out (sliced when short, :func:`attention_slice_for`)."""
    f = vae.downscale_factor
    cells = (width // f) * (height // f)
    levels = sum(unet.model_channels * m * (unet.num_res_blocks + 1) * cells // 4**i
                 for i, m in enumerate(unet.channel_mult))
    unet_floats = rows * (levels + 4 * unet.model_channels * unet.channel_mult[0] * cells)
    pixels = width * height
    widest = max(m / 4**i for i, m in enumerate(vae.channel_mult))  # channels per pixel at the decoder's levels
    decode = int(6 * vae.channels * widest * min(pixels, 512 * 512))
    floats = unet_floats + batch * (8 * vae.z_channels * cells + decode + 2 * 3 * pixels)
    return 4 * floats + batch * 3 * pixels


def check_generation_memory(unet: UNetConfig, vae: VAEConfig, width: int, height: int, batch: int, rows: int,
                            memory: int | None = None) -> None:
    """ConfigError naming ``--size`` and ``--batch`` when :func:`generation_memory` exceeds the available memory
    (``memory``, default :func:`available_memory`)."""
    need = generation_memory(unet, vae, width, height, batch, rows)
    memory = available_memory() if memory is None else memory
    if need > memory:
        raise ConfigError(f"--size {width}x{height} with --batch {batch} needs about {need / 2**30:.1f} GiB for this "
                          f"model (latents, U-Net activations, decoded pixels); {memory / 2**30:.1f} GiB of memory "
                          "is available")


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


CPU_FEATURES = {"AVX2": "avx2", "AVX-512": "avx512f", "AVX-512 BF16": "avx512_bf16", "AMX BF16": "amx_bf16",
                "AMX tile": "amx_tile"}
"""The CPU features that decide fp32/bf16 speed: label → /proc/cpuinfo flag."""
THREADS_ENV = "NIJIMI_THREADS"
"""Environment variable: torch's intra-op threads (default: the physical cores, unless OMP_NUM_THREADS is set)."""


@dataclass(frozen=True)
class CPUInfo:
    """What /proc/cpuinfo says; ``features`` is None when it has no flags (not Linux: unknown)."""

    model: str
    features: dict[str, bool] | None
    physical_cores: int
    logical_cpus: int


def cpu_info(text: str | None = None) -> CPUInfo:
    """Parse ``text`` (default: /proc/cpuinfo). Physical cores are the distinct (physical id, core id) pairs;
    without them (or the file) the counts fall back to ``os.cpu_count()``."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    blocks = [dict(_field(line) for line in block.splitlines() if ":" in line)
              for block in text.split("\n\n") if block.strip()]
    flags = next((set(b["flags"].split()) for b in blocks if "flags" in b), None)
    cores = {(b["physical id"], b["core id"]) for b in blocks if "physical id" in b and "core id" in b}
    logical = sum("processor" in b for b in blocks) or os.cpu_count() or 1
    return CPUInfo(model=next((b["model name"] for b in blocks if "model name" in b), "unknown"),
                   features=None if flags is None else {k: f in flags for k, f in CPU_FEATURES.items()},
                   physical_cores=len(cores) or os.cpu_count() or 1, logical_cpus=logical)


def _field(line: str) -> tuple[str, str]:
    key, _, value = line.partition(":")
    return key.strip(), value.strip()


def default_threads(env: Mapping[str, str], physical_cores: int) -> int | None:
    """torch's intra-op thread count for a process started with ``env``: ``NIJIMI_THREADS`` when set (a positive
    integer, else ConfigError), None (leave torch's choice) when ``OMP_NUM_THREADS`` is set, else the physical cores."""
    value = env.get(THREADS_ENV)
    if value is None:
        return None if "OMP_NUM_THREADS" in env else physical_cores
    if not value.strip().isdigit() or int(value) < 1:
        raise ConfigError(f"{THREADS_ENV}={value!r} must be a positive integer")
    return int(value)


def apply_default_threads() -> None:
    """Set torch's intra-op threads by :func:`default_threads` for this process's environment."""
    threads = default_threads(os.environ, cpu_info().physical_cores)
    if threads is not None:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class DtypeTiming:
    """Best-of-several seconds of one operation in float32 and in bfloat16 on this CPU."""

    op: str
    fp32: float
    bf16: float


def time_bf16(size: int = 256, repeats: int = 3) -> list[DtypeTiming]:
    """Time a ``size``² matmul and a 3×3 conv2d (32 → 32 channels on ``size/8``² pixels), the U-Net's two heavy
    operations, in float32 and bfloat16 on the CPU; each the best of ``repeats`` runs after a warm-up."""
    pixels = size // 8
    ops = {"matmul": (torch.matmul, (torch.randn(size, size), torch.randn(size, size))),
           "conv2d": (torch.nn.functional.conv2d, (torch.randn(1, 32, pixels, pixels), torch.randn(32, 32, 3, 3)))}
    return [DtypeTiming(name, _best(op, args, torch.float32, repeats), _best(op, args, torch.bfloat16, repeats))
            for name, (op, args) in ops.items()]


def _best(op: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...], dtype: torch.dtype, repeats: int) -> float:
    args = tuple(a.to(dtype) for a in args)
    op(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        op(*args)
        times.append(time.perf_counter() - start)
    return min(times)
