"""Second-order single-step samplers: two denoiser calls per step, the second at an intermediate σ between σ and σ'
(k-diffusion's DPM2, DPM2 a, DPM++ 2S a and DPM++ SDE, as A1111 runs them). Same signature and conventions as
:mod:`nijimi.diffusion.samplers`; the intermediate call passes the step index of the step it belongs to. A step down
to σ' = 0 is one Euler step (x' = x̂₀).

DPM++ 2S (diffusers' ``DPMSolverSinglestepScheduler``) is single-step in DPM-Solver's sense instead: the
intermediate σ of each pair of steps is the schedule's own next σ, one denoiser call per σ.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nijimi.diffusion.samplers import (
    Callback,
    Model,
    NoiseSampler,
    after_step,
    ancestral_step,
    check_sigmas,
    eta_noise,
    sigma_batch,
)


def _dpm2_step(model: Model, x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_to: float, i: int,
               extra: dict) -> torch.Tensor:
    """DPM-Solver-2 from σ to ``sigma_to`` > 0: an Euler half step to the geometric midpoint σ_m = sqrt(σ·σ_to),
    then the full step with the slope there (2206.00927, Alg. 1 with r = 1/2 in log σ; 2206.00364, Alg. 2)."""
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_to)) / 2)
    x_mid = x + (x - denoised) / sigma * (sigma_mid - sigma)
    denoised_mid = model(x_mid, sigma_batch(x, sigma_mid), step=i, **extra)
    return x + (x_mid - denoised_mid) / sigma_mid * (sigma_to - sigma)


def sample_dpm_2(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                 callback: Callback | None = None, noise: NoiseSampler | None = None) -> torch.Tensor:
    """DPM2: DPM-Solver-2 steps of the probability-flow ODE (2206.00927; k-diffusion's ``sample_dpm_2``)."""
    s, extra = check_sigmas(sigmas), extra_args or {}
    for i in range(len(s) - 1):
        denoised = model(x, sigma_batch(x, s[i]), step=i, **extra)
        x = denoised if s[i + 1] == 0 else _dpm2_step(model, x, denoised, s[i], s[i + 1], i, extra)
        x = after_step(x, i, s, denoised, callback)
    return x


def _toward(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_to: float) -> torch.Tensor:
    """The first-order DPM-Solver++ step in σ-space from σ to ``sigma_to`` with a fixed x̂₀:
    x̂₀ + (σ_to/σ)·(x - x̂₀) (2211.01095, eq. 8 with λ = -log σ)."""
    return denoised + (x - denoised) * (sigma_to / sigma)


def _ancestral_second_order(step: Callable[..., torch.Tensor], model: Model, x: torch.Tensor, sigmas: torch.Tensor,
                            extra: dict | None, callback: Callback | None, noise: NoiseSampler | None,
                            eta: float) -> torch.Tensor:
    """The ancestral loop around a second-order ``step(model, x, x̂₀, σ, σ_down, i, extra)``: x̂₀ at σ, the step down
    to σ_down (x̂₀ itself when σ_down = 0), then fresh noise of size σ_up
    (:func:`~nijimi.diffusion.samplers.ancestral_step`) drawn by ``noise`` (the caller's, checked by
    :func:`~nijimi.diffusion.samplers.eta_noise`)."""
    s, extra = check_sigmas(sigmas), extra or {}
    for i in range(len(s) - 1):
        denoised = model(x, sigma_batch(x, s[i]), step=i, **extra)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x = denoised if sigma_down == 0 else step(model, x, denoised, s[i], sigma_down, i, extra)
        if noise is not None and sigma_up > 0:
            x = x + noise(s[i], s[i + 1]) * sigma_up
        x = after_step(x, i, s, denoised, callback)
    return x


def sample_dpm_2_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                           callback: Callback | None = None, noise: NoiseSampler | None = None,
                           eta: float = 1.0) -> torch.Tensor:
    """DPM2 a: a DPM-Solver-2 step down to σ_down, then fresh noise of size σ_up (k-diffusion's DPM2 ancestral)."""
    noise = eta_noise("dpm2-a", eta, noise)
    return _ancestral_second_order(_dpm2_step, model, x, sigmas, extra_args, callback, noise, eta)


