"""The sampler × schedule parity matrix: every sampler in its schedules against diffusers' scheduler read from the
same config (its default configuration and use_karras_sigmas / use_exponential_sigmas / timestep_spacing), and
every sampler diffusers lacks (and the k-diffusion ones it has) against k-diffusion's ``sampling`` module on the
same σ's, ≤ 1e-4."""

import copy
import functools
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from helpers import rel_err as max_rel
from sampling_ref import diffusers_loop, load_sampling

from nijimi.diffusion.choice import SAMPLER_SPECS, SamplerChoice
from nijimi.diffusion.guidance import Denoiser
from nijimi.diffusion.noise import BrownianNoise, gaussian_noise
from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.diffusion.sigmas import SCHEDULES, schedule_sigmas

SHAPE = (1, 4, 8, 8)
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
"""diffusers' schedulers mix tensors into NumPy calls as NumPy 2 deprecates (``__array__`` without ``copy``,
``__array_wrap__``), tens of thousands of times here."""


def start_noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def spaced(spacing: str) -> NoiseSchedule:
    return NoiseSchedule(timestep_spacing=spacing, steps_offset=int(spacing == "leading"))


def run_ours(base, name, schedule, net, steps, noise=None):
    """The sampler on the schedule's plan as diffusers runs it: no A1111 next-to-last σ discarding."""
    choice = SamplerChoice(base, name)
    plan = schedule_sigmas(schedule, steps, name, choice.spec.family)
    x = start_noise() * choice.start_scale(float(plan.sigmas[0]), schedule)
    denoiser = Denoiser(net, schedule, timesteps=plan.timestep_table())
    return choice.fn(denoiser, x, plan.sigmas, noise=noise and noise(x, plan.sigmas),
                     **choice.options(schedule, None, steps))


