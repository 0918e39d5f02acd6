"""Samplers: plain functions that walk a denoiser ``D(x, σ) → x̂₀`` down a decreasing list of σ's (k-diffusion style).

Every sampler has the signature::

    sample_x(model, x, sigmas, *, extra_args=None, callback=None, noise=None, **options) -> x

- ``model(x, sigma, step=i, **extra_args)``: x (B, ...) in σ-space (``x = x₀ + σ·ε``), sigma (B,), ``step`` the
  index of the σ it evaluates at (step i runs at ``sigmas[i]``; Heun's second call, at ``sigmas[i+1]``, passes
  i + 1, as A1111 counts it for prompt editing); returns x̂₀ (B, ...).
  Build it with :class:`nijimi.diffusion.denoiser.Denoiser` (and :class:`~nijimi.diffusion.guidance.GuidedNetwork`).
- ``sigmas``: (N+1,) strictly decreasing, last entry usually 0 — from :mod:`nijimi.diffusion.sigmas` (through
  :meth:`SamplerChoice.plan <nijimi.diffusion.choice.SamplerChoice.plan>`). img2img passes the tail ``sigmas[start:]``.
- ``callback(info)``: called after every step with a :class:`StepInfo` (progress bars, previews). When it returns a
  tensor, sampling continues from that latent instead (inpainting puts the known region back this way).
- ``noise(sigma, sigma_next)``: unit Gaussian noise like x for the step σ → σ_next
  (:mod:`nijimi.diffusion.noise`); required by the stochastic samplers (ddpm, euler-a, dpm++2m-sde, dpm++3m-sde, lcm,
  ddim with η > 0, tcd with γ > 0; the ancestral and SDE samplers of :mod:`nijimi.diffusion.singlestep`).
- ``options``: ``eta`` (ddim, euler-a, the SDE samplers; tcd's γ), ``order`` (unipc, lms), ``schedule`` (lcm and
  tcd: their formulas live on the model's training timesteps), ``landing`` (ddim: where diffusers' DDIMScheduler
  steps to); :meth:`SamplerChoice.options` supplies them.

Samplers and schedules are named and paired in :mod:`nijimi.diffusion.choice`. All samplers run in fp32 tensor ops;
per-step scalar coefficients are computed once in Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from nijimi.diffusion.schedules import NoiseSchedule
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


def check_sigmas(sigmas: torch.Tensor) -> list[float]:
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


def sigma_batch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """σ as the model's (B,) argument for latents like ``x``."""
    return x.new_full((x.shape[0],), sigma)


def needs_noise(noise: NoiseSampler | None, name: str) -> NoiseSampler:
    """``noise``, which the sampler ``name`` cannot do without."""
    if noise is None:
        raise SamplerError(f"sampler {name!r} draws noise: pass noise=… (see nijimi.diffusion.noise)")
    return noise


def eta_noise(name: str, eta: float, noise: NoiseSampler | None) -> NoiseSampler | None:
    """Check η; the noise source when η > 0 draws noise."""
    if not 0.0 <= eta <= 1.0:
        raise SamplerError(f"{name}: eta={eta} must be within [0, 1]")
    return needs_noise(noise, name) if eta > 0 else None


def after_step(x: torch.Tensor, i: int, s: list[float], denoised: torch.Tensor,
               callback: Callback | None) -> torch.Tensor:
    """Report step ``i`` to ``callback``; the latent to go on from (the callback's, when it returns one)."""
    if callback is None:
        return x
    replaced = callback(StepInfo(i, len(s) - 1, s[i], s[i + 1], x, denoised))
    return x if replaced is None else replaced


def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                 callback: Callback | None = None, noise: NoiseSampler | None = None) -> torch.Tensor:
    """Euler: first-order steps of the probability-flow ODE dx/dσ = (x - x̂₀)/σ (EDM, 2206.00364, Alg. 1)."""
    s, extra = check_sigmas(sigmas), extra_args or {}
    for i in range(len(s) - 1):
        denoised = model(x, sigma_batch(x, s[i]), step=i, **extra)
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
        x = after_step(x, i, s, denoised, callback)
    return x


