"""The forward process on the user's own image (view ``forward``): the image encoded by the pipeline's VAE, noised by
q(x_t | x₀) = N(√ᾱ_t·x₀, (1−ᾱ_t)·I) (DDPM, arXiv 2006.11239, eq. 4) at chosen timesteps under the model's own
schedule and, for comparison, DDPM's linear and iDDPM's cosine schedules (arXiv 2102.09672), each decoded back to
pixels; plus ᾱ_t and SNR_t = ᾱ_t / (1 − ᾱ_t) plotted for the three. One seeded noise draw is shared by every
schedule and timestep, so the rows differ only by the schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.errors import ConfigError
from nijimi.explain.panels import Explanation, Panel
from nijimi.explain.plots import curve_figure, figure_image
from nijimi.explain.schedules import explained_schedules, noising_strip
from nijimi.pipelines.edit import posterior
from nijimi.pipelines.images import open_image, to_pil, to_tensor
from nijimi.pipelines.pipeline import Pipeline

DEFAULT_TIMESTEPS = (0, 100, 250, 500, 750, 999)
MAX_TIMESTEPS = 16
"""At most this many timesteps per call (each is one decode per schedule)."""


def compared_schedules(pipe: Pipeline) -> dict[str, NoiseSchedule]:
    """The model's own schedule, then DDPM's linear and iDDPM's cosine (:func:`explained_schedules`)."""
    own = pipe.model.config.schedule
    label = f"model ({own.beta_schedule}{', zero terminal SNR' if own.rescale_zero_terminal_snr else ''})"
    shown = explained_schedules()
    return {label: own, "linear (DDPM)": shown["linear (DDPM)"], "cosine (iDDPM)": shown["cosine (iDDPM)"]}


def check_timesteps(timesteps: Sequence[int], schedules: dict[str, NoiseSchedule]) -> list[int]:
    """The timesteps as ints, each within 0…T−1 of every schedule; ConfigError naming the first that is not."""
    last = min(s.num_train_timesteps for s in schedules.values()) - 1
    if not 1 <= len(timesteps) <= MAX_TIMESTEPS:
        raise ConfigError(f"timesteps: give 1 to {MAX_TIMESTEPS} timesteps, not {len(timesteps)}")
    for t in timesteps:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= last:
            raise ConfigError(f"timestep {t!r} must be an integer from 0 to {last}")
    return list(timesteps)


def fitted_size(image: Image.Image, limit: int) -> tuple[int, int]:
    """The image's size scaled down so that its long side is at most ``limit``, both sides multiples of 8."""
    scale = min(1.0, limit / max(image.size))
    return tuple(max(8, int(side * scale) // 8 * 8) for side in image.size)


def _slug(label: str) -> str:
    return label.split(" ")[0]


def forward_process(pipe: Pipeline, image: Image.Image, timesteps: Sequence[int] | None = None, *,
                    seed: int = 0) -> Explanation:
    """View ``forward``: for each schedule of :func:`compared_schedules` one panel per timestep (default
    :data:`DEFAULT_TIMESTEPS`) of ``image`` (scaled to at most the model's native size) noised in latent space by
    q(x_t | x₀) with noise drawn from ``seed`` and decoded, then the ᾱ_t and SNR plots. ``info``: the timesteps, the
    seed, the size, and per schedule ᾱ_t and SNR at those timesteps."""
    schedules = compared_schedules(pipe)
    steps = check_timesteps(list(DEFAULT_TIMESTEPS if timesteps is None else timesteps), schedules)
    width, height = fitted_size(image, pipe.native_size)
    pixels = to_tensor(open_image(image), width, height).to(pipe.device)
    with torch.inference_mode():
        x0 = posterior(pipe.model, pixels, None).mean * pipe.model.config.vae.scaling_factor
    panels, info = [], {}
    chosen = torch.tensor(steps)
    for label, schedule in schedules.items():
        noised = noising_strip(x0[0].float().cpu(), schedule, chosen, torch.Generator().manual_seed(seed))
        for t, picture in zip(steps, to_pil(pipe.decode(noised)), strict=True):
            panels.append(Panel(f"{label}: t = {t}", f"{_slug(label)}-t{t:04d}", picture))
        alpha_bar = schedule.alphas_cumprod[chosen].double()
        info[label] = {"alpha_bar": alpha_bar.tolist(), "snr": (alpha_bar / (1 - alpha_bar)).tolist()}
    curves = {label: s.alphas_cumprod for label, s in schedules.items()}
    panels.append(Panel("ᾱ_t: the share of the signal left", "alpha_bar",
                        figure_image(curve_figure("ᾱ_t", "ᾱ_t", curves, marks=steps, size=(4, 3)))))
    snr = {label: a / (1 - a) for label, a in ((k, s.alphas_cumprod.double()) for k, s in schedules.items())}
    panels.append(Panel("SNR_t = ᾱ_t / (1 − ᾱ_t)", "snr",
                        figure_image(curve_figure("SNR_t", "SNR (log scale)", snr, log=True, marks=steps,
                                                  size=(4, 3)))))
    return Explanation("forward", tuple(panels), {"timesteps": steps, "seed": seed, "size": [width, height],
                                                  "columns": len(steps), "schedules": info})
