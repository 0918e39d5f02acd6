"""Samplers: plain functions that walk a denoiser ``D(x, σ) → x̂₀`` down a decreasing list of σ's (k-diffusion style).

Every sampler has the signature::

    sample_x(model, x, sigmas, *, extra_args=None, callback=None, noise=None, **options) -> x

- ``model(x, sigma, step=i, **extra_args)``: x (B, ...) in σ-space (``x = x₀ + σ·ε``), sigma (B,), ``step`` the
  index of the σ it evaluates at (step i runs at ``sigmas[i]``; Heun's second call, at ``sigmas[i+1]``, passes
  i + 1, as A1111 counts it for prompt editing); returns x̂₀ (B, ...).
  Build it with :class:`nijimi.diffusion.denoiser.Denoiser` (and :class:`~nijimi.diffusion.guidance.GuidedNetwork`).
- ``sigmas``: (N+1,) strictly decreasing, last entry 0 — from :func:`~nijimi.diffusion.schedules.sampling_sigmas`.
  img2img passes the tail ``sigmas[start:]``.
- ``callback(info)``: called after every step with a :class:`StepInfo` (progress bars, previews). When it returns a
  tensor, sampling continues from that latent instead (inpainting puts the known region back this way).
- ``noise(sigma, sigma_next)``: unit Gaussian noise like x for the step σ → σ_next
  (:mod:`nijimi.diffusion.noise`); required by the stochastic samplers (ddpm, euler-a, dpm++2m-sde, lcm, ddim with
  η > 0, tcd with γ > 0).
- ``options``: ``eta`` (ddim, euler-a, dpm++2m-sde; tcd's γ), ``order`` (unipc), ``schedule`` (lcm and tcd: their
  formulas live on the model's training timesteps; :meth:`SamplerChoice.options` supplies it).

A sampler name is parsed once into a :class:`SamplerChoice` (:func:`parse_sampler`): the function, its σ spacing
(the model's own timesteps — LCM's for lcm/tcd —, ``-karras``, ``-exponential`` or ``-trailing``; A1111's display
names such as "DPM++ 2M Karras" and ComfyUI's / diffusers' spellings are accepted), canonical and display names, the
scale of its starting noise, whether timesteps are rounded, and where its noise comes from; nothing downstream looks at
the string again. All samplers run in fp32 tensor ops; per-step scalar coefficients are computed once in Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nijimi.diffusion.noise import BrownianNoise, Generators, gaussian_noise
from nijimi.diffusion.schedules import NoiseSchedule, sampling_sigmas
from nijimi.errors import SamplerError

Model = Callable[..., torch.Tensor]
NoiseSampler = Callable[[float, float], torch.Tensor]


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


Callback = Callable[[StepInfo], "torch.Tensor | None"]


def _check(sigmas: torch.Tensor) -> list[float]:
    """Validate the σ schedule; return the σ's as Python floats."""
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise SamplerError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    s = sigmas.tolist()
    for i, (a, b) in enumerate(zip(s[:-1], s[1:], strict=True)):
        if not a > b:
            raise SamplerError(f"sigmas must be strictly decreasing: sigmas[{i}]={a} then sigmas[{i + 1}]={b}")
    if s[-1] < 0:
        raise SamplerError(f"the last sigma must be >= 0, got {s[-1]}")
    return s


def _sigma(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x.new_full((x.shape[0],), sigma)


def _needs(noise: NoiseSampler | None, name: str) -> NoiseSampler:
    if noise is None:
        raise SamplerError(f"sampler {name!r} draws noise: pass noise=… (see nijimi.diffusion.noise)")
    return noise


def _eta_noise(name: str, eta: float, noise: NoiseSampler | None) -> NoiseSampler | None:
    """Check η; the noise source when η > 0 draws noise."""
    if not 0.0 <= eta <= 1.0:
        raise SamplerError(f"{name}: eta={eta} must be within [0, 1]")
    return _needs(noise, name) if eta > 0 else None


def _after_step(x: torch.Tensor, i: int, s: list[float], denoised: torch.Tensor,
                callback: Callback | None) -> torch.Tensor:
    if callback is None:
        return x
    replaced = callback(StepInfo(i, len(s) - 1, s[i], s[i + 1], x, denoised))
    return x if replaced is None else replaced


def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                 callback: Callback | None = None, noise: NoiseSampler | None = None) -> torch.Tensor:
    """Euler: first-order steps of the probability-flow ODE dx/dσ = (x - x̂₀)/σ (EDM, 2206.00364, Alg. 1)."""
    s, extra = _check(sigmas), extra_args or {}
    for i in range(len(s) - 1):
        denoised = model(x, _sigma(x, s[i]), step=i, **extra)
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
        x = _after_step(x, i, s, denoised, callback)
    return x