def sample_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                callback: Callback | None = None, noise: NoiseSampler | None = None) -> torch.Tensor:
    """Heun: second-order ODE steps, two denoiser calls per step; Euler on the last step (EDM, 2206.00364, Alg. 1)."""
    s, extra = check_sigmas(sigmas), extra_args or {}
    for i in range(len(s) - 1):
        denoised = model(x, sigma_batch(x, s[i]), step=i, **extra)
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = (x_euler - model(x_euler, sigma_batch(x, s[i + 1]), step=i + 1, **extra)) / s[i + 1]
            x = x + (d + d_next) / 2 * dt
        x = after_step(x, i, s, denoised, callback)
    return x


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up) of an ancestral step σ → σ': σ_up = η·σ'·sqrt(1 - σ'²/σ²), σ_down = sqrt(σ'² - σ_up²), so a
    deterministic step to σ_down plus fresh noise of size σ_up lands at σ' (2010.02502, eq. 16 in σ-space)."""
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(1 - (sigma_next / sigma) ** 2, 0.0)))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _ancestral(eta: float, model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra: dict | None,
               callback: Callback | None, noise: NoiseSampler | None,
               landing: Mapping[float, float] | None = None) -> torch.Tensor:
    """DDIM's generalised step in σ-space (2010.02502, eq. 12 and 16, divided by sqrt(ᾱ_prev)):

    ε̂ = (x - x̂₀)/σ,  σ_up = η·σ'·sqrt(1 - σ'²/σ²),  σ_down = sqrt(σ'² - σ_up²),  x' = x̂₀ + σ_down·ε̂ + σ_up·z.
    η = 0 is deterministic DDIM; η = 1 samples the DDPM posterior q(x_{t'} | x_t, x̂₀) exactly.
    ``landing`` {σ: σ_L}: the step from σ lands at σ_L instead of the next σ', and the latent is carried to σ'
    unchanged in the network's variance-preserving scale, x'·sqrt(σ'²+1)/sqrt(σ_L²+1) (as diffusers' DDIMScheduler
    does when its previous timestep is not the next one, or its last step ends at ᾱ_0 rather than 1).
    ``noise``: checked by the caller (:func:`eta_noise`).
    """
    s, extra = check_sigmas(sigmas), extra or {}
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        land = (landing or {}).get(sigma, sigma_next)
        denoised = model(x, sigma_batch(x, sigma), step=i, **extra)
        sigma_down, sigma_up = ancestral_step(sigma, land, eta)
        x = denoised + (x - denoised) * (sigma_down / sigma)
        if sigma_up > 0:
            x = x + noise(sigma, sigma_next) * sigma_up
        if land != sigma_next:
            x = x * math.sqrt((sigma_next**2 + 1) / (land**2 + 1))
        x = after_step(x, i, s, denoised, callback)
    return x


def sample_ddim(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                callback: Callback | None = None, noise: NoiseSampler | None = None, eta: float = 0.0,
                landing: Mapping[float, float] | None = None) -> torch.Tensor:
    """DDIM (2010.02502): deterministic at η = 0 (where it equals Euler), stochastic for η in (0, 1]; ``landing``
    as diffusers' DDIMScheduler steps (:meth:`SigmaPlan.landing_table <nijimi.diffusion.sigmas.SigmaPlan>`)."""
    return _ancestral(eta, model, x, sigmas, extra_args, callback, eta_noise("ddim", eta, noise), landing)


def sample_ddpm(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                callback: Callback | None = None, noise: NoiseSampler | None = None) -> torch.Tensor:
    """DDPM ancestral sampling (2006.11239) with the posterior variance β̃: DDIM with η = 1 (2010.02502, §4.1)."""
    return _ancestral(1.0, model, x, sigmas, extra_args, callback, eta_noise("ddpm", 1.0, noise))


