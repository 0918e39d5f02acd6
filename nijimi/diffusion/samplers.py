"""Samplers: plain functions that walk a denoiser ``D(x, σ) → x̂₀`` down a decreasing list of σ's (k-diffusion style).

Every sampler has the signature::

    sample_x(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, start=0, blend=None) -> x

- ``denoiser(x, sigma, **extra_args)``: x (B, ...) in σ-space (``x = x₀ + σ·ε``), sigma (B,); returns x̂₀ (B, ...).
  Build it with :class:`nijimi.diffusion.denoiser.Denoiser` (and :class:`~nijimi.diffusion.guidance.GuidedNetwork`).
- ``sigmas``: (N+1,) strictly decreasing, last entry 0 — from :func:`~nijimi.diffusion.schedules.sampling_sigmas`.
- ``start``: index of the first σ to denoise from (img2img); the sampler runs steps ``start … N-1``.
- ``callback(info)``: called after every step with a :class:`StepInfo` (progress bars, previews).
- ``generator``: a ``torch.Generator`` or one per batch element; required by the stochastic samplers (ddpm,
  euler-a, dpm++2m-sde, ddim with η > 0), ignored by the others.
- ``blend(x, i, sigma_next) -> x``: called after step i, when x sits at ``sigma_next = sigmas[i+1]``; it returns the
  latent to continue from. Inpainting replaces the known region by the original latent re-noised to that σ
  (:func:`masked_blend`); at the last step ``sigma_next = 0``, so the known region becomes the original exactly.

How a pipeline builds the starting latent (z = unit Gaussian noise of the latent's shape, from the image seed):

- txt2img: ``x = initial_latent(z, sigmas, schedule, sampler_name)`` and ``start = 0``. This is diffusers'
  ``noise · init_noise_sigma`` carried to σ-space: ``z·sqrt(σ₀²+1)`` (the variance-preserving x_T = z), except the
  Euler-type samplers (euler, euler-a, heun) with a "linspace" or "trailing" model spacing, which use ``z·σ₀``.
- img2img with strength s: ``start = img2img_start(steps, s)`` (diffusers: ``steps - min(int(steps·s), steps)``),
  and ``x = noised_latent(x₀, z, sigmas, start) = x₀ + z·sigmas[start]`` where x₀ is the encoded image latent.
The network's input scaling ``x/sqrt(σ²+1)`` is the denoiser's job, not the pipeline's.

A sampler name is a bare sampler (its σ's use the model's own timestep spacing) or one suffixed ``-karras`` /
``-exponential``; A1111's display names ("DPM++ 2M Karras", "Euler a") are accepted too. All samplers run in fp32
tensor ops; per-step scalar coefficients are computed once in Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nijimi.diffusion.noise import BrownianNoise, Generators, gaussian_like
from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.errors import SamplerError

Denoiser = Callable[..., torch.Tensor]
Blend = Callable[[torch.Tensor, int, float], torch.Tensor]


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees after step ``i`` of ``steps``: the latent ``x`` now at ``sigma_next`` and the
    denoised prediction x̂₀ made at ``sigma`` (for previews). Tensors are the sampler's own; do not modify them."""

    i: int
    steps: int
    sigma: float
    sigma_next: float
    x: torch.Tensor
    denoised: torch.Tensor


Callback = Callable[[StepInfo], None]


def _check(sigmas: torch.Tensor, start: int) -> list[float]:
    """Validate the σ schedule and start index; return the σ's as Python floats."""
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise SamplerError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    s = sigmas.tolist()
    for i, (a, b) in enumerate(zip(s[:-1], s[1:], strict=True)):
        if not a > b:
            raise SamplerError(f"sigmas must be strictly decreasing: sigmas[{i}]={a} then sigmas[{i + 1}]={b}")
    if s[-1] < 0:
        raise SamplerError(f"the last sigma must be >= 0, got {s[-1]}")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(s) - 1:
        raise SamplerError(f"start={start!r} must be an integer index from 0 to {len(s) - 1}")
    return s


def _sigma(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x.new_full((x.shape[0],), sigma)


def _after_step(x: torch.Tensor, i: int, s: list[float], denoised: torch.Tensor, callback: Callback | None,
                blend: Blend | None) -> torch.Tensor:
    if blend is not None:
        x = blend(x, i, s[i + 1])
    if callback is not None:
        callback(StepInfo(i, len(s) - 1, s[i], s[i + 1], x, denoised))
    return x


def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                 callback: Callback | None = None, generator: Generators | None = None, start: int = 0,
                 blend: Blend | None = None) -> torch.Tensor:
    """Euler: first-order steps of the probability-flow ODE dx/dσ = (x - x̂₀)/σ (EDM, 2206.00364, Alg. 1)."""
    s, extra = _check(sigmas, start), extra_args or {}
    for i in range(start, len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra)
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
        x = _after_step(x, i, s, denoised, callback, blend)
    return x


