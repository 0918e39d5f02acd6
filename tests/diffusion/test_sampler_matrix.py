"""The sampler × schedule parity matrix: every sampler in its schedules against diffusers' scheduler read from the
same config (its default configuration and use_karras_sigmas / use_exponential_sigmas / timestep_spacing), and
every sampler diffusers lacks (and the k-diffusion ones it has) against k-diffusion's ``sampling`` module on the
same σ's, ≤ 1e-4."""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
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
"""The model's σ range: our Karras / exponential σ's span it for every sampler, as A1111's do; diffusers' Euler
spans it with these set, its Heun, LMS and KDPM2 on "linspace" models (elsewhere, only their spaced timesteps)."""
# (sampler, schedule, diffusers scheduler, config, timestep spacings)
DIFFUSERS = [
    ("euler", "uniform", EulerDiscreteScheduler, {}, ("leading", "linspace")),
    ("euler", "karras", EulerDiscreteScheduler, {"use_karras_sigmas": True, **SD_RANGE}, ("leading", "trailing")),
    ("euler", "exponential", EulerDiscreteScheduler, {"use_exponential_sigmas": True, **SD_RANGE}, ("leading",)),
    ("heun", "exponential", HeunDiscreteScheduler, {"use_exponential_sigmas": True}, ("linspace",)),
    ("lms", "uniform", LMSDiscreteScheduler, {}, ("leading", "linspace", "trailing")),
    ("lms", "karras", LMSDiscreteScheduler, {"use_karras_sigmas": True}, ("linspace",)),
    ("dpm2", "uniform", KDPM2DiscreteScheduler, {}, ("leading", "linspace", "trailing")),
    ("dpm2", "karras", KDPM2DiscreteScheduler, {"use_karras_sigmas": True}, ("linspace",)),
    ("dpm2", "exponential", KDPM2DiscreteScheduler, {"use_exponential_sigmas": True}, ("linspace",)),
    ("dpm++2m", "uniform", DPMSolverMultistepScheduler, {}, ("leading", "linspace", "trailing")),
    ("dpm++2m", "karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, ("leading", "trailing")),
    ("dpm++2m", "exponential", DPMSolverMultistepScheduler, {"use_exponential_sigmas": True}, ("leading",)),
    ("dpm++2m", "trailing", DPMSolverMultistepScheduler, {"timestep_spacing": "trailing"}, ("leading",)),
    ("dpm++2s", "uniform", DPMSolverSinglestepScheduler, {}, ("leading", "trailing")),
    ("dpm++2s", "karras", DPMSolverSinglestepScheduler, {"use_karras_sigmas": True}, ("leading",)),
    ("dpm++2s", "exponential", DPMSolverSinglestepScheduler, {"use_exponential_sigmas": True}, ("leading",)),
    ("unipc", "uniform", UniPCMultistepScheduler, {}, ("leading", "linspace")),
    ("unipc", "karras", UniPCMultistepScheduler, {"use_karras_sigmas": True}, ("leading",)),
    ("unipc", "exponential", UniPCMultistepScheduler, {"use_exponential_sigmas": True}, ("leading",)),
]


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", [(*c[:4], s) for c in DIFFUSERS for s in c[4]],
                         ids=lambda c: f"{c[0]}-{c[1]}-{c[4]}")
def test_deterministic_samplers_equal_diffusers(tiny_net, case, prediction_type, steps):
    base, name, cls, config, spacing = case
    schedule = NoiseSchedule(**{**spaced(spacing).__dict__, "prediction_type": prediction_type})
    scheduler = cls.from_config(schedule.to_diffusers_config(), **config)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        ours = run_ours(base, name, schedule, tiny_net, steps)
        ref = diffusers_loop(scheduler, tiny_net, start_noise() * scheduler.init_noise_sigma, steps)
    assert max_rel(ours, ref) <= 1e-4


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("base,name,cls,config", [
    ("dpm2-a", "uniform", KDPM2AncestralDiscreteScheduler, {}),
    ("dpm2-a", "karras", KDPM2AncestralDiscreteScheduler, {"use_karras_sigmas": True,
                                                           "timestep_spacing": "linspace"}),
    ("euler-a", "uniform", EulerAncestralDiscreteScheduler, {"timestep_spacing": "linspace"}),
], ids=["dpm2-a", "dpm2-a-karras", "euler-a-linspace"])
def test_ancestral_samplers_equal_diffusers_with_the_same_generator(tiny_net, base, name, cls, config, steps):
    config = dict(config)
    schedule = spaced(config.pop("timestep_spacing", "leading"))
    scheduler = cls.from_config(schedule.to_diffusers_config(), **config)
    scheduler.set_timesteps(steps)
    step_generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ours = run_ours(base, name, schedule, tiny_net, steps,
                        lambda x, _: gaussian_noise(x, torch.Generator().manual_seed(5), base))
        ref = diffusers_loop(scheduler, tiny_net, start_noise() * scheduler.init_noise_sigma, steps,
                             step_kwargs=lambda k: {"generator": step_generator})
    assert max_rel(ours, ref) <= 1e-4


@pytest.mark.parametrize("name,config", [("karras", {"use_karras_sigmas": True}),
                                         ("exponential", {"use_exponential_sigmas": True})])
def test_dpmpp_2m_sde_in_its_schedules_equals_diffusers_fed_the_same_brownian_noise(tiny_net, name, config):
    schedule, steps = spaced("leading"), 20
    scheduler = DPMSolverMultistepScheduler.from_config(schedule.to_diffusers_config(),
                                                        algorithm_type="sde-dpmsolver++", **config)
    scheduler.set_timesteps(steps)
    sigmas = schedule_sigmas(schedule, steps, name, "multistep").sigmas
    brownian = BrownianNoise(start_noise(), sigmas[0].item(), torch.Generator().manual_seed(9), "dpm++2m-sde")
    s = sigmas.tolist()
    noises = [brownian(s[k], s[k + 1]) if s[k + 1] > 0 else torch.zeros(SHAPE) for k in range(steps)]
    with torch.no_grad():
        ours = run_ours("dpm++2m-sde", name, schedule, tiny_net, steps,
                        lambda x, sig: BrownianNoise(x, sig[0].item(), torch.Generator().manual_seed(9), "sde"))
        ref = diffusers_loop(scheduler, tiny_net, start_noise() * scheduler.init_noise_sigma, steps,
                             step_kwargs=lambda k: {"variance_noise": noises[k]})
    assert max_rel(ours, ref) <= 1e-4


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