def sample_euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                           callback: Callback | None = None, noise: NoiseSampler | None = None,
                           eta: float = 1.0) -> torch.Tensor:
    """Euler ancestral: an Euler step down to σ_down, then fresh noise of size σ_up (k-diffusion; = DDPM at η = 1)."""
    return _ancestral(eta, model, x, sigmas, extra_args, callback, eta_noise("euler-a", eta, noise))


def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                    callback: Callback | None = None, noise: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep in log-SNR, one call per step (2211.01095, Alg. 2)."""
    s, extra = check_sigmas(sigmas), extra_args or {}
    old_denoised, h_last = None, 0.0
    for i in range(len(s) - 1):
        denoised = model(x, sigma_batch(x, s[i]), step=i, **extra)
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
        x = after_step(x, i, s, denoised, callback)
    return x


def sample_dpmpp_2m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                        callback: Callback | None = None, noise: NoiseSampler | None = None,
                        eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: stochastic second-order multistep, Brownian-tree noise (2211.01095).

    The midpoint form of diffusers' ``sde-dpmsolver++`` / k-diffusion's ``sample_dpmpp_2m_sde``; ``eta`` scales the
    injected noise (0 gives a deterministic exponential integrator). ``noise`` is meant to be a Brownian tree
    (:class:`~nijimi.diffusion.noise.BrownianNoise`), so that the image does not depend on the step count.
    """
    s, extra, noise = check_sigmas(sigmas), extra_args or {}, eta_noise("dpm++2m-sde", eta, noise)
    old_denoised, h_last = None, 0.0
    for i in range(len(s) - 1):
        denoised = model(x, sigma_batch(x, s[i]), step=i, **extra)
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
        x = after_step(x, i, s, denoised, callback)
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
    s, extra = check_sigmas(sigmas), extra_args or {}
    if order not in (1, 2, 3):
        raise SamplerError(f"unipc: order={order!r} must be 1, 2 or 3")
    steps = len(s) - 1
    history: list[tuple[float, torch.Tensor]] = []
    x_last, last_order = None, 0
    for i in range(steps):
        denoised = model(x, sigma_batch(x, s[i]), step=i, **extra)
        if x_last is not None:
            x = _unipc_update(x_last, s[i - 1], s[i], history, last_order, corrector=denoised)
        history = (history + [(s[i], denoised)])[-order:]
        last_order = min(order, steps - i, len(history))
        x_last = x
        x = _unipc_update(x, s[i], s[i + 1], history, last_order)
        x = after_step(x, i, s, denoised, callback)
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
    s, extra, noise = check_sigmas(sigmas), extra_args or {}, needs_noise(noise, "lcm")
    scaled = [10 * t for t in _on_grid(schedule, "lcm").sigma_to_t(sigmas).tolist()]
    for i in range(len(s) - 1):
        denoised = model(x, sigma_batch(x, s[i]), step=i, **extra)
        c_skip, c_out = 0.25 / (scaled[i] ** 2 + 0.25), scaled[i] / math.sqrt(scaled[i] ** 2 + 0.25)
        denoised = c_out * denoised + c_skip / math.sqrt(s[i] ** 2 + 1) * x
        x = denoised + noise(s[i], s[i + 1]) * s[i + 1] if s[i + 1] > 0 else denoised
        x = after_step(x, i, s, denoised, callback)
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
    s, extra, schedule = check_sigmas(sigmas), extra_args or {}, _on_grid(schedule, "tcd")
    noise = eta_noise("tcd", eta, noise)
    # ⌊(1-γ)·t'⌋ in float32, as TCDScheduler rounds it (float64 gives 489 for γ = 0.3, t' = 700, float32 490).
    below = torch.floor((1 - eta) * schedule.sigma_to_t(sigmas[1:])).long()
    sigmas_s = schedule.sigmas[below].tolist()
    for i in range(len(s) - 1):
        denoised = model(x, sigma_batch(x, s[i]), step=i, **extra)
        x = denoised + (x - denoised) * (sigmas_s[i] / s[i])
        if s[i + 1] == 0:
            x = x / math.sqrt(sigmas_s[i] ** 2 + 1)
        elif noise is not None:
            x = x + noise(s[i], s[i + 1]) * math.sqrt(s[i + 1] ** 2 - sigmas_s[i] ** 2)
        x = after_step(x, i, s, denoised, callback)
    return x


