"""``nijimi explain schedules``: pictures of how the linear, scaled-linear and cosine schedules destroy an image."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from nijimi.diffusion.forward import q_sample
from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.explain.plots import curve_figure, figure
from nijimi.io.image_file import read_image

STRIP_SIZE = 96
STRIP_TIMESTEPS = 10


def explained_schedules() -> dict[str, NoiseSchedule]:
    """The three schedules compared: DDPM's linear β (2006.11239), SD's scaled-linear β, iDDPM's cosine (2102.09672)."""
    return {
        "linear (DDPM)": NoiseSchedule(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        "scaled_linear (SD)": NoiseSchedule.sd(),
        "cosine (iDDPM)": NoiseSchedule(beta_schedule="cosine"),
    }


def generated_pattern(size: int = STRIP_SIZE) -> torch.Tensor:
    """A generated RGB test image in [-1, 1], (3, size, size): colour ramps, rings and a checkerboard corner."""
    coords = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    radius = (x**2 + y**2).sqrt()
    red = x
    green = torch.cos(radius * 12)
    blue = torch.where((x > 0) & (y > 0), torch.sign(torch.sin(x * 20) * torch.sin(y * 20)), -y)
    return torch.stack([red, green, blue]).clamp(-1, 1)


def load_image(path: str | Path, size: int = STRIP_SIZE) -> torch.Tensor:
    """Read an image file, centre-crop it square and resize to ``size``; returns (3, size, size) in [-1, 1]."""
    img = read_image(path).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def strip_timesteps(schedule: NoiseSchedule, count: int = STRIP_TIMESTEPS) -> torch.Tensor:
    """``count`` evenly spaced integer timesteps from 0 to T-1, (count,) int64."""
    return torch.linspace(0, schedule.num_train_timesteps - 1, count).round().long()


def noising_strip(image: torch.Tensor, schedule: NoiseSchedule, timesteps: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """The image noised by q(x_t | x₀) at each timestep with one shared noise draw; (3, H, W) → (N, 3, H, W)."""
    noise = torch.randn(image.shape, generator=generator)
    n = timesteps.shape[0]
    return q_sample(image.expand(n, -1, -1, -1), timesteps, noise.expand(n, -1, -1, -1), schedule)


def _curve_plot(path: Path, title: str, ylabel: str, curves: dict[str, torch.Tensor]) -> Path:
    curve_figure(title, ylabel, curves).savefig(path)
    return path


def _strip_plot(path: Path, image: torch.Tensor, schedules: dict[str, NoiseSchedule]) -> Path:
    fig = figure(STRIP_TIMESTEPS * 1.2, len(schedules) * 1.45)
    axes = fig.subplots(len(schedules), STRIP_TIMESTEPS, squeeze=False)
    for row, (name, schedule) in enumerate(schedules.items()):
        timesteps = strip_timesteps(schedule)
        strip = noising_strip(image, schedule, timesteps, torch.Generator().manual_seed(0))
        for col, (t, frame) in enumerate(zip(timesteps.tolist(), strip, strict=True)):
            ax = axes[row][col]
            ax.imshow(((frame.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"t={t}", fontsize=8)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


EXPLAIN_FILES = ("alpha_bar.png", "log_snr.png", "noising.png")
"""The files :func:`explain_schedules` writes."""


def explain_schedules(out_dir: str | Path, image: str | Path | None = None) -> list[Path]:
    """Write ``alpha_bar.png`` (ᾱ_t), ``log_snr.png`` and ``noising.png`` (the image at 10 timesteps under each
    schedule) into ``out_dir``; returns their paths. Without ``image`` a generated test pattern is used."""
    picture = generated_pattern() if image is None else load_image(image)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schedules = explained_schedules()
    return [
        _curve_plot(out / EXPLAIN_FILES[0], "ᾱ_t: how much signal is left", "ᾱ_t",
                    {name: s.alphas_cumprod for name, s in schedules.items()}),
        _curve_plot(out / EXPLAIN_FILES[1], "log-SNR_t = log(ᾱ_t / (1 - ᾱ_t))", "log-SNR",
                    {name: s.log_snr for name, s in schedules.items()}),
        _strip_plot(out / EXPLAIN_FILES[2], picture, schedules),
    ]
