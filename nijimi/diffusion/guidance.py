"""The model side of sampling: the denoiser ``D(x, σ) → x̂₀`` every sampler calls, built on a noise- or
velocity-predicting network, and classifier-free guidance (2207.12598) in one batched network call, with guidance
rescale (2305.08891)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nijimi.diffusion.schedules import NoiseSchedule, sigma_to_t
from nijimi.errors import ConfigError

Network = Callable[..., torch.Tensor]


class Denoiser:
    """``D(x, σ, **cond) = c_skip(σ)·x + c_out(σ)·net(c_in(σ)·x, t(σ), **cond)`` for a discrete-time network.

    ``x`` lives in σ-space (``x = x₀ + σ·ε``); the network was trained on ``x_t = x/sqrt(σ²+1)`` at integer
    timesteps, so ``c_in = 1/sqrt(σ²+1)`` and ``t(σ)`` interpolates between the training timesteps in log σ
    (k-diffusion's ``CompVisDenoiser``); ``timesteps`` maps (sampling step, σ) to the timestep to use instead at the
    step's own σ, where diffusers' scheduler rounds or truncates it (:meth:`SamplerChoice.timestep_table
    <nijimi.diffusion.choice.SamplerChoice.timestep_table>`; the step comes as the ``step`` keyword).
    By ``schedule.prediction_type`` (EDM table 1, 2206.00364):

    - ``epsilon``: x̂₀ = x - σ·ε̂;
    - ``v_prediction`` (2202.00512): x̂₀ = x/(σ²+1) - σ/sqrt(σ²+1)·v̂;
    - ``sample``: x̂₀ = the network output.

    With ``schedule.clip_sample`` x̂₀ is clamped to ±``clip_sample_range``.
    Shapes: x (B, ...), σ a float or (B,), cond passed through to ``net`` untouched; returns (B, ...).
    """

    def __init__(self, net: Network, schedule: NoiseSchedule, *,
                 timesteps: Mapping[tuple[int, float], float] | None = None) -> None:
        self.net = net
        self.schedule = schedule
        self.timesteps = dict(timesteps or {})
        self.log_sigmas = schedule.sigmas.double().log()

    def timestep(self, sigma: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The continuous training timestep for each σ (or its ``timesteps`` entry at sampling step ``step``),
        float32, same shape, on the CPU (the lookup runs in float64 there, whatever device the latents live on)."""
        sigma = sigma.detach().cpu()
        t = sigma_to_t(sigma, self.log_sigmas)
        if self.timesteps and step is not None:
            t = torch.tensor([self.timesteps.get((step, v), u) for v, u in zip(sigma.reshape(-1).tolist(),
                                                                               t.reshape(-1).tolist(), strict=True)],
                             dtype=torch.float32).reshape(t.shape)
        return t

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        c_in = 1 / (s**2 + 1) ** 0.5
        out = self.net(x * c_in, self.timestep(sigma, cond.get("step")).to(x.device), **cond)
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


@dataclass(frozen=True)
class GuidedNetwork:
    """Wrap ``net(x, t, **inputs)`` so one call evaluates the conditional and unconditional branches together.

    ``guided(x, t, cond, uncond)`` runs ``net`` once on the batch ``[uncond; cond]`` (2B rows: ``x`` and ``t``
    repeated, each conditioning input concatenated by :func:`batch_conditions`) and returns
    ``p_u + scale·(p_c - p_u)`` on the raw prediction (ε or v, as diffusers does), then, when ``rescale`` φ > 0,
    :func:`rescale_guidance`. When the two cannot be batched (a prompt and a negative prompt of different token
    lengths) ``net`` is called once for each, as A1111 does.
    With ``uncond=None`` or ``scale == 1`` it is a single unguided call on ``cond``. Keyword arguments other than
    ``cond``/``uncond`` (the sampling ``step``) are passed to every call of ``net`` as they are.

    Use it under the denoiser: ``Denoiser(GuidedNetwork(unet, 7.5), schedule)`` called with
    ``extra_args={"cond": {"context": c}, "uncond": {"context": u}}``.
    Shapes: x (B, C, H, W), t (B,), tensors in cond/uncond (B, ...); returns (B, C, H, W).
    """

    net: Network
    scale: float
    rescale: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rescale <= 1.0:
            raise ConfigError(f"guidance rescale {self.rescale} must be within [0, 1]")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any],
                 uncond: Mapping[str, Any] | None = None, **shared: Any) -> torch.Tensor:
        if uncond is None or self.scale == 1.0:
            return self.net(x, t, **cond, **shared)
        if _layout(uncond) == _layout(cond):
            both = self.net(torch.cat([x, x]), torch.cat([t, t]), **batch_conditions(uncond, cond), **shared)
            pred_uncond, pred_cond = both.chunk(2)
        else:  # e.g. prompt and negative prompt of different lengths: two calls, as A1111 makes them
            pred_uncond, pred_cond = self.net(x, t, **uncond, **shared), self.net(x, t, **cond, **shared)
        guided = pred_uncond + self.scale * (pred_cond - pred_uncond)
        if self.rescale > 0:
            guided = rescale_guidance(guided, pred_cond, self.rescale)
        return guided


def _layout(value: Any) -> Any:
    """What must agree for two conditioning inputs to be batched: tensor shapes past the batch dim, structure."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape[1:])
    if isinstance(value, Mapping):
        return {k: _layout(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_layout(v) for v in value]
    return id(value)


def rescale_guidance(guided: torch.Tensor, pred_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Scale the guided prediction back to the conditional prediction's standard deviation, mixed by φ
    (2305.08891, §3.4, eq. 15–16): ``φ·guided·std(p_c)/std(guided) + (1-φ)·guided``; std per sample over all
    non-batch dimensions. Shapes: (B, ...) → (B, ...).
    """
    dims = list(range(1, guided.ndim))
    rescaled = guided * (pred_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def batch_conditions(uncond: Any, cond: Any, key: str = "cond") -> Any:
    """Stack the unconditional and conditional inputs into one batch, ``[uncond; cond]``.

    Tensors are concatenated along dim 0; dicts, lists and tuples are walked item by item; anything else (a flag,
    ``None``) must be the same object in both and is passed once.
    """
    if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor):
        if uncond.shape[1:] != cond.shape[1:]:
            raise ConfigError(f"guidance input {key!r}: uncond shape {tuple(uncond.shape)} does not match cond "
                              f"shape {tuple(cond.shape)}")
        return torch.cat([uncond, cond])
    if isinstance(cond, Mapping) and isinstance(uncond, Mapping):
        if set(cond) != set(uncond):
            raise ConfigError(f"guidance inputs differ: cond has {sorted(cond)}, uncond has {sorted(uncond)}")
        return {k: batch_conditions(uncond[k], cond[k], k) for k in cond}
    if isinstance(cond, list | tuple) and isinstance(uncond, list | tuple) and len(cond) == len(uncond):
        pairs = enumerate(zip(uncond, cond, strict=True))
        return type(cond)(batch_conditions(u, c, f"{key}[{i}]") for i, (u, c) in pairs)
    if uncond is cond:
        return cond
    raise ConfigError(f"guidance input {key!r}: cannot batch {type(uncond).__name__} with {type(cond).__name__}; "
                      "pass tensors, or the same object for both branches")