def _lagrange_integral(nodes: list[float], j: int, a: float, b: float) -> float:
    """∫_a^b ℓ_j(τ) dτ for the Lagrange basis polynomial ℓ_j over ``nodes`` (exact: expanded, then integrated)."""
    coeffs = [1.0]  # lowest degree first
    for k, node in enumerate(nodes):
        if k != j:
            scale = 1 / (nodes[j] - node)
            coeffs = [(low - node * high) * scale for low, high in zip([0.0, *coeffs], [*coeffs, 0.0], strict=True)]
    return sum(c * (b ** (n + 1) - a ** (n + 1)) / (n + 1) for n, c in enumerate(coeffs))


def sample_lms(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
               callback: Callback | None = None, noise: NoiseSampler | None = None, order: int = 4) -> torch.Tensor:
    """LMS: the linear multistep (Adams–Bashforth) method on dx/dσ = (x - x̂₀)/σ, ``order`` past slopes.

    Over the non-uniform σ grid: x' = x + Σ_j c_j·d_{i-j}, c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j, ℓ_j the Lagrange basis over
    the last ``order`` σ's (k-diffusion's ``sample_lms``; diffusers' LMSDiscreteScheduler)."""
    s, extra = check_sigmas(sigmas), extra_args or {}
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 4:
        raise SamplerError(f"lms: order={order!r} must be 1, 2, 3 or 4")
    derivatives: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        denoised = model(x, sigma_batch(x, s[i]), step=i, **extra)
        derivatives = (derivatives + [(x - denoised) / s[i]])[-order:]
        nodes = [s[i - j] for j in range(len(derivatives))]
        for j, d in enumerate(reversed(derivatives)):
            x = x + _lagrange_integral(nodes, j, s[i], s[i + 1]) * d
        x = after_step(x, i, s, denoised, callback)
    return x


def sample_dpmpp_3m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                        callback: Callback | None = None, noise: NoiseSampler | None = None,
                        eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep in log-SNR with SDE noise, Brownian-tree noise (2211.01095).

    As k-diffusion's ``sample_dpmpp_3m_sde``: with h = log(σ/σ'), h_η = (1+η)h, φ₂ = (e^{-h_η} - 1)/h_η + 1,
    φ₃ = φ₂/h_η - 1/2, x' = e^{-h_η}·x + (1 - e^{-h_η})·x̂₀ + φ₂·D₁ - φ₃·D₂ with D₁, D₂ the divided differences of
    the last three x̂₀'s (one past x̂₀: φ₂·D₁ alone; none: first order), plus noise σ'·sqrt(1 - e^{-2ηh})·z.
    ``eta`` = 0 is the deterministic 3M solver."""
    s, extra, noise = check_sigmas(sigmas), extra_args or {}, eta_noise("dpm++3m-sde", eta, noise)
    history: list[tuple[float, torch.Tensor]] = []  # (h, x̂₀) of the previous steps, most recent first
    for i in range(len(s) - 1):
        denoised = model(x, sigma_batch(x, s[i]), step=i, **extra)
        h = math.log(s[i] / s[i + 1]) if s[i + 1] > 0 else math.inf
        if s[i + 1] == 0:
            x = denoised
        else:
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if len(history) >= 2:
                r0, r1 = history[0][0] / h, history[1][0] / h
                d1_0 = (denoised - history[0][1]) / r0
                d1_1 = (history[0][1] - history[1][1]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif history:
                x = x + phi_2 / (history[0][0] / h) * (denoised - history[0][1])
            if noise is not None:
                x = x + noise(s[i], s[i + 1]) * (s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)))
        history = [(h, denoised), *history][:2]
        x = after_step(x, i, s, denoised, callback)
    return x