def sample_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                callback: Callback | None = None, noise: NoiseSampler | None = None) -> torch.Tensor:
    """Heun: second-order ODE steps, two denoiser calls per step; Euler on the last step (EDM, 2206.00364, Alg. 1)."""
    s, extra = _check(sigmas), extra_args or {}
    for i in range(len(s) - 1):
        denoised = model(x, _sigma(x, s[i]), step=i, **extra)
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = (x_euler - model(x_euler, _sigma(x, s[i + 1]), step=i + 1, **extra)) / s[i + 1]
            x = x + (d + d_next) / 2 * dt
        x = _after_step(x, i, s, denoised, callback)
    return x


def _ancestral(name: str, eta: float, model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra: dict | None,
               callback: Callback | None, noise: NoiseSampler | None) -> torch.Tensor:
    """DDIM's generalised step in σ-space (2010.02502, eq. 12 and 16, divided by sqrt(ᾱ_prev)):

    ε̂ = (x - x̂₀)/σ,  σ_up = η·σ'·sqrt(1 - σ'²/σ²),  σ_down = sqrt(σ'² - σ_up²),  x' = x̂₀ + σ_down·ε̂ + σ_up·z.
    η = 0 is deterministic DDIM; η = 1 samples the DDPM posterior q(x_{t'} | x_t, x̂₀) exactly.
    """
    s, extra, noise = _check(sigmas), extra or {}, _eta_noise(name, eta, noise)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = model(x, _sigma(x, sigma), step=i, **extra)
        sigma_up = eta * sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = denoised + (x - denoised) * (sigma_down / sigma)
        if sigma_up > 0:
            x = x + noise(sigma, sigma_next) * sigma_up
        x = _after_step(x, i, s, denoised, callback)
    return x