SD_RANGE = {"sigma_min": NoiseSchedule.sd().sigmas[0].item(), "sigma_max": NoiseSchedule.sd().sigmas[-1].item()}
"""The model's σ range. Our Karras / exponential σ's span it for every sampler and every timestep spacing, as
A1111's do, and as diffusers' DPMSolverMultistep, DPMSolverSinglestep and UniPC do in their default configuration.
diffusers' Euler, Heun, LMS, KDPM2 and KDPM2Ancestral span only the σ's of their spaced timesteps (σ(951)…σ(1) for
"leading" at 20 steps; the whole range on "linspace") unless their config holds ``sigma_min`` / ``sigma_max``: Euler
takes them as arguments, Heun and the KDPM2s read them from the config without taking them (so the test registers
them), and LMS's Karras ignores them (:func:`test_lms_karras_is_one_schedule_where_diffusers_has_one_per_spacing`)."""
ALL, LINSPACE = ("leading", "linspace", "trailing"), ("linspace",)
KARRAS, EXPONENTIAL = {"use_karras_sigmas": True, **SD_RANGE}, {"use_exponential_sigmas": True, **SD_RANGE}
# (sampler, schedule, diffusers scheduler, its config beyond the model's, the model's timestep spacings)
DIFFUSERS = [
    ("euler", "uniform", EulerDiscreteScheduler, {}, ALL),
    ("euler", "karras", EulerDiscreteScheduler, KARRAS, ALL),
    ("euler", "exponential", EulerDiscreteScheduler, EXPONENTIAL, ALL),
    ("euler-a", "uniform", EulerAncestralDiscreteScheduler, {}, ALL),
    ("heun", "uniform", HeunDiscreteScheduler, {}, ALL),
    ("heun", "karras", HeunDiscreteScheduler, KARRAS, ALL),
    ("heun", "exponential", HeunDiscreteScheduler, EXPONENTIAL, ALL),
    ("lms", "uniform", LMSDiscreteScheduler, {}, ALL),
    ("lms", "karras", LMSDiscreteScheduler, KARRAS, LINSPACE),
    ("lms", "exponential", LMSDiscreteScheduler, EXPONENTIAL, ALL),
    ("dpm2", "uniform", KDPM2DiscreteScheduler, {}, ALL),
    ("dpm2", "karras", KDPM2DiscreteScheduler, KARRAS, ALL),
    ("dpm2", "exponential", KDPM2DiscreteScheduler, EXPONENTIAL, ALL),
    ("dpm2-a", "uniform", KDPM2AncestralDiscreteScheduler, {}, ALL),
    ("dpm2-a", "karras", KDPM2AncestralDiscreteScheduler, KARRAS, ALL),
    ("dpm2-a", "exponential", KDPM2AncestralDiscreteScheduler, EXPONENTIAL, ALL),
    ("dpm++2m", "uniform", DPMSolverMultistepScheduler, {}, ALL),
    ("dpm++2m", "karras", DPMSolverMultistepScheduler, KARRAS, ALL),
    ("dpm++2m", "exponential", DPMSolverMultistepScheduler, EXPONENTIAL, ALL),
    ("dpm++2m", "trailing", DPMSolverMultistepScheduler, {"timestep_spacing": "trailing"}, ("leading",)),
    ("dpm++2m-sde", "uniform", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, ALL),
    ("dpm++2m-sde", "karras", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", **KARRAS}, ALL),
    ("dpm++2m-sde", "exponential", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", **EXPONENTIAL},
     ALL),
    ("dpm++2s", "uniform", DPMSolverSinglestepScheduler, {}, ALL),
    ("dpm++2s", "karras", DPMSolverSinglestepScheduler, KARRAS, ALL),
    ("dpm++2s", "exponential", DPMSolverSinglestepScheduler, EXPONENTIAL, ALL),
    ("unipc", "uniform", UniPCMultistepScheduler, {}, ALL),
    ("unipc", "karras", UniPCMultistepScheduler, KARRAS, ALL),
    ("unipc", "exponential", UniPCMultistepScheduler, EXPONENTIAL, ALL),
    ("ddim", "uniform", DDIMScheduler, {}, ALL),
    ("ddpm", "uniform", DDPMScheduler, {}, ALL),
    ("lcm", "lcm", LCMScheduler, {}, ALL),
    ("tcd", "lcm", TCDScheduler, {}, ALL),
]
"""Every sampler with a diffusers scheduler, in each schedule that scheduler has, on models of each timestep spacing
(SD's "leading" with steps_offset 1): the scheduler in its default configuration read from the model's
``scheduler_config.json`` plus the schedule's switch, against our sampler on the same model with that schedule
(``uniform``: the model's own timesteps). DPMSolverSinglestep, LCM and TCD ignore the model's spacing, and so do we.
Not here: DPM++ 2S a, DPM++ SDE and DPM++ 3M SDE (no diffusers scheduler but DPMSolverSDE, which needs torchsde),
and every schedule no diffusers scheduler has: k-diffusion below."""


STEP_TIME_KEYS = ("timestep_spacing", "steps_offset", "prediction_type")
"""The config keys only ``set_timesteps`` and ``step`` of these diffusers schedulers depend on (what a constructor
derives from them, KDPM2's 1000 timesteps, ``set_timesteps`` makes again)."""


@functools.cache
def _prototype(cls: type, config: tuple) -> object:
    """``cls`` from ``config`` (sorted items), made once: KDPM2's constructor alone takes seconds."""
    return cls.from_config(dict(config))


def configured(cls: type, schedule: NoiseSchedule, config: dict) -> object:
    """``cls`` read from the model's config plus ``config``: a copy of the one instance made from everything but
    :data:`STEP_TIME_KEYS`, which are then set, and ``config`` set again, for sigma_min / sigma_max, which Heun and
    KDPM2 read from their config but do not take as arguments (see SD_RANGE)."""
    model = schedule.to_diffusers_config()
    made = {**{k: v for k, v in model.items() if k not in STEP_TIME_KEYS}, **config}
    scheduler = copy.deepcopy(_prototype(cls, tuple(sorted(made.items()))))
    scheduler.register_to_config(**{**model, **config})
    return scheduler


def shared_noise(base: str, name: str, schedule: NoiseSchedule, steps: int):
    """Our noise source and diffusers' step arguments drawing the same noise: one generator seeded 5 each, drawn in
    the same order, or the Brownian path we walk, handed to DPMSolverMultistep's step as ``variance_noise``."""
    kind = SAMPLER_SPECS[base].noise
    if kind is None:
        return None, lambda k: {}
    if kind == "gaussian":
        generator = torch.Generator().manual_seed(5)
        return (lambda x, _: gaussian_noise(x, torch.Generator().manual_seed(5), base)), \
            lambda k: {"generator": generator}
    s = schedule_sigmas(schedule, steps, name, SAMPLER_SPECS[base].family).sigmas.tolist()
    brownian = BrownianNoise(start_noise(), s[0], torch.Generator().manual_seed(9), base)
    noises = [brownian(s[k], s[k + 1]) if s[k + 1] > 0 else torch.zeros(SHAPE) for k in range(steps)]
    return (lambda x, sig: BrownianNoise(x, sig[0].item(), torch.Generator().manual_seed(9), base)), \
        lambda k: {"variance_noise": noises[k]}


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", [(*c[:4], s) for c in DIFFUSERS for s in c[4]],
                         ids=lambda c: f"{c[0]}-{c[1]}-{c[4]}")
