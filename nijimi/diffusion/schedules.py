"""Noise schedules: β_t, ᾱ_t, σ_t, log-SNR, and the σ's a sampler walks through.

Conventions (used by every file in ``nijimi.diffusion``):

- Training timesteps are integers ``t = 0 … T-1`` (T = ``num_train_timesteps``, 1000 for SD).
- The variance-preserving forward process (DDPM, 2006.11239) is ``x_t = sqrt(ᾱ_t)·x₀ + sqrt(1-ᾱ_t)·ε``.
- Samplers work in the variance-exploding "σ-space" of k-diffusion / EDM (2206.00364): ``x = x₀ + σ·ε`` with
  ``σ_t = sqrt((1-ᾱ_t)/ᾱ_t)``, i.e. ``x = x_t / sqrt(ᾱ_t) = x_t·sqrt(σ²+1)``.
- ``log-SNR_t = log(ᾱ_t / (1-ᾱ_t)) = -2·log σ_t``.

The numbers equal diffusers' schedulers bit for bit where they can (β and ᾱ are built in float32 the same way), and
the sampling σ's follow ``EulerDiscreteScheduler.set_timesteps``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from nijimi.errors import ConfigError, SamplerError

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SIGMA_SPACINGS = ("model", "trailing", "lcm")
LCM_ORIGINAL_STEPS = 50

# ᾱ_{T-1} after zero-terminal-SNR rescaling is exactly 0 (σ = ∞); like diffusers we store 2⁻²⁴ so σ_max ≈ 4096.
_ZERO_SNR_ALPHA_BAR = 2.0**-24
MAX_TRAIN_TIMESTEPS = 100_000
"""Most training timesteps a schedule may have (SD: 1000); its tables hold a few floats per timestep."""

# diffusers config keys whose non-default values would change sampling in a way nijimi does not implement.
_UNSUPPORTED_KEYS = {"thresholding": False, "trained_betas": None, "timestep_type": "discrete",
                     "interpolation_type": "linear"}


@dataclass(frozen=True)
class NoiseSchedule:
    """The discrete diffusion schedule a model was trained with, plus how its sampler picks timesteps.

    Field names follow diffusers' ``scheduler_config.json`` except ``beta_schedule="cosine"`` (diffusers:
    ``squaredcos_cap_v2``) and ``rescale_zero_terminal_snr`` (diffusers: ``rescale_betas_zero_snr``).
    ``clip_sample`` clamps the predicted x₀ to ``±clip_sample_range`` (pixel-space models only; never for SD latents).
    ``set_alpha_to_one``: DDIM's last step ends at ᾱ = 1 (σ = 0) when true, at ᾱ_0 (σ_0 ≈ 0.029 for SD) when false
    (``DDIMScheduler``'s ``final_alpha_cumprod``; SD 1.x/2.x's configs say false, diffusers' default is true).
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    rescale_zero_terminal_snr: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                              ("timestep_spacing", TIMESTEP_SPACINGS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 2 <= self.num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
            raise ConfigError(f"num_train_timesteps={self.num_train_timesteps} must be in [2, {MAX_TRAIN_TIMESTEPS}]")
        if self.steps_offset < 0:
            raise ConfigError(f"steps_offset={self.steps_offset} must be >= 0")
        if self.beta_schedule != "cosine" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(f"beta_start={self.beta_start}, beta_end={self.beta_end}: need 0 < start <= end < 1")

    @classmethod
    def sd(cls, prediction_type: str = "epsilon") -> NoiseSchedule:
        """Stable Diffusion 1.x/2.x: scaled-linear β from 0.00085 to 0.012 over 1000 steps, "leading" spacing with
        offset 1 (the values in SD's scheduler_config.json). SD 2.x 768-v models use ``prediction_type="v_prediction"``.
        """
        return cls(prediction_type=prediction_type)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """Read a diffusers ``scheduler_config.json`` dict (any scheduler class); unknown keys are ignored.

        Missing keys take diffusers' defaults for SD-era configs: spacing "leading", ``steps_offset=0``, no clipping,
        ``set_alpha_to_one=True`` (``DDIMScheduler``'s, whatever class the config names).
        """
        for key, default in _UNSUPPORTED_KEYS.items():
            if config.get(key, default) != default:
                raise ConfigError(f"scheduler config {key}={config[key]!r} is not supported (only {default!r})")
        beta_schedule = config.get("beta_schedule", "linear")
        return cls(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_schedule="cosine" if beta_schedule == "squaredcos_cap_v2" else beta_schedule,
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            prediction_type=config.get("prediction_type", "epsilon"),
            timestep_spacing=config.get("timestep_spacing", "leading"),
            steps_offset=int(config.get("steps_offset", 0)),
            rescale_zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
            clip_sample=bool(config.get("clip_sample", False)),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
            set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
        )

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers ``scheduler_config.json`` keys for this schedule (no ``_class_name``)."""
        config = asdict(self)
        config["rescale_betas_zero_snr"] = config.pop("rescale_zero_terminal_snr")
        if self.beta_schedule == "cosine":
            config["beta_schedule"] = "squaredcos_cap_v2"
        return config

    @property
    def betas(self) -> torch.Tensor:
        """β_t, shape (T,), float32."""
        betas = _base_betas(self)
        return _rescale_zero_terminal_snr(betas) if self.rescale_zero_terminal_snr else betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t = Π_{s≤t} (1-β_s), shape (T,), float32 (the last entry is 2⁻²⁴ under zero-terminal SNR)."""
        alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        if self.rescale_zero_terminal_snr:
            alphas_cumprod[-1] = _ZERO_SNR_ALPHA_BAR
        return alphas_cumprod

    @property
    def sigmas(self) -> torch.Tensor:
        """σ_t = sqrt((1-ᾱ_t)/ᾱ_t), shape (T,), float32, increasing with t."""
        alphas_cumprod = self.alphas_cumprod
        return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5

    @property
    def log_snr(self) -> torch.Tensor:
        """log-SNR_t = log(ᾱ_t/(1-ᾱ_t)), shape (T,), float32, decreasing with t."""
        alphas_cumprod = self.alphas_cumprod.double()
        return (alphas_cumprod.log() - torch.log1p(-alphas_cumprod)).float()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous training timestep for each σ by linear interpolation in log σ (same shape, float32)."""
        return sigma_to_t(sigma, self.sigmas.double().log())

    def timesteps(self, steps: int, spacing: str | None = None) -> torch.Tensor:
        """The ``steps`` training timesteps that ``spacing`` (default: the model's own ``timestep_spacing``) picks,
        descending, float32 (steps,).

        ``linspace``: evenly from T-1 to 0 (fractional); ``leading``: ``k·(T//steps) + steps_offset``;
        ``trailing``: ``round(T - k·T/steps) - 1`` (2305.08891, Table 2); ``lcm``: LCM's skipping schedule
        (2310.04378, §4.3), the 50 distillation timesteps ``j·(T//50) - 1``, of which ``steps`` are taken evenly by
        index from the top (diffusers' LCMScheduler / TCDScheduler with ``original_inference_steps=50``).
        """
        _check_steps(steps, self.num_train_timesteps)
        T, spacing = self.num_train_timesteps, spacing or self.timestep_spacing
        if spacing == "lcm":
            k, n = T // LCM_ORIGINAL_STEPS, LCM_ORIGINAL_STEPS
            if steps > n or k == 0:
                raise SamplerError(f"steps={steps}: LCM's schedule has {n} timesteps (of T={T} >= {n})")
            timesteps = torch.tensor([(n - math.floor(j * (n / steps))) * k - 1 for j in range(steps)],
                                     dtype=torch.float64)
        elif spacing == "linspace":
            timesteps = torch.linspace(0, T - 1, steps, dtype=torch.float64).flip(0)
        elif spacing == "leading":
            timesteps = (torch.arange(steps, dtype=torch.float64) * (T // steps)).flip(0) + self.steps_offset
        else:
            # numpy's arange(T, 0, -T/steps) (which diffusers uses) steps by (T - T/steps) - T; we take exactly
            # `steps` of its values (numpy sometimes yields one extra, ending at timestep -1).
            delta = (T - T / steps) - T
            timesteps = (T + torch.arange(steps, dtype=torch.float64) * delta).round() - 1
        if timesteps[0] > T - 1:
            raise SamplerError(f"steps={steps} with steps_offset={self.steps_offset} reaches timestep "
                               f"{int(timesteps[0])}, past the last training timestep {T - 1}")
        return timesteps.float()


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Map σ (any shape) to a continuous timestep: find the training σ's that bracket it and interpolate linearly
    in log σ, clamped to [0, T-1] (k-diffusion's ``DiscreteSchedule.sigma_to_t``). ``log_sigmas``: (T,) increasing.
    """
    log_sigma = sigma.double().clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(log_sigmas) - 2)
    low = low.reshape(log_sigma.shape)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (low + w).float()


def sampling_sigmas(schedule: NoiseSchedule, steps: int, spacing: str = "model") -> torch.Tensor:
    """The σ's a sampler walks through: shape (steps+1,), float32, strictly decreasing, last entry 0.

    ``spacing``:
      - ``"model"``: σ at the model's own timesteps (``schedule.timesteps``), interpolated linearly in t;
      - ``"trailing"``, ``"lcm"``: σ at those timesteps instead (:meth:`NoiseSchedule.timesteps`), whatever the
        model's own spacing (Hyper-SD's and LCM's few-step schedules).

    These are exactly ``EulerDiscreteScheduler.set_timesteps`` σ's. The other schedules (Karras, exponential, …),
    and the σ's of the samplers whose diffusers scheduler picks its timesteps otherwise, are
    :func:`nijimi.diffusion.sigmas.schedule_sigmas`.
    """
    if spacing not in SIGMA_SPACINGS:
        raise SamplerError(f"σ spacing {spacing!r} is not one of {', '.join(SIGMA_SPACINGS)}")
    train_sigmas = schedule.sigmas.double()
    timesteps = schedule.timesteps(steps, spacing if spacing in ("trailing", "lcm") else None).double()
    low = timesteps.floor().long().clamp(0, len(train_sigmas) - 1)
    high = (low + 1).clamp(max=len(train_sigmas) - 1)
    frac = (timesteps - low).clamp(0, 1)
    sigmas = train_sigmas[low] + frac * (train_sigmas[high] - train_sigmas[low])
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def _check_steps(steps: int, num_train_timesteps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
        raise SamplerError(f"steps={steps!r} must be an integer from 1 to {num_train_timesteps}")


def _base_betas(schedule: NoiseSchedule) -> torch.Tensor:
    """β_t before any rescaling, (T,) float32, built the way diffusers builds them."""
    T = schedule.num_train_timesteps
    if schedule.beta_schedule == "linear":
        return torch.linspace(schedule.beta_start, schedule.beta_end, T, dtype=torch.float32)
    if schedule.beta_schedule == "scaled_linear":
        return torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, T, dtype=torch.float32) ** 2
    # iDDPM cosine schedule (2102.09672, eq. 17): ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, β clipped at 0.999.
    t = torch.arange(T + 1, dtype=torch.float64) / T
    alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999).float()


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(ᾱ_t) so the last step has SNR 0 while the first is unchanged (2305.08891, Algorithm 1)."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas
