"""Schedules: the σ's a sampler walks for a step count, chosen independently of the sampler (A1111 ≥ 1.9's
"Schedule type", ComfyUI's "scheduler"), and the network timestep each σ is evaluated at.

:func:`schedule_sigmas` returns a :class:`SigmaPlan`: (steps+1,) σ's, float32, decreasing, usually ending in 0, and
the training timesteps at which diffusers' scheduler calls the network for them where those differ from the
continuous ``t(σ)`` of :class:`~nijimi.diffusion.guidance.Denoiser` (rounded or truncated).

Where a schedule depends on the sampler it follows that sampler's diffusers scheduler, read from the same
``scheduler_config.json`` (its ``family``):

- ``euler`` (Euler, Euler a, Heun, LMS) and ``kdpm2`` (DPM2, DPM2 a): ``uniform`` is σ at the model's own
  ``timestep_spacing`` (``EulerDiscreteScheduler``, ``KDPM2DiscreteScheduler``);
- ``ddim`` (DDIM, DDPM): as euler, but "linspace" timesteps are rounded to integers (``DDIMScheduler``);
- ``multistep`` (DPM++ 2M, DPM++ 2M SDE, UniPC): ``uniform`` picks steps+1 evenly spaced timesteps and drops the
  last ("leading": ``k·(T//(steps+1)) + offset``) (``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``);
- ``singlestep`` (DPM++ 2S): ``uniform`` picks steps+1 timesteps evenly from 0 to T-1, rounded, and drops the
  last, whatever the model's spacing (``DPMSolverSinglestepScheduler``);
- ``kdiffusion`` (DPM++ SDE, DPM++ 2S a, DPM++ 3M SDE: no diffusers scheduler): ``uniform`` as euler.

``karras`` / ``exponential`` / ``polyexponential`` span the model's whole training range [σ_0, σ_{T-1}] for every
family, as A1111 calls k-diffusion's ``get_sigmas_karras`` / ``_exponential`` / ``_polyexponential`` (ρ = 7, 1, 1)
with the model's ``sigma_min`` / ``sigma_max``, and as diffusers' multistep schedulers span them (diffusers'
``EulerDiscreteScheduler``, ``HeunDiscreteScheduler``, ``LMSDiscreteScheduler`` and ``KDPM2DiscreteScheduler`` span
only the σ's of their spaced timesteps, σ(951)…σ(1) for SD's "leading" config — the same as these on "linspace"
models, or with ``sigma_min`` / ``sigma_max`` set, where Euler has them; none of them uses Karras σ's in its default
configuration, so there A1111's σ's are the ones to match). The network is evaluated at t(σ), except where
diffusers rounds or truncates it for a scheduler whose σ's these are: round(t) for kdpm2, multistep and singlestep
with Karras, trunc(t) for multistep and singlestep with exponential (``DPMSolverMultistepScheduler``,
``UniPCMultistepScheduler``, ``DPMSolverSinglestepScheduler``, ``KDPM2DiscreteScheduler``).

The other schedules are defined on the whole training range whatever the sampler (A1111's ``sd_schedulers`` and
ComfyUI's ``comfy.samplers``): ``polyexponential`` (k-diffusion, ρ = 1), ``normal`` / ``sgm_uniform`` (timesteps
evenly from T-1 to 0, σ interpolated in log σ; sgm_uniform takes steps of steps+1 and drops the last), ``simple``
(every (T/steps)-th training σ from the top), ``ddim_uniform`` (training σ's 1, 1+T//steps, … — more than ``steps``
when T//steps does not divide T-1), ``beta`` (timesteps at the quantiles of Beta(0.6, 0.6), 2407.12173),
``kl_optimal`` (evenly spaced in arctan σ, Align Your Steps 2404.14507, Thm. 3.1), ``align_your_steps`` (that
paper's published 10-step SD 1.5 σ's, for SD 2.x too, as no SD 2.x table is published; log-linearly interpolated
for other step counts as A1111 does), and
``trailing`` / ``lcm`` (timesteps of :meth:`NoiseSchedule.timesteps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from nijimi.diffusion.schedules import NoiseSchedule, sampling_sigmas
from nijimi.errors import SamplerError

SCHEDULES = ("uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "simple", "normal",
             "ddim_uniform", "beta", "kl_optimal", "align_your_steps", "trailing", "lcm")
FAMILIES = ("euler", "kdpm2", "ddim", "multistep", "singlestep", "kdiffusion")

AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
"""Align Your Steps' 10-step σ's for SD 1.5 (2404.14507, Table 3; NVIDIA's how-to page gives them as SD 1.5's
timesteps 999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0), to A1111's 3 decimals. No SD 2.x table is
published: the paper's Table 3 and the project page give SD 1.5, SDXL, DeepFloyd-IF and Stable Video Diffusion, and
ComfyUI's AlignYourStepsScheduler offers SD1, SDXL and SVD; A1111 uses this table for every non-SDXL model, and so
do we for SD 2.x (ε and v), whose noise schedule, and so σ range, is SD 1.5's."""
BETA_ALPHA = BETA_BETA = 0.6
"""The Beta distribution's parameters of the ``beta`` schedule (ComfyUI's and A1111's defaults)."""