def test_samplers_equal_diffusers(tiny_net, case, prediction_type, steps):
    base, name, cls, config, spacing = case
    schedule = NoiseSchedule(**{**spaced(spacing).__dict__, "prediction_type": prediction_type})
    scheduler = configured(cls, schedule, config)
    scheduler.set_timesteps(steps)
    noise, step_kwargs = shared_noise(base, name, schedule, steps)
    with torch.no_grad():
        ours = run_ours(base, name, schedule, tiny_net, steps, noise)
        ref = diffusers_loop(scheduler, tiny_net, start_noise() * scheduler.init_noise_sigma, steps,
                             step_kwargs=step_kwargs)
    assert max_rel(ours, ref) <= 1e-4


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_lms_karras_is_one_schedule_where_diffusers_has_one_per_spacing(spacing):
    """diffusers' LMSDiscreteScheduler alone builds its Karras σ's between the first and last σ of its spaced
    timesteps whatever its config says (its ``_convert_to_karras`` reads no ``sigma_min`` / ``sigma_max``, unlike
    its own exponential σ's and every other scheduler's Karras): σ(951)…σ(1) on "leading" and σ(999)…σ(49) on
    "trailing" at 20 steps, the whole range only on "linspace". So its LMS Karras is a different schedule for each
    spacing and differs from its Euler's, Heun's and DPM++'s Karras on the same model. Ours is A1111's, one for
    every spacing: the same σ's as on "linspace", where LMS equals diffusers (the table), and the same σ's as
    diffusers' Euler Karras on this model; k-diffusion's ``sample_lms`` on them gives our result
    (:func:`test_samplers_equal_k_diffusion_in_every_schedule`)."""
    ours = SamplerChoice("lms", "karras").sigmas(spaced(spacing), 20)
    assert torch.equal(ours, SamplerChoice("lms", "karras").sigmas(spaced("linspace"), 20))
    euler = EulerDiscreteScheduler.from_config(spaced(spacing).to_diffusers_config(), **KARRAS)
    lms = LMSDiscreteScheduler.from_config(spaced(spacing).to_diffusers_config(), use_karras_sigmas=True)
    lms.register_to_config(**SD_RANGE)
    for scheduler in (euler, lms):
        scheduler.set_timesteps(20)
    assert max_rel(ours, euler.sigmas) <= 1e-5
    assert max_rel(ours, lms.sigmas) > 0.05


SD15_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
               "steps_offset": 1, "trained_betas": None, "clip_sample": False}
SD21_CONFIG = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
               "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True,
               "steps_offset": 1, "trained_betas": None}
"""The scheduler_config.json of SD 1.5 and SD 2.1 (768, v-prediction), as published."""


@pytest.mark.parametrize("steps", [10, 30])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("config", [SD15_CONFIG, SD21_CONFIG, {**SD15_CONFIG, "set_alpha_to_one": True}],
                         ids=["sd15", "sd21", "alpha-to-one"])
def test_ddim_equals_ddim_scheduler_read_from_the_sd_configs(tiny_net, config, spacing, eta, steps):
    """DDIMScheduler from SD's own config: ``set_alpha_to_one`` false ends the last step at ᾱ_0 (σ_0), and on
    "trailing" / "linspace" timesteps each step lands at t - T//N, not always the next timestep; we follow both."""
    config = {**config, "timestep_spacing": spacing}
    schedule = NoiseSchedule.from_diffusers_config(config)
    assert schedule.set_alpha_to_one == config["set_alpha_to_one"]
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    choice = SamplerChoice("ddim", "uniform")
    sigmas = choice.sigmas(schedule, steps)
    x = start_noise() * choice.start_scale(float(sigmas[0]), schedule)
    step_generator, noise = torch.Generator().manual_seed(5), gaussian_noise(x, torch.Generator().manual_seed(5), "d")
    with torch.no_grad():
        ours = choice.fn(Denoiser(tiny_net, schedule), x, sigmas, noise=noise, **choice.options(schedule, eta, steps))
        ref = diffusers_loop(scheduler, tiny_net, start_noise() * scheduler.init_noise_sigma, steps,
                             step_kwargs=lambda k: {"eta": eta, "generator": step_generator})
    assert max_rel(ours, ref) <= 1e-4