def sample_ddim(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                callback: Callback | None = None, noise: NoiseSampler | None = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (2010.02502): deterministic at η = 0 (where it equals Euler), stochastic for η in (0, 1]."""
    return _ancestral("ddim", eta, model, x, sigmas, extra_args, callback, noise)


def sample_ddpm(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                callback: Callback | None = None, noise: NoiseSampler | None = None) -> torch.Tensor:
    """DDPM ancestral sampling (2006.11239) with the posterior variance β̃: DDIM with η = 1 (2010.02502, §4.1)."""
    return _ancestral("ddpm", 1.0, model, x, sigmas, extra_args, callback, noise)


def sample_euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                           callback: Callback | None = None, noise: NoiseSampler | None = None,
                           eta: float = 1.0) -> torch.Tensor:
    """Euler ancestral: an Euler step down to σ_down, then fresh noise of size σ_up (k-diffusion; = DDPM at η = 1)."""
    return _ancestral("euler-a", eta, model, x, sigmas, extra_args, callback, noise)


def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                    callback: Callback | None = None, noise: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep in log-SNR, one call per step (2211.01095, Alg. 2)."""
    s, extra = _check(sigmas), extra_args or {}
    old_denoised, h_last = None, 0.0
    for i in range(len(s) - 1):
        denoised = model(x, _sigma(x, s[i]), step=i, **extra)
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
        x = _after_step(x, i, s, denoised, callback)
    return x


def sample_dpmpp_2m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                        callback: Callback | None = None, noise: NoiseSampler | None = None,
                        eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: stochastic second-order multistep, Brownian-tree noise (2211.01095).

    The midpoint form of diffusers' ``sde-dpmsolver++`` / k-diffusion's ``sample_dpmpp_2m_sde``; ``eta`` scales the
    injected noise (0 gives a deterministic exponential integrator). ``noise`` is meant to be a Brownian tree
    (:class:`~nijimi.diffusion.noise.BrownianNoise`), so that the image does not depend on the step count.
    """
    s, extra, noise = _check(sigmas), extra_args or {}, _eta_noise("dpm++2m-sde", eta, noise)
    old_denoised, h_last = None, 0.0
    for i in range(len(s) - 1):
        denoised = model(x, _sigma(x, s[i]), step=i, **extra)
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
        x = _after_step(x, i, s, denoised, callback)
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


def sample_unipc(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                 callback: Callback | None = None, noise: NoiseSampler | None = None, order: int = 2) -> torch.Tensor:
    """UniPC-bh2: multistep predictor plus a free corrector that reuses each new evaluation (2302.04867)."""
    s, extra = _check(sigmas), extra_args or {}
    if order not in (1, 2, 3):
        raise SamplerError(f"unipc: order={order!r} must be 1, 2 or 3")
    steps = len(s) - 1
    history: list[tuple[float, torch.Tensor]] = []
    x_last, last_order = None, 0
    for i in range(steps):
        denoised = model(x, _sigma(x, s[i]), step=i, **extra)
        if x_last is not None:
            x = _unipc_update(x_last, s[i - 1], s[i], history, last_order, corrector=denoised)
        history = (history + [(s[i], denoised)])[-order:]
        last_order = min(order, steps - i, len(history))
        x_last = x
        x = _unipc_update(x, s[i], s[i + 1], history, last_order)
        x = _after_step(x, i, s, denoised, callback)
    return x


def _on_grid(schedule: NoiseSchedule | None, name: str) -> NoiseSchedule:
    if schedule is None:
        raise SamplerError(f"sampler {name!r} works on the training timesteps: pass schedule=… (the model's)")
    return schedule


def sample_lcm(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
               callback: Callback | None = None, noise: NoiseSampler | None = None,
               schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """LCM: x̂₀ then fresh noise up to the next σ (2310.04378, §4; multistep consistency sampling, 2303.01469, Alg. 1).

    The consistency function applies the boundary-condition scalings at the training timestep t of σ
    (``schedule.sigma_to_t``; timestep scaling 10 and σ_data = 0.5, as diffusers' LCMScheduler):
    ``f = c_out·x̂₀ + c_skip·x/sqrt(σ²+1)``, c_skip = σ_data²/((10t)² + σ_data²), c_out = 10t/sqrt((10t)² + σ_data²);
    then ``x' = f + σ'·z``. Its own σ's are LCM's 50-step skipping schedule (:meth:`SamplerChoice.sigmas`).
    """
    s, extra, noise = _check(sigmas), extra_args or {}, _needs(noise, "lcm")
    scaled = [10 * t for t in _on_grid(schedule, "lcm").sigma_to_t(sigmas).tolist()]
    for i in range(len(s) - 1):
        denoised = model(x, _sigma(x, s[i]), step=i, **extra)
        c_skip, c_out = 0.25 / (scaled[i] ** 2 + 0.25), scaled[i] / math.sqrt(scaled[i] ** 2 + 0.25)
        denoised = c_out * denoised + c_skip / math.sqrt(s[i] ** 2 + 1) * x
        x = denoised + noise(s[i], s[i + 1]) * s[i + 1] if s[i + 1] > 0 else denoised
        x = _after_step(x, i, s, denoised, callback)
    return x


def sample_tcd(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
               callback: Callback | None = None, noise: NoiseSampler | None = None, eta: float = 0.3,
               schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """TCD: trajectory-consistency sampling with strategic stochastic steps, γ = ``eta`` (2402.19159).

    With ε̂ = (x - x̂₀)/σ, step back along the ODE to the training timestep s = ⌊(1-γ)·t'⌋ below the next one t'
    (``x_s = x̂₀ + σ_s·ε̂``), then add fresh noise up to σ': ``x' = x_s + sqrt(σ'² - σ_s²)·z``. γ = 0 is DDIM.
    The last step ends at timestep 0 (σ_s ≈ 0.03, not 0) and returns that latent as the network sees it,
    ``x_s/sqrt(σ_s²+1)``, as diffusers' TCDScheduler does. Its σ's are LCM's skipping schedule.
    """
    s, extra, schedule = _check(sigmas), extra_args or {}, _on_grid(schedule, "tcd")
    noise = _eta_noise("tcd", eta, noise)
    # ⌊(1-γ)·t'⌋ in float32, as TCDScheduler rounds it (float64 gives 489 for γ = 0.3, t' = 700, float32 490).
    below = torch.floor((1 - eta) * schedule.sigma_to_t(sigmas[1:])).long()
    sigmas_s = schedule.sigmas[below].tolist()
    for i in range(len(s) - 1):
        denoised = model(x, _sigma(x, s[i]), step=i, **extra)
        x = denoised + (x - denoised) * (sigmas_s[i] / s[i])
        if s[i + 1] == 0:
            x = x / math.sqrt(sigmas_s[i] ** 2 + 1)
        elif noise is not None:
            x = x + noise(s[i], s[i + 1]) * math.sqrt(s[i + 1] ** 2 - sigmas_s[i] ** 2)
        x = _after_step(x, i, s, denoised, callback)
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
    "lcm": sample_lcm,
    "tcd": sample_tcd,
}


# ---- names: a sampler name parsed once into a SamplerChoice ----

SPACINGS = ("karras", "exponential", "trailing")

_DISPLAY_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "euler-a": "Euler a", "heun": "Heun",
                  "dpm++2m": "DPM++ 2M", "dpm++2m-sde": "DPM++ 2M SDE", "unipc": "UniPC", "lcm": "LCM", "tcd": "TCD"}
# Spelling-insensitive keys (lower case, no spaces, "-" or "_"): ours, A1111's, ComfyUI's and diffusers' names.
_ALIASES = {"ddpm": "ddpm", "ddim": "ddim", "euler": "euler", "eulera": "euler-a", "eulerancestral": "euler-a",
            "heun": "heun", "dpm++2m": "dpm++2m", "dpmpp2m": "dpm++2m", "dpm++2msde": "dpm++2m-sde",
            "dpmpp2msde": "dpm++2m-sde", "unipc": "unipc", "lcm": "lcm", "tcd": "tcd"}
# Samplers whose diffusers scheduler starts from variance-preserving noise (init_noise_sigma = sqrt(σ₀² + 1)).
_VP_SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "unipc", "lcm", "tcd")
_ETA_SAMPLERS = ("ddim", "euler-a", "dpm++2m-sde", "tcd")
_NOISE = {"ddpm": "gaussian", "ddim": "gaussian", "euler-a": "gaussian", "dpm++2m-sde": "brownian", "lcm": "gaussian",
          "tcd": "gaussian"}
# Samplers defined on the training timestep grid: they take the schedule, and walk LCM's schedule by default.
_GRID_SAMPLERS = ("lcm", "tcd")


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
        return self.base.startswith(("dpm++", "unipc")) and self.spacing in ("karras", "exponential")

    def sigmas(self, schedule: NoiseSchedule, steps: int) -> torch.Tensor:
        """The (steps+1,) σ's this sampler walks for ``schedule`` (:func:`sampling_sigmas`); lcm and tcd walk LCM's
        skipping schedule (the timesteps the model was distilled on) unless a spacing is named."""
        grid = self.base in _GRID_SAMPLERS and self.spacing == "model"
        return sampling_sigmas(schedule, steps, "lcm" if grid else self.spacing)

    def options(self, schedule: NoiseSchedule, eta: float | None) -> dict:
        """The keyword options of ``fn`` for a model with ``schedule``: ``eta`` when given, and the ``schedule``
        itself for the samplers defined on the training timesteps (lcm, tcd)."""
        return ({} if eta is None else {"eta": eta}) | ({"schedule": schedule} if self.base in _GRID_SAMPLERS else {})

    def start_scale(self, sigma_max: float, schedule: NoiseSchedule) -> float:
        """The txt2img starting latent is unit noise times this: diffusers' ``init_noise_sigma`` carried to σ-space,
        ``sqrt(σ₀²+1)`` (the variance-preserving x_T = z), except the Euler-type samplers (euler, euler-a, heun) on
        "linspace" or "trailing" timesteps (the model's, or the ``-trailing`` spacing), which use ``σ₀``."""
        spacing = "trailing" if self.spacing == "trailing" else schedule.timestep_spacing
        if self.base in _VP_SAMPLERS or spacing == "leading":
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