@dataclass(frozen=True)
class SigmaPlan:
    """``sigmas``: (N+1,) float32, strictly decreasing; ``timesteps``: the network timestep of each σ but the last
    where diffusers does not use the continuous t(σ) (N,) float32, or None; ``landing``: the σ each step of
    diffusers' ``DDIMScheduler`` lands at (N,) float32, for the ddim family on the model's own timesteps, else
    None."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor | None = None
    landing: torch.Tensor | None = None

    def timestep_table(self) -> dict[tuple[int, float], float] | None:
        """{(step i, σ_i): network timestep} for the Denoiser: the call of step i at ``sigmas[i]`` (a float32 value,
        as a sampler passes it) uses it; other calls (a second-order sampler's intermediate σ) keep t(σ)."""
        if self.timesteps is None:
            return None
        return {(i, sigma): t for i, (sigma, t) in enumerate(zip(self.sigmas[:-1].tolist(), self.timesteps.tolist(),
                                                                 strict=True))}

    def landing_table(self, final: float = 0.0) -> dict[float, float] | None:
        """{σ_i: σ it lands at} for the steps of :attr:`landing` that do not land on the next σ, the last step
        landing at ``final`` (DDIM's σ_0 when ``set_alpha_to_one`` is false); the ``landing`` option of
        :func:`~nijimi.diffusion.samplers.sample_ddim`), or None."""
        if self.landing is None:
            return None
        s, land = self.sigmas.tolist(), self.landing.tolist()
        land[-1] = final if land[-1] == 0 else land[-1]
        return {s[i]: land[i] for i in range(len(land)) if land[i] != s[i + 1]} or None


def schedule_sigmas(noise: NoiseSchedule, steps: int, schedule: str, family: str = "euler") -> SigmaPlan:
    """The σ's of ``schedule`` for ``steps`` steps of a sampler of ``family`` (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise SamplerError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if family not in FAMILIES:
        raise SamplerError(f"sampler family {family!r} is not one of {', '.join(FAMILIES)}")
    noise.timesteps(steps)  # checks the step count
    if schedule in ("karras", "exponential", "polyexponential"):
        return _sigma_range(noise, steps, schedule, family)
    if schedule not in ("trailing", "lcm", "uniform"):
        return SigmaPlan(_FULL_RANGE[schedule](noise, steps))
    sigmas = _uniform(noise, steps, family) if schedule == "uniform" else sampling_sigmas(noise, steps, schedule)
    return SigmaPlan(sigmas, landing=_ddim_landing(noise, sigmas) if family == "ddim" and schedule != "lcm" else None)


def _ddim_landing(noise: NoiseSchedule, sigmas: torch.Tensor) -> torch.Tensor:
    """Where each of the N steps of ``DDIMScheduler`` lands: from timestep t it steps to ᾱ at t - T//N (not the next
    timestep for "trailing" or "linspace" spacing when N does not divide T; ``DDPMScheduler`` steps to the next
    one), past timestep 0 to ᾱ = 1 (σ = 0; the ᾱ_0 of ``set_alpha_to_one=False`` is
    :meth:`SigmaPlan.landing_table`'s ``final``)."""
    previous = noise.sigma_to_t(sigmas[:-1]).round().long() - noise.num_train_timesteps // (len(sigmas) - 1)
    return torch.where(previous >= 0, noise.sigmas[previous.clamp(min=0)], torch.tensor(0.0))


def _with_zero(sigmas: torch.Tensor | list[float] | np.ndarray) -> torch.Tensor:
    sigmas = torch.as_tensor(np.array(sigmas, dtype=np.float64))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def _uniform(noise: NoiseSchedule, steps: int, family: str) -> torch.Tensor:
    if family in ("euler", "kdpm2", "kdiffusion"):
        return sampling_sigmas(noise, steps)
    T, offset, spacing = noise.num_train_timesteps, noise.steps_offset, noise.timestep_spacing
    if family == "singlestep" or (family == "multistep" and spacing == "linspace"):
        timesteps = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    elif family == "ddim" and spacing == "linspace":
        timesteps = np.linspace(0, T - 1, steps).round()[::-1]
    elif family == "ddim" or spacing == "trailing":
        return sampling_sigmas(noise, steps)
    else:
        timesteps = (np.arange(steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + offset
    if timesteps[0] > T - 1:
        raise SamplerError(f"steps={steps} with steps_offset={offset} reaches timestep {int(timesteps[0])}, "
                           f"past the last training timestep {T - 1}")
    return _with_zero(noise.sigmas.double()[torch.as_tensor(timesteps.astype(np.int64))].numpy())


def _sigma_range(noise: NoiseSchedule, steps: int, schedule: str, family: str) -> SigmaPlan:
    train = noise.sigmas
    sigma_min, sigma_max = float(train[0]), float(train[-1])
    ramp = np.linspace(0, 1, steps)
    if schedule == "karras":  # EDM (2206.00364), eq. 5, ρ = 7
        sigmas = (sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
    else:  # exponential = polyexponential with ρ = 1: evenly spaced in log σ
        sigmas = np.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max)))
    plan = _with_zero(sigmas)
    if schedule == "polyexponential" or family not in ("multistep", "singlestep", "kdpm2"):
        return SigmaPlan(plan)
    if family == "kdpm2":
        return SigmaPlan(plan, _network_timesteps(noise, plan, "round") if schedule == "karras" else None)
    rounded = schedule == "karras" and (family == "singlestep" or noise.beta_schedule != "cosine")
    how = "round" if rounded else "trunc"  # (an int64 cast)
    return SigmaPlan(plan, _network_timesteps(noise, torch.as_tensor(sigmas), how))


def _network_timesteps(noise: NoiseSchedule, sigmas: torch.Tensor, how: str) -> torch.Tensor:
    """diffusers' ``_sigma_to_t`` (log σ interpolation against float32 log σ's) of each σ, rounded or truncated."""
    log_sigmas = noise.sigmas.log().double()
    log_sigma = sigmas.double().clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    t = low + w
    if sigmas.shape[0] and sigmas[-1] == 0:
        t = t[:-1]
    return (t.round() if how == "round" else t.trunc()).float()


def _t_to_sigma(noise: NoiseSchedule, t: np.ndarray) -> np.ndarray:
    """σ at continuous timesteps, interpolated linearly in log σ (k-diffusion's and ComfyUI's ``t_to_sigma``)."""
    log_sigmas = noise.sigmas.log().double().numpy()
    low = np.floor(t).astype(np.int64)
    high = np.ceil(t).astype(np.int64)
    w = t - low
    return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


def _normal(noise: NoiseSchedule, steps: int) -> torch.Tensor:
    return _with_zero(_t_to_sigma(noise, np.linspace(noise.num_train_timesteps - 1, 0, steps)))


def _sgm_uniform(noise: NoiseSchedule, steps: int) -> torch.Tensor:
    return _with_zero(_t_to_sigma(noise, np.linspace(noise.num_train_timesteps - 1, 0, steps + 1)[:-1]))


def _simple(noise: NoiseSchedule, steps: int) -> torch.Tensor:
    train, T = noise.sigmas.double(), noise.num_train_timesteps
    return _with_zero([float(train[T - 1 - int(k * (T / steps))]) for k in range(steps)])


def _ddim_uniform(noise: NoiseSchedule, steps: int) -> torch.Tensor:
    train, T = noise.sigmas.double(), noise.num_train_timesteps
    return _with_zero(train[1::max(T // steps, 1)].flip(0).numpy())


def _beta(noise: NoiseSchedule, steps: int) -> torch.Tensor:
    """ComfyUI's beta schedule (2407.12173): timesteps round((T-1)·F⁻¹(q)) at the quantiles q = 1, 1 - 1/steps, …,
    1/steps of Beta(0.6, 0.6), repeats dropped, then the training σ's there."""
    train, T = noise.sigmas.double(), noise.num_train_timesteps
    picked: list[int] = []
    for q in 1 - np.linspace(0, 1, steps, endpoint=False):
        t = int(np.rint(_beta_ppf(float(q), BETA_ALPHA, BETA_BETA) * (T - 1)))
        if not picked or picked[-1] != t:
            picked.append(t)
    return _with_zero([float(train[t]) for t in picked])


def _kl_optimal(noise: NoiseSchedule, steps: int) -> torch.Tensor:
    """Evenly spaced in arctan σ from σ_max to σ_min (2404.14507's KL-optimal schedule, ComfyUI's ``kl_optimal``)."""
    sigma_min, sigma_max = float(noise.sigmas[0]), float(noise.sigmas[-1])
    w = np.arange(steps) / max(steps - 1, 1)
    return _with_zero(np.tan(w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)))


def _align_your_steps(noise: NoiseSchedule, steps: int) -> torch.Tensor:
    """AYS's table, for another step count interpolated log-linearly over an even grid, as A1111 does (which takes
    the table itself only for 11 steps and otherwise ``steps`` interpolated σ's, then 0)."""
    table = np.array(AYS_SD15)
    if steps == len(table):
        return _with_zero(table)
    log_rising = np.log(table[::-1])
    new = np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(table)), log_rising)
    return _with_zero(np.exp(new)[::-1])


_FULL_RANGE = {"normal": _normal, "sgm_uniform": _sgm_uniform, "simple": _simple, "ddim_uniform": _ddim_uniform,
               "beta": _beta, "kl_optimal": _kl_optimal, "align_your_steps": _align_your_steps}


def _beta_cdf(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b) = x^a (1-x)^b / (a·B(a, b)) / (1 + d₁/(1 + d₂/(1 + …)))
    with d_{2m+1} = -(a+m)(a+b+m)x/((a+2m)(a+2m+1)), d_{2m} = m(b-m)x/((a+2m-1)(a+2m)) (Abramowitz & Stegun
    26.5.8), evaluated by the modified Lentz method; I_x(a, b) = 1 - I_{1-x}(b, a) where it converges slowly."""
    if x <= 0 or x >= 1:
        return min(max(x, 0.0), 1.0)
    if x > (a + 1) / (a + b + 2):
        return 1 - _beta_cdf(1 - x, b, a)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for j in range(1, 400):
        m = j // 2
        if j % 2:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1 + term * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + term / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1 - c * d) < 1e-16:
            break
    return front / f


def _beta_ppf(q: float, a: float, b: float) -> float:
    """The inverse of :func:`_beta_cdf` in x, by bisection to double precision."""
    if q <= 0 or q >= 1:
        return min(max(q, 0.0), 1.0)
    low, high = 0.0, 1.0
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if _beta_cdf(mid, a, b) < q else (low, mid)
    return (low + high) / 2
