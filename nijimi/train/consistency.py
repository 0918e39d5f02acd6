"""Latent consistency distillation (LCM, Luo et al. 2023, arXiv 2310.04378; LCM-LoRA, arXiv 2311.05556): the
objective of ``nijimi train-adapter --type lcm``, plugged into the shared fine-tuning flow like the diffusion loss.

The student is the frozen base model plus the trained LoRA; the teacher is the same base with the LoRA switched off
(its multiplier 0) and classifier-free guidance. One step, for latents x₀ of the batch's images (LCM Alg. 1):

1. draw t_{n+k} on the skipping schedule of the T-step grid (``skip`` = k = 20: t ∈ {19, 39, …, 999}, the 50-step
   grid LCM samples on), ε and a guidance scale s ~ U[``guidance``]; x_{t_{n+k}} = q(x_t | x₀) (DDPM eq. 4);
2. teacher: one DDIM step (2010.02502 eq. 12, η = 0) from t_{n+k} to t_n = max(t_{n+k} − k, 0) along the guided
   prediction ``uncond + s·(cond − uncond)`` (2207.12598) — the "skipping-step" ODE solver of LCM §4.2;
3. student: ``f(x, t) = c_skip(t)·x + c_out(t)·x̂₀(x, t)`` at (x_{t_{n+k}}, t_{n+k}); target: the same function at
   (x̂_{t_n}, t_n) with no gradient, through the target network θ⁻. With ``target_ema`` μ = 0 that is the student
   itself under stop-grad (LCM-LoRA's choice, 2311.05556); with μ > 0 it is the LoRA's exponential moving average
   θ⁻ ← μ·θ⁻ + (1 − μ)·θ, updated once per optimiser step (LCM Alg. 1, μ = 0.95 there; :class:`TargetNetwork`);
4. loss: the pseudo-Huber distance ``sqrt((f − f⁻)² + c²) − c`` (2310.14189 §3.3), mean over elements.

Boundary conditions (consistency models, 2303.01469 §3): with the timestep scaled by 10 and σ_data = 0.5 (diffusers'
LCMScheduler, which :func:`nijimi.diffusion.samplers.sample_lcm` matches), ``c_skip = σ_d² / ((10t)² + σ_d²)`` and
``c_out = 10t / sqrt((10t)² + σ_d²)``, so f(x, 0) = x. The guidance scale is not an input of the student (the LoRA
variant has no w-embedding): the saved adapter samples at ``--cfg 1``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from nijimi.adapters.inject import adapted_layers
from nijimi.adapters.modules import LayerAdapter
from nijimi.diffusion.forward import convert_prediction, q_sample
from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.errors import ConfigError
from nijimi.models.ldm import LatentDiffusion
from nijimi.models.vae import DiagonalGaussian
from nijimi.train.data import collate
from nijimi.train.ldm import draw_diffusion_batch

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(t: torch.Tensor, sigma_data: float = SIGMA_DATA,
                      timestep_scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` at integer timesteps t (B,) (see the module docstring); float32 (B,)."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def _per_sample(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def consistency_function(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                         schedule: NoiseSchedule) -> torch.Tensor:
    """f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂₀ for the network output ``pred`` (ε, v or x₀ as ``schedule`` predicts).
    pred, x_t (B, C, h, w), t (B,)."""
    c_skip, c_out = boundary_scalings(t)
    x0 = convert_prediction(pred, x_t, t, schedule, schedule.prediction_type, "sample")
    return _per_sample(c_skip, x_t) * x_t + _per_sample(c_out, x_t) * x0


def ddim_step(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              schedule: NoiseSchedule) -> torch.Tensor:
    """One deterministic DDIM step (2010.02502 eq. 12, η = 0) from t to t_prev along the network output ``pred``:
    ``x_{t_prev} = sqrt(ᾱ_prev)·x̂₀ + sqrt(1 − ᾱ_prev)·ε̂``. pred, x_t (B, C, h, w), t and t_prev (B,)."""
    x0 = convert_prediction(pred, x_t, t, schedule, schedule.prediction_type, "sample")
    eps = convert_prediction(pred, x_t, t, schedule, schedule.prediction_type, "epsilon")
    return q_sample(x0, t_prev, eps, schedule)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """Mean of ``sqrt((a − b)² + c²) − c`` over all elements (pseudo-Huber, 2310.14189 §3.3), in float32."""
    return ((a.float() - b.float()).pow(2) + c * c).sqrt().sub(c).mean()


def skipping_timesteps(schedule: NoiseSchedule, skip: int) -> torch.Tensor:
    """The grid t_{n+k} LCM trains on: ``k·i − 1`` for i = 1 … T/k (k = ``skip``); (T/k,) long."""
    T = schedule.num_train_timesteps
    if skip < 1 or T % skip:
        raise ConfigError(f"lcm skip {skip} must divide the {T} training timesteps")
    return torch.arange(1, T // skip + 1) * skip - 1


@contextlib.contextmanager
def switched_off(adapters: Iterable[LayerAdapter]) -> Iterator[None]:
    """The adapters at multiplier 0 for the block (the teacher is the bare base model), restored afterwards."""
    adapters = list(adapters)
    saved = [a.multiplier for a in adapters]
    for a in adapters:
        a.multiplier = 0.0
    try:
        yield
    finally:
        for a, m in zip(adapters, saved, strict=True):
            a.multiplier = m


@dataclass(frozen=True)
class DistillSettings:
    """LCM distillation: ``skip`` = k (timesteps per solver step), the teacher's CFG scale drawn uniformly from
    ``guidance`` (low, high), the pseudo-Huber ``huber_c``."""

    skip: int = 20
    guidance: tuple[float, float] = (4.0, 8.0)
    huber_c: float = 0.001
    target_ema: float = 0.0

    def __post_init__(self) -> None:
        low, high = self.guidance
        if not 1.0 <= low <= high:
            raise ConfigError(f"lcm guidance range {self.guidance} must be LOW ≤ HIGH, both ≥ 1")
        if self.huber_c <= 0:
            raise ConfigError(f"huber_c must be > 0, got {self.huber_c}")
        if not 0.0 <= self.target_ema < 1.0:
            raise ConfigError(f"target_ema must be within [0, 1), got {self.target_ema}")


class TargetNetwork(nn.Module):
    """The EMA target θ⁻ of the trained adapters' parameters (LCM Alg. 1): one buffer per parameter (so checkpoints
    carry them and a resumed run continues the same average), starting equal to the adapters. :meth:`update` is
    ``θ⁻ ← μ·θ⁻ + (1 − μ)·θ`` (μ = ``decay``) with the adapters' current θ; :meth:`swapped_in` runs a block with θ⁻
    in the adapters in place of θ."""

    def __init__(self, adapters: list[LayerAdapter], decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.pairs = [(param, f"theta_{i}_{name}") for i, adapter in enumerate(adapters)
                      for name, param in adapter.named_parameters()]
        for param, key in self.pairs:
            self.register_buffer(key, param.detach().clone())

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the adapters' current weights."""
        for param, key in self.pairs:
            getattr(self, key).lerp_(param, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """θ⁻ in the adapters for the block (run it without gradients), θ restored afterwards."""
        with torch.no_grad():
            live = [param.clone() for param, _ in self.pairs]
            for param, key in self.pairs:
                param.copy_(getattr(self, key))
        try:
            yield
        finally:
            with torch.no_grad():
                for (param, _), value in zip(self.pairs, live, strict=True):
                    param.copy_(value)


class ConsistencyObjective(nn.Module):
    """The LCM distillation loss of a base ``model`` carrying the trainable adapter ``name`` (see the module docstring);
    ``forward(indices, generator, part)`` as :class:`~nijimi.train.trainer.Trainer` defines: one call per optimiser
    step, which in training mode first moves the EMA ``target`` (a :class:`TargetNetwork` when
    ``settings.target_ema`` > 0, else None) towards the weights the last step made. After the diffusion draws
    (:func:`~nijimi.train.ldm.draw_diffusion_batch`, timesteps on the skipping grid) it draws the batch's guidance
    scales."""

    def __init__(self, model: LatentDiffusion, name: str, data, settings: DistillSettings = DistillSettings()) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # frozen; not part of any state_dict
        object.__setattr__(self, "adapters", [layer.adapters[name] for _, layer in adapted_layers(model)
                                              if name in layer.adapters])
        self.data, self.settings = data, settings
        self.tokenizer = model.config.tokenizer()
        self.schedule = model.config.schedule
        self.moments: dict[int, torch.Tensor] = {}  # q(z|x) of each image seen, and each caption's context:
        self.contexts: dict[str, torch.Tensor] = {}  # the VAE and text encoder are frozen, so each is made once
        grid = skipping_timesteps(self.schedule, settings.skip)
        self.timestep_weights = torch.zeros(self.schedule.num_train_timesteps).index_fill_(0, grid, 1.0)
        model.requires_grad_(False).eval()
        for adapter in self.adapters:
            adapter.requires_grad_(True)
        self.target = TargetNetwork(self.adapters, settings.target_ema) if settings.target_ema > 0 else None

    @torch.no_grad()
    def encode(self, indices: list[int]) -> tuple[DiagonalGaussian, torch.Tensor, torch.Tensor]:
        """The posterior q(z|x) of the images ``data[i]``, their captions' contexts and the empty caption's
        (each (b, L, D)), encoded once per image and caption."""
        items = {i: self.data[i] for i in indices if i not in self.moments}
        if items:
            images, _, _ = collate(list(items.values()))
            posterior = self.model.vae.encode(images)
            self.moments.update(zip(items, torch.cat([posterior.mean, posterior.logvar], dim=1), strict=True))
        captions = [self.data[i][1] for i in indices]
        new = sorted({*captions, ""} - set(self.contexts))
        if new:
            self.contexts.update(zip(new, self.model.text_encoder(self.tokenizer(new)), strict=True))
        cond = torch.stack([self.contexts[c] for c in captions])
        posterior = DiagonalGaussian(torch.stack([self.moments[i] for i in indices]))
        return posterior, cond, self.contexts[""].expand_as(cond)

    def forward(self, indices: list[int], generator: torch.Generator, part: slice) -> torch.Tensor:
        model, schedule, settings = self.model, self.schedule, self.settings
        if self.target is not None and self.training:
            self.target.update()
        posterior, cond, uncond = self.encode(indices[part])
        with torch.no_grad():
            batch = draw_diffusion_batch(generator, len(indices), part, posterior, model.vae.config.scaling_factor,
                                         schedule, timestep_weights=self.timestep_weights)
            low, high = settings.guidance
            scale = (low + (high - low) * torch.rand(len(indices), generator=generator))[part]
            t, t_prev = batch.t, (batch.t - settings.skip).clamp(min=0)
            with switched_off(self.adapters):
                both = model.unet(torch.cat([batch.x_t, batch.x_t]), torch.cat([t, t]), torch.cat([cond, uncond]))
            pred_cond, pred_uncond = both.chunk(2)
            guided = pred_uncond + _per_sample(scale, pred_cond) * (pred_cond - pred_uncond)
            x_prev = ddim_step(guided, batch.x_t, t, t_prev, schedule)
            with contextlib.nullcontext() if self.target is None else self.target.swapped_in():
                target = consistency_function(model.unet(x_prev, t_prev, cond), x_prev, t_prev, schedule)
        student = consistency_function(model.unet(batch.x_t, t, cond), batch.x_t, t, schedule)
        return pseudo_huber(student, target, settings.huber_c)