def test_ddim_ends_at_sigma_0_unless_set_alpha_to_one():
    schedule = NoiseSchedule.from_diffusers_config(SD15_CONFIG)
    assert NoiseSchedule.from_diffusers_config({}).set_alpha_to_one and not NoiseSchedule.sd().set_alpha_to_one
    sigma_0 = schedule.sigmas[0].item()
    last = SamplerChoice("ddim").sigmas(schedule, 10)[-2].item()
    assert SamplerChoice("ddim").options(schedule, None, 10) == {"landing": {last: sigma_0}}
    one = NoiseSchedule(set_alpha_to_one=True)
    assert SamplerChoice("ddim").options(one, None, 10) == {} == SamplerChoice("ddpm").options(schedule, None, 10)
    x, sigmas = torch.ones(1, 4), torch.tensor([last, 0.0])
    out = SAMPLER_SPECS["ddim"].fn(lambda x, s, **_: torch.zeros_like(x), x, sigmas, landing={last: sigma_0})
    assert torch.allclose(out, x * sigma_0 / last / math.sqrt(sigma_0**2 + 1))


@pytest.mark.parametrize("steps", [1, 2, 3, 7])
@pytest.mark.parametrize("name,config", [("uniform", {}), ("karras", {"use_karras_sigmas": True})])
def test_dpmpp_2s_equals_dpm_solver_singlestep_with_odd_and_few_steps(tiny_net, name, config, steps):
    """diffusers' DPMSolverSinglestepScheduler in its defaults (order 2, dpmsolver++, midpoint) on SD 1.5's
    config: pairs of steps, the last one first order (an odd count ends on a lone first-order step)."""
    schedule = NoiseSchedule.from_diffusers_config(SD15_CONFIG)
    scheduler = DPMSolverSinglestepScheduler.from_config(SD15_CONFIG, **config)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        ours = run_ours("dpm++2s", name, schedule, tiny_net, steps)
        ref = diffusers_loop(scheduler, tiny_net, start_noise() * scheduler.init_noise_sigma, steps)
    assert max_rel(ours, ref) <= 1e-4


K_DIFFUSION = {"euler": "sample_euler", "euler-a": "sample_euler_ancestral", "heun": "sample_heun",
               "lms": "sample_lms", "dpm2": "sample_dpm_2", "dpm2-a": "sample_dpm_2_ancestral",
               "dpm++2s-a": "sample_dpmpp_2s_ancestral", "dpm++sde": "sample_dpmpp_sde", "dpm++2m": "sample_dpmpp_2m",
               "dpm++2m-sde": "sample_dpmpp_2m_sde", "dpm++3m-sde": "sample_dpmpp_3m_sde"}


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("base", list(K_DIFFUSION))
def test_samplers_equal_k_diffusion_in_every_schedule(tiny_net, base, name):
    """A1111's samplers: ours and k-diffusion's on the same σ's (the choice's, discarding as A1111 does), both
    fed one Brownian path where they draw noise."""
    k = load_sampling()
    schedule, choice = NoiseSchedule.sd(), SamplerChoice(base, name)
    sigmas = choice.sigmas(schedule, 8)
    x = start_noise() * sigmas[0]
    denoiser = Denoiser(tiny_net, schedule)
    noisy = SAMPLER_SPECS[base].noise is not None
    s = sigmas.tolist()
    known = s + [math.sqrt(a * b) for a, b in zip(s[:-1], s[1:], strict=True)]

    def snap(sigma):
        """The σ we query the Brownian path at where k-diffusion recomputes it as exp(-(-log σ)) in float32."""
        return min(known, key=lambda c: abs(c - float(sigma)))

    with torch.no_grad():
        ours = choice.fn(denoiser, x, sigmas, noise=noisy and BrownianNoise(x, sigmas[0].item(),
                                                                         torch.Generator().manual_seed(3), base))
        brownian = BrownianNoise(x, sigmas[0].item(), torch.Generator().manual_seed(3), base)
        kwargs = {"noise_sampler": lambda a, b: brownian(snap(a), snap(b)), "disable": True} if noisy else \
            {"disable": True}
        ref = getattr(k, K_DIFFUSION[base])(denoiser, x, sigmas, **kwargs)
    assert max_rel(ours, ref) <= 1e-4