def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                callback: Callback | None = None, generator: Generators | None = None, start: int = 0,
                blend: Blend | None = None) -> torch.Tensor:
    """Heun: second-order ODE steps, two denoiser calls per step; Euler on the last step (EDM, 2206.00364, Alg. 1)."""
    s, extra = _check(sigmas, start), extra_args or {}
    for i in range(start, len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra)
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = (x_euler - denoiser(x_euler, _sigma(x, s[i + 1]), **extra)) / s[i + 1]
            x = x + (d + d_next) / 2 * dt
        x = _after_step(x, i, s, denoised, callback, blend)
    return x


def _ancestral(name: str, eta: float, denoiser: Denoiser, x: torch.Tensor, s: list[float], extra: dict,
               callback: Callback | None, generator: Generators | None, start: int,
               blend: Blend | None) -> torch.Tensor:
    """DDIM's generalised step in σ-space (2010.02502, eq. 12 and 16, divided by sqrt(ᾱ_prev)):

    ε̂ = (x - x̂₀)/σ,  σ_up = η·σ'·sqrt(1 - σ'²/σ²),  σ_down = sqrt(σ'² - σ_up²),  x' = x̂₀ + σ_down·ε̂ + σ_up·z.
    η = 0 is deterministic DDIM; η = 1 samples the DDPM posterior q(x_{t'} | x_t, x̂₀) exactly.
    """
    if not 0.0 <= eta <= 1.0:
        raise SamplerError(f"{name}: eta={eta} must be within [0, 1]")
    for i in range(start, len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoiser(x, _sigma(x, sigma), **extra)
        sigma_up = eta * sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = denoised + (x - denoised) * (sigma_down / sigma)
        if sigma_up > 0:
            x = x + gaussian_like(x, generator, name) * sigma_up
        x = _after_step(x, i, s, denoised, callback, blend)
    return x


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                callback: Callback | None = None, generator: Generators | None = None, start: int = 0,
                blend: Blend | None = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (2010.02502): deterministic at η = 0 (where it equals Euler), stochastic for η in (0, 1]."""
    s = _check(sigmas, start)
    return _ancestral("ddim", eta, denoiser, x, s, extra_args or {}, callback, generator, start, blend)


def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                callback: Callback | None = None, generator: Generators | None = None, start: int = 0,
                blend: Blend | None = None) -> torch.Tensor:
    """DDPM ancestral sampling (2006.11239) with the posterior variance β̃: DDIM with η = 1 (2010.02502, §4.1)."""
    s = _check(sigmas, start)
    return _ancestral("ddpm", 1.0, denoiser, x, s, extra_args or {}, callback, generator, start, blend)


def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                           extra_args: dict | None = None, callback: Callback | None = None,
                           generator: Generators | None = None, start: int = 0, blend: Blend | None = None,
                           eta: float = 1.0) -> torch.Tensor:
    """Euler ancestral: an Euler step down to σ_down, then fresh noise of size σ_up (k-diffusion; = DDPM at η = 1)."""
    s = _check(sigmas, start)
    return _ancestral("euler-a", eta, denoiser, x, s, extra_args or {}, callback, generator, start, blend)


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                    callback: Callback | None = None, generator: Generators | None = None, start: int = 0,
                    blend: Blend | None = None) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep in log-SNR, one call per step (2211.01095, Alg. 2)."""
    s, extra = _check(sigmas, start), extra_args or {}
    old_denoised, h_last = None, 0.0
    for i in range(start, len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            d = denoised
            if old_denoised is not None:
                half_inv_r = h / (2 * h_last)
                d = (1 + half_inv_r) * denoised - half_inv_r * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        x = _after_step(x, i, s, denoised, callback, blend)
    return x


def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                        extra_args: dict | None = None, callback: Callback | None = None,
                        generator: Generators | None = None, start: int = 0, blend: Blend | None = None,
                        eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: stochastic second-order multistep, Brownian-tree noise (2211.01095).

    The midpoint form of diffusers' ``sde-dpmsolver++`` / k-diffusion's ``sample_dpmpp_2m_sde``; ``eta`` scales the
    injected noise (0 gives a deterministic exponential integrator). Noise comes from a Brownian tree seeded from
    ``generator`` (:class:`~nijimi.diffusion.noise.BrownianNoise`), so it does not depend on the step count.
    """
    s, extra = _check(sigmas, start), extra_args or {}
    if not 0.0 <= eta <= 1.0:
        raise SamplerError(f"dpm++2m-sde: eta={eta} must be within [0, 1]")
    noise = BrownianNoise(x, s[0], generator, "dpm++2m-sde") if eta > 0 else None
    old_denoised, h_last = None, 0.0
    for i in range(start, len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            eta_h = eta * h
            gain = -math.expm1(-h - eta_h)
            x = (s[i + 1] / s[i] * math.exp(-eta_h)) * x + gain * denoised
            if old_denoised is not None:
                x = x + (0.5 * gain * h / h_last) * (denoised - old_denoised)
            if noise is not None:
                x = x + noise(s[i], s[i + 1]) * (s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)))
            h_last = h
        old_denoised = denoised
        x = _after_step(x, i, s, denoised, callback, blend)
    return x


def _unipc_update(x: torch.Tensor, sigma: float, sigma_to: float, history: list[tuple[float, torch.Tensor]],
                  order: int, corrector: torch.Tensor | None = None) -> torch.Tensor:
    """One UniP (``corrector=None``) or UniC step of UniPC-bh2 (2302.04867, Alg. 1–2) in σ-space, from x at
    ``sigma`` to ``sigma_to``. ``history``: (σ_k, x̂₀ at σ_k), most recent last; its last entry is at ``sigma``.
    ``corrector``: x̂₀ evaluated at the predicted point (σ_to) — UniC then re-does the step with it.
    """
    d0 = history[-1][1]
    if sigma_to == 0:
        return d0
    h = math.log(sigma / sigma_to)
    rks = [math.log(sigma / history[-1 - k][0]) / h for k in range(1, order)] + [1.0]
    d1s = [(history[-1 - k][1] - d0) / rks[k - 1] for k in range(1, order)]
    h_phi_1 = b_h = math.expm1(-h)
    x_linear = (sigma_to / sigma) * x - h_phi_1 * d0
    # b_k = k!·φ_{k+1}(-h)·(-h)^k / B(h) from the recurrence φ_{k+1} = (φ_k - 1/k!)/(-h); B(h) = e^{-h} - 1 (bh2).
    b, h_phi_k, factorial = [], h_phi_1 / -h - 1, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / -h - 1 / factorial
    R = torch.tensor([[r**j for r in rks] for j in range(order)], dtype=torch.float64)
    b = torch.tensor(b, dtype=torch.float64)
    if corrector is not None:
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
        d1s = d1s + [corrector - d0]
    elif order == 1:
        return x_linear
    else:
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    return x_linear - b_h * sum(rho * d1 for rho, d1 in zip(rhos, d1s, strict=True))


def sample_unipc(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                 callback: Callback | None = None, generator: Generators | None = None, start: int = 0,
                 blend: Blend | None = None, order: int = 2) -> torch.Tensor:
    """UniPC-bh2: multistep predictor plus a free corrector that reuses each new evaluation (2302.04867)."""
    s, extra = _check(sigmas, start), extra_args or {}
    if order not in (1, 2, 3):
        raise SamplerError(f"unipc: order={order!r} must be 1, 2 or 3")
    steps = len(s) - 1
    history: list[tuple[float, torch.Tensor]] = []
    x_last, last_order = None, 0
    for i in range(start, steps):
        denoised = denoiser(x, _sigma(x, s[i]), **extra)
        if x_last is not None:
            x = _unipc_update(x_last, s[i - 1], s[i], history, last_order, corrector=denoised)
        history = (history + [(s[i], denoised)])[-order:]
        last_order = min(order, steps - i, len(history))
        x_last = x
        x = _unipc_update(x, s[i], s[i + 1], history, last_order)
        x = _after_step(x, i, s, denoised, callback, blend)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler-a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm++2m": sample_dpmpp_2m,
    "dpm++2m-sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
}
SPACINGS = ("karras", "exponential")

_DISPLAY_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "euler-a": "Euler a", "heun": "Heun",
                  "dpm++2m": "DPM++ 2M", "dpm++2m-sde": "DPM++ 2M SDE", "unipc": "UniPC"}
# Spelling-insensitive keys (lower case, no spaces, "-" or "_"): ours, A1111's, ComfyUI's and diffusers' names.
_ALIASES = {"ddpm": "ddpm", "ddim": "ddim", "euler": "euler", "eulera": "euler-a", "eulerancestral": "euler-a",
            "heun": "heun", "dpm++2m": "dpm++2m", "dpmpp2m": "dpm++2m", "dpm++2msde": "dpm++2m-sde",
            "dpmpp2msde": "dpm++2m-sde", "unipc": "unipc"}
# Samplers whose diffusers scheduler starts from variance-preserving noise (init_noise_sigma = 1).
_VP_SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "unipc")


def _split_name(name: str) -> tuple[str, str]:
    """(bare sampler name, σ spacing "model" | "karras" | "exponential") for any accepted spelling."""
    key = name.strip().lower()
    spacing = "model"
    for suffix in SPACINGS:
        if len(key) > len(suffix) and key.endswith(suffix) and key[-len(suffix) - 1] in " -_":
            key, spacing = key[: -len(suffix) - 1], suffix
    base = _ALIASES.get(key.replace(" ", "").replace("-", "").replace("_", ""))
    if base is None:
        known = ", ".join(f"{n}[-{'|-'.join(SPACINGS)}]" for n in SAMPLERS)
        raise SamplerError(f"unknown sampler {name!r}; known: {known} (or A1111 names like 'DPM++ 2M Karras')")
    return base, spacing


def default_sampler(schedule: NoiseSchedule) -> str:
    """The sampler used when none is named: DPM++ 2M Karras, A1111's usual choice; but DPM++ 2M on the model's own
    timesteps for a zero-terminal-SNR schedule, whose σ_max ≈ 4096 would put 14 of 20 Karras steps above σ = 14,
    where the image has no structure yet (2305.08891 samples such models on "trailing" timesteps)."""
    return "dpm++2m" if schedule.rescale_zero_terminal_snr else "dpm++2m-karras"


def parse_sampler(name: str) -> tuple[Callable[..., torch.Tensor], str]:
    """The sampler function and σ spacing ("model", "karras" or "exponential") for a sampler name, e.g.
    ``"dpm++2m-karras"``, ``"DPM++ 2M Karras"``, ``"Euler a"``, ``"euler"``."""
    base, spacing = _split_name(name)
    return SAMPLERS[base], spacing


def canonical_name(name: str) -> str:
    """nijimi's spelling of a sampler name: ``"DPM++ 2M Karras"`` → ``"dpm++2m-karras"``."""
    base, spacing = _split_name(name)
    return base if spacing == "model" else f"{base}-{spacing}"


def display_name(name: str) -> str:
    """A1111's display name (for PNG metadata): ``"dpm++2m-karras"`` → ``"DPM++ 2M Karras"``."""
    base, spacing = _split_name(name)
    return _DISPLAY_NAMES[base] + ("" if spacing == "model" else f" {spacing.capitalize()}")


def initial_latent(noise: torch.Tensor, sigmas: torch.Tensor, schedule: NoiseSchedule, sampler: str) -> torch.Tensor:
    """The txt2img starting latent in σ-space, matching diffusers' ``noise · init_noise_sigma`` for the same
    sampler: ``noise·sqrt(σ₀²+1)``, or ``noise·σ₀`` for euler/euler-a/heun with "linspace"/"trailing" spacing.
    noise (B, ...) unit Gaussian; sigmas (N+1,) from ``sampling_sigmas``; returns (B, ...)."""
    sigma_max = float(sigmas[0])
    base, _ = _split_name(sampler)
    if base in _VP_SAMPLERS or schedule.timestep_spacing == "leading":
        return noise * (sigma_max**2 + 1) ** 0.5
    return noise * sigma_max


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first σ for img2img at ``strength`` in [0, 1] (diffusers: skip ``steps - int(steps·strength)``
    steps); 0 means start from pure noise level σ₀, ``steps`` means no denoising at all."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SamplerError(f"steps={steps!r} must be an integer >= 1")
    if not 0.0 <= strength <= 1.0:
        raise SamplerError(f"strength={strength!r} must be within [0, 1]")
    return steps - min(int(steps * strength), steps)


def noised_latent(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, start: int) -> torch.Tensor:
    """The img2img starting latent ``x₀ + noise·sigmas[start]`` (σ-space). x₀, noise (B, ...)."""
    _check(sigmas, start)
    return x0 + noise * sigmas[start].to(x0.dtype)


def masked_blend(known: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> Blend:
    """Inpainting blend: keep the sampler's latent where ``mask`` is 1 (the region to repaint) and put the known
    latent re-noised to the current σ, ``known + noise·σ``, where it is 0 (diffusers' SD inpainting with a
    4-channel U-Net). known, noise (B, C, H, W); mask (B or 1, 1, H, W) in [0, 1]."""

    def blend(x: torch.Tensor, i: int, sigma: float) -> torch.Tensor:
        return mask * x + (1 - mask) * (known + noise * sigma)

    return blend

