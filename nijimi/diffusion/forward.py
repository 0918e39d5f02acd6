"""The forward (noising) process, training targets, conversions between ε/v/x₀ predictions, and the loss.

Everything here is in the variance-preserving form the network is trained on (DDPM, 2006.11239):
``x_t = sqrt(ᾱ_t)·x₀ + sqrt(1-ᾱ_t)·ε`` with integer timesteps t (B,). Shapes: x₀, ε, x_t, predictions (B, ...).
"""

from __future__ import annotations

import torch

from nijimi.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule
from nijimi.errors import ConfigError


def _alpha_bar(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t gathered for each sample and shaped (B, 1, ..., 1) to broadcast against ``like`` (B, ...)."""
    t = torch.as_tensor(t, device=like.device).long()
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ConfigError(f"timesteps of shape {tuple(t.shape)} do not match a batch of {like.shape[0]}")
    if t.min() < 0 or t.max() >= schedule.num_train_timesteps:
        raise ConfigError(f"timesteps {t.min().item()}…{t.max().item()} outside 0…{schedule.num_train_timesteps - 1}")
    alpha_bar = schedule.alphas_cumprod.to(like.device)[t]
    return alpha_bar.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Sample q(x_t | x₀) = N(sqrt(ᾱ_t)·x₀, (1-ᾱ_t)·I) with the given noise (DDPM eq. 4). x₀, noise (B, ...), t (B,)."""
    a = _alpha_bar(schedule, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def training_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """What the network must output for ``schedule.prediction_type``: ε, v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x₀ (2202.00512,
    §4), or x₀. Shapes (B, ...)."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "sample":
        return x0
    a = _alpha_bar(schedule, t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def convert_prediction(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
                       source: str, target: str) -> torch.Tensor:
    """Re-express a prediction made at (x_t, t) as another kind: ``source``/``target`` in
    ``epsilon``, ``v_prediction``, ``sample``. With a = sqrt(ᾱ), b = sqrt(1-ᾱ) (so a² + b² = 1):
    x₀ = (x_t - b·ε)/a,  ε = (x_t - a·x₀)/b,  v = a·ε - b·x₀,  x₀ = a·x_t - b·v,  ε = b·x_t + a·v.
    Shapes (B, ...); converting ε → x₀ is ill-posed where ᾱ → 0 and x₀ → ε where ᾱ → 1.
    """
    for name, kind in (("source", source), ("target", target)):
        if kind not in PREDICTION_TYPES:
            raise ConfigError(f"{name} prediction type {kind!r} is not one of {', '.join(PREDICTION_TYPES)}")
    alpha_bar = _alpha_bar(schedule, t, x_t)
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if source == "epsilon":
        eps, x0 = pred, (x_t - b * pred) / a
    elif source == "sample":
        eps, x0 = (x_t - a * pred) / b, pred
    else:
        eps, x0 = b * x_t + a * pred, a * x_t - b * pred
    return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - b * x0}[target]


def min_snr_weights(t: torch.Tensor, schedule: NoiseSchedule, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (2303.09556, §3.4), (B,) float32 for timesteps t (B,): with SNR_t = ᾱ_t/(1-ᾱ_t),
    ``min(SNR, γ)/SNR`` for ε-, ``min(SNR, γ)/(SNR+1)`` for v- and ``min(SNR, γ)`` for x₀-prediction (each turns
    the MSE into min(SNR, γ)·‖x₀ - x̂₀‖²). Where SNR = 0 (zero-terminal SNR) the ε weight takes its limit, 1.
    """
    if not gamma > 0:
        raise ConfigError(f"min_snr_gamma={gamma} must be > 0")
    t = torch.as_tensor(t).long()
    alpha_bar = schedule.alphas_cumprod.to(t.device)[t]
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    if schedule.prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
    if schedule.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")


def timestep_weights(num_timesteps: int, strategy: str = "none", multiplier: float = 1.0, portion: float = 0.25,
                     begin: int = 0, end: int = 1000) -> torch.Tensor | None:
    """Probabilities (T,) for drawing training timesteps with one part favoured, or None for ``"none"`` (uniform).

    The options of diffusers' training scripts (``--timestep_bias_strategy`` …): the weights of the chosen timesteps
    are ``multiplier`` times the others' — ``"later"``: the last ``portion`` of them (high noise, where the layout of
    an image is decided), ``"earlier"``: the first ``portion`` (low noise, details), ``"range"``: ``[begin, end)``.
    """
    if strategy not in TIMESTEP_BIAS_STRATEGIES:
        raise ConfigError(f"unknown timestep bias strategy {strategy!r}; choose one of "
                          f"{', '.join(TIMESTEP_BIAS_STRATEGIES)}")
    if strategy == "none":
        return None
    if not multiplier > 0:
        raise ConfigError(f"timestep bias multiplier must be > 0, got {multiplier}")
    if strategy == "range":
        if not 0 <= begin < end <= num_timesteps:
            raise ConfigError(f"timestep bias range [{begin}, {end}) is not inside [0, {num_timesteps})")
        chosen = slice(begin, end)
    else:
        if not 0 < portion <= 1:
            raise ConfigError(f"timestep bias portion must be in (0, 1], got {portion}")
        count = max(1, round(portion * num_timesteps))
        chosen = slice(num_timesteps - count, None) if strategy == "later" else slice(0, count)
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    weights[chosen] *= multiplier
    return weights / weights.sum()


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, *,
                   min_snr_gamma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-squared error between prediction and target, optionally Min-SNR-γ weighted.

    Returns ``(loss, per_sample)``: ``per_sample`` (B,) is each sample's MSE (mean over its elements) times its
    Min-SNR weight (1 without ``min_snr_gamma``), and ``loss`` is the batch mean — the scalar to backpropagate; both
    carry gradients. Computed in float32 whatever the input dtype. pred, target (B, ...), t (B,).
    """
    if pred.shape != target.shape:
        raise ConfigError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=list(range(1, pred.ndim)))
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(t, schedule, min_snr_gamma).to(per_sample.device)
    return per_sample.mean(), per_sample
