"""A sampler name, parsed once into everything that depends on it: :class:`SamplerChoice`.

A name is a bare sampler (its σ's follow the model's own timestep spacing) or one suffixed ``-karras`` /
``-exponential``; A1111's display names ("DPM++ 2M Karras", "Euler a") and ComfyUI's / diffusers' spellings are
accepted too. The choice knows its function, σ spacing, canonical and display names, the scale of its starting
noise, whether timesteps are rounded, and where its noise comes from; nothing downstream looks at the string again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nijimi.diffusion.noise import BrownianNoise, Generators, gaussian_noise
from nijimi.diffusion.samplers import SAMPLERS, NoiseSampler
from nijimi.diffusion.schedules import NoiseSchedule, sampling_sigmas
from nijimi.errors import SamplerError

SPACINGS = ("karras", "exponential")

_DISPLAY_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "euler-a": "Euler a", "heun": "Heun",
                  "dpm++2m": "DPM++ 2M", "dpm++2m-sde": "DPM++ 2M SDE", "unipc": "UniPC"}
# Spelling-insensitive keys (lower case, no spaces, "-" or "_"): ours, A1111's, ComfyUI's and diffusers' names.
_ALIASES = {"ddpm": "ddpm", "ddim": "ddim", "euler": "euler", "eulera": "euler-a", "eulerancestral": "euler-a",
            "heun": "heun", "dpm++2m": "dpm++2m", "dpmpp2m": "dpm++2m", "dpm++2msde": "dpm++2m-sde",
            "dpmpp2msde": "dpm++2m-sde", "unipc": "unipc"}
# Samplers whose diffusers scheduler starts from variance-preserving noise (init_noise_sigma = sqrt(σ₀² + 1)).
_VP_SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "unipc")
_ETA_SAMPLERS = ("ddim", "euler-a", "dpm++2m-sde")
_NOISE = {"ddpm": "gaussian", "ddim": "gaussian", "euler-a": "gaussian", "dpm++2m-sde": "brownian"}


@dataclass(frozen=True)
class SamplerChoice:
    """One sampler with one σ spacing. Build it with :func:`parse_sampler`; two choices are equal when their names
    are. ``fn`` is the sampling function of :mod:`nijimi.diffusion.samplers`."""

    base: str
    spacing: str = "model"
    fn: Callable[..., torch.Tensor] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.base not in SAMPLERS or self.spacing not in ("model", *SPACINGS):
            raise SamplerError(f"no sampler {self.base!r} with σ spacing {self.spacing!r}")
        object.__setattr__(self, "fn", SAMPLERS[self.base])

    @property
    def name(self) -> str:
        """nijimi's spelling: ``"dpm++2m-karras"``."""
        return self.base if self.spacing == "model" else f"{self.base}-{self.spacing}"

    @property
    def display(self) -> str:
        """A1111's display name (for PNG metadata): ``"DPM++ 2M Karras"``."""
        return _DISPLAY_NAMES[self.base] + ("" if self.spacing == "model" else f" {self.spacing.capitalize()}")

    @property
    def takes_eta(self) -> bool:
        """Whether the sampler has an η (noise amount) option."""
        return self.base in _ETA_SAMPLERS

    @property
    def quantize(self) -> bool:
        """diffusers' multistep solvers round the timesteps of Karras/exponential σ's to integers; so do we."""
        return self.base.startswith(("dpm++", "unipc")) and self.spacing != "model"

    def sigmas(self, schedule: NoiseSchedule, steps: int) -> torch.Tensor:
        """The (steps+1,) σ's this sampler walks for ``schedule`` (:func:`sampling_sigmas`)."""
        return sampling_sigmas(schedule, steps, self.spacing)

    def start_scale(self, sigma_max: float, schedule: NoiseSchedule) -> float:
        """The txt2img starting latent is unit noise times this: diffusers' ``init_noise_sigma`` carried to σ-space,
        ``sqrt(σ₀²+1)`` (the variance-preserving x_T = z), except the Euler-type samplers (euler, euler-a, heun) with
        a "linspace" or "trailing" model spacing, which use ``σ₀``."""
        if self.base in _VP_SAMPLERS or schedule.timestep_spacing == "leading":
            return (sigma_max**2 + 1) ** 0.5
        return sigma_max

    def noise(self, x: torch.Tensor, sigma_max: float, generators: Generators) -> NoiseSampler | None:
        """The noise source of a stochastic sampler for latents like ``x`` (per-step Gaussian draws, or a Brownian
        tree over [0, σ_max]) from the images' generators; None for a deterministic one."""
        kind = _NOISE.get(self.base)
        if kind == "brownian":
            return BrownianNoise(x, sigma_max, generators, self.name)
        return gaussian_noise(x, generators, self.name) if kind else None


def parse_sampler(name: str) -> SamplerChoice:
    """The choice for any accepted spelling: ``"dpm++2m-karras"``, ``"DPM++ 2M Karras"``, ``"Euler a"``, ``"euler"``."""
    if not isinstance(name, str):
        raise SamplerError(f"sampler {name!r} must be a name (a string)")
    key = name.strip().lower()
    spacing = "model"
    for suffix in SPACINGS:
        if len(key) > len(suffix) and key.endswith(suffix) and key[-len(suffix) - 1] in " -_":
            key, spacing = key[: -len(suffix) - 1], suffix
    base = _ALIASES.get(key.replace(" ", "").replace("-", "").replace("_", ""))
    if base is None:
        known = ", ".join(f"{n}[-{'|-'.join(SPACINGS)}]" for n in SAMPLERS)
        raise SamplerError(f"unknown sampler {name!r}; known: {known} (or A1111 names like 'DPM++ 2M Karras')")
    return SamplerChoice(base, spacing)


def default_sampler(schedule: NoiseSchedule) -> SamplerChoice:
    """The sampler used when none is named: DPM++ 2M Karras, A1111's usual choice; but DPM++ 2M on the model's own
    timesteps for a zero-terminal-SNR schedule, whose σ_max ≈ 4096 would put 14 of 20 Karras steps above σ = 14,
    where the image has no structure yet (2305.08891 samples such models on "trailing" timesteps)."""
    return SamplerChoice("dpm++2m", "model" if schedule.rescale_zero_terminal_snr else "karras")
