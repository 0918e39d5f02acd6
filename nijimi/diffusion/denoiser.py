"""Turn a noise- or velocity-predicting network into the denoiser ``D(x, σ) → x̂₀`` that every sampler calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nijimi.diffusion.schedules import NoiseSchedule, sigma_to_t

Network = Callable[..., torch.Tensor]


class Denoiser:
    """``D(x, σ, **cond) = c_skip(σ)·x + c_out(σ)·net(c_in(σ)·x, t(σ), **cond)`` for a discrete-time network.

    ``x`` lives in σ-space (``x = x₀ + σ·ε``); the network was trained on ``x_t = x/sqrt(σ²+1)`` at integer
    timesteps, so ``c_in = 1/sqrt(σ²+1)`` and ``t(σ)`` interpolates between the training timesteps in log σ
    (k-diffusion's ``CompVisDenoiser``; ``quantize=True`` rounds t to the nearest integer, as diffusers'
    DPM-Solver/UniPC do with Karras σ's). By ``schedule.prediction_type`` (EDM table 1, 2206.00364):

    - ``epsilon``: x̂₀ = x - σ·ε̂;
    - ``v_prediction`` (2202.00512): x̂₀ = x/(σ²+1) - σ/sqrt(σ²+1)·v̂;
    - ``sample``: x̂₀ = the network output.

    With ``schedule.clip_sample`` x̂₀ is clamped to ±``clip_sample_range``.
    Shapes: x (B, ...), σ a float or (B,), cond passed through to ``net`` untouched; returns (B, ...).
    """

    def __init__(self, net: Network, schedule: NoiseSchedule, *, quantize: bool = False) -> None:
        self.net = net
        self.schedule = schedule
        self.quantize = quantize
        self.log_sigmas = schedule.sigmas.double().log()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (continuous, or rounded with ``quantize``) training timestep for each σ, float32, same shape, on the
        CPU (the lookup runs in float64 there, whatever device the latents live on)."""
        t = sigma_to_t(sigma.detach().cpu(), self.log_sigmas)
        return t.round() if self.quantize else t

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        c_in = 1 / (s**2 + 1) ** 0.5
        out = self.net(x * c_in, self.timestep(sigma).to(x.device), **cond)
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            x0 = x - s * out
        elif kind == "v_prediction":
            x0 = x / (s**2 + 1) - s * c_in * out
        else:
            x0 = out
        if self.schedule.clip_sample:
            x0 = x0.clamp(-self.schedule.clip_sample_range, self.schedule.clip_sample_range)
        return x0