def _dpmpp_2s_step(model: Model, x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_to: float, i: int,
                   extra: dict) -> torch.Tensor:
    """DPM-Solver++(2S) from σ to ``sigma_to`` (2211.01095, Alg. 1, r = 1/2): x̂₀ re-evaluated after a first-order
    step to the midpoint in log σ, sqrt(σ·σ_to), then the full first-order step with it."""
    sigma_mid = math.sqrt(sigma * sigma_to)
    x_mid = _toward(x, denoised, sigma, sigma_mid)
    return _toward(x, model(x_mid, sigma_batch(x, sigma_mid), step=i, **extra), sigma, sigma_to)


def sample_dpmpp_2s_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                              callback: Callback | None = None, noise: NoiseSampler | None = None,
                              eta: float = 1.0) -> torch.Tensor:
    """DPM++ 2S a: a DPM-Solver++(2S) step down to σ_down, then fresh noise of size σ_up (k-diffusion's)."""
    noise = eta_noise("dpm++2s-a", eta, noise)
    return _ancestral_second_order(_dpmpp_2s_step, model, x, sigmas, extra_args, callback, noise, eta)


def sample_dpmpp_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                     callback: Callback | None = None, noise: NoiseSampler | None = None,
                     eta: float = 1.0) -> torch.Tensor:
    """DPM++ SDE: stochastic DPM-Solver++ with one intermediate point, Brownian-tree noise (2211.01095).

    As k-diffusion's ``sample_dpmpp_sde`` with r = 1/2: an ancestral step to the midpoint σ_m = sqrt(σ·σ') (its own
    noise), x̂₀ there, then an ancestral step from x to σ' with that x̂₀. Both noises come from one Brownian path
    (increments over [σ_m, σ] and [σ', σ]), so ``noise`` is meant to be a Brownian tree."""
    s, extra, noise = check_sigmas(sigmas), extra_args or {}, eta_noise("dpm++sde", eta, noise)
    for i in range(len(s) - 1):
        denoised = model(x, sigma_batch(x, s[i]), step=i, **extra)
        if s[i + 1] == 0:
            x = denoised
        else:
            sigma_mid = math.sqrt(s[i] * s[i + 1])
            down, up = ancestral_step(s[i], sigma_mid, eta)
            x_mid = _toward(x, denoised, s[i], down)
            if noise is not None and up > 0:
                x_mid = x_mid + noise(s[i], sigma_mid) * up
            denoised_mid = model(x_mid, sigma_batch(x, sigma_mid), step=i, **extra)
            down, up = ancestral_step(s[i], s[i + 1], eta)
            x = _toward(x, denoised_mid, s[i], down)
            if noise is not None and up > 0:
                x = x + noise(s[i], s[i + 1]) * up
        x = after_step(x, i, s, denoised, callback)
    return x


def sample_dpmpp_2s(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                    callback: Callback | None = None, noise: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(2S) over pairs of the schedule's steps (2211.01095, Alg. 1; diffusers'
    ``DPMSolverSinglestepScheduler``, solver order 2, midpoint, lower order final): steps 0, 2, 4, … are first-order
    steps to the next σ, which is the pair's intermediate point; the step after each (1, 3, …) goes from the pair's
    start σ_s straight to σ' with the x̂₀'s at σ_s and at the intermediate σ_m:

    h = log(σ_s/σ'), r = log(σ_s/σ_m)/h,  x' = (σ'/σ_s)·x_s + (1 - e^{-h})·((1 - 1/(2r))·x̂₀(σ_s) + x̂₀(σ_m)/(2r)).

    The last step is first order (an even count ends in two first-order steps). Pairs count from the first σ
    passed: an img2img tail starting at an odd step pairs differently from diffusers, which counts from the whole
    schedule's first step."""
    s, extra = check_sigmas(sigmas), extra_args or {}
    start, start_denoised = x, None
    for i in range(len(s) - 1):
        denoised = model(x, sigma_batch(x, s[i]), step=i, **extra)
        if i % 2 and i < len(s) - 2:
            h = math.log(s[i - 1] / s[i + 1])
            half_inv_r = h / (2 * math.log(s[i - 1] / s[i]))
            d = (1 - half_inv_r) * start_denoised + half_inv_r * denoised
            x = (s[i + 1] / s[i - 1]) * start - math.expm1(-h) * d
        else:
            start, start_denoised = x, denoised
            x = _toward(x, denoised, s[i], s[i + 1]) if s[i + 1] > 0 else denoised
        x = after_step(x, i, s, denoised, callback)
    return x
