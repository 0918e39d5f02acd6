"""Samplers: parity with diffusers' scheduler loops, correctness on an analytic Gaussian mixture, and the API."""

import math
import re

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from helpers import rel_err as max_rel
from sampling_ref import diffusers_loop

from nijimi.diffusion.choice import (
    SAMPLER_SPECS,
    SAMPLERS,
    SCHEDULE_LABELS,
    SamplerChoice,
    default_sampler,
    parse_sampler,
)
from nijimi.diffusion.guidance import Denoiser
from nijimi.diffusion.noise import BrownianNoise, gaussian_noise
from nijimi.diffusion.samplers import (
    StepInfo,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_euler_ancestral,
)
from nijimi.diffusion.schedules import NoiseSchedule, sampling_sigmas
from nijimi.diffusion.sigmas import schedule_sigmas
from nijimi.errors import NijimiError, SamplerError
from nijimi.pipelines.edit import img2img_start, masked_blend, noised_latent, with_blend

SHAPE = (2, 4, 8, 8)
OFFSETS = {"leading": 1, "linspace": 0, "trailing": 0}


def schedule_for(prediction_type: str, timestep_spacing: str) -> NoiseSchedule:
    return NoiseSchedule(prediction_type=prediction_type, timestep_spacing=timestep_spacing,
                         steps_offset=OFFSETS[timestep_spacing])


def start_noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_diffusers(scheduler, net, steps, **kwargs):
    scheduler.set_timesteps(steps)
    return diffusers_loop(scheduler, net, start_noise() * scheduler.init_noise_sigma, steps, **kwargs)


def run_ours(name, schedule, net, steps, *, generator=None, **kwargs):
    choice = parse_sampler(name)
    sigmas = choice.sigmas(schedule, steps)
    x = start_noise() * choice.start_scale(float(sigmas[0]), schedule)
    noise = None if generator is None else choice.noise(x, float(sigmas[0]), generator)
    options = choice.options(schedule, None, steps) | kwargs
    denoiser = Denoiser(net, schedule, timesteps=choice.timestep_table(schedule, steps))
    return choice.fn(denoiser, x, sigmas, noise=noise, **options)


SD_RANGE = {"sigma_min": NoiseSchedule.sd().sigmas[0].item(), "sigma_max": NoiseSchedule.sd().sigmas[-1].item()}
"""Euler's Karras / exponential σ's span the model's whole σ range (as A1111's) with these set, or on "linspace"."""
# (our sampler and schedule, diffusers scheduler, its extra config, timestep spacing, unused, sampler kwargs)
DETERMINISTIC = [
    ("ddim", DDIMScheduler, {"clip_sample": False}, "leading", False, {}),
    ("euler", EulerDiscreteScheduler, {}, "leading", False, {}),
    ("euler", EulerDiscreteScheduler, {}, "linspace", False, {}),
    ("euler", EulerDiscreteScheduler, {}, "trailing", False, {}),
    ("euler-trailing", EulerDiscreteScheduler, {"timestep_spacing": "trailing"}, "leading", False, {}),
    ("euler-karras", EulerDiscreteScheduler, {"use_karras_sigmas": True, **SD_RANGE}, "leading", False, {}),
    ("euler-karras", EulerDiscreteScheduler, {"use_karras_sigmas": True, **SD_RANGE}, "trailing", False, {}),
    ("euler-exponential", EulerDiscreteScheduler, {"use_exponential_sigmas": True}, "linspace", False, {}),
    ("heun", HeunDiscreteScheduler, {}, "leading", False, {}),
    ("heun-karras", HeunDiscreteScheduler, {"use_karras_sigmas": True}, "linspace", False, {}),
    ("dpm++2m-uniform", DPMSolverMultistepScheduler, {}, "trailing", False, {}),
    ("dpm++2m-karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, "linspace", True, {}),
    ("unipc", UniPCMultistepScheduler, {}, "trailing", False, {}),
    ("unipc-karras", UniPCMultistepScheduler, {"use_karras_sigmas": True}, "linspace", True, {}),
    ("unipc", UniPCMultistepScheduler, {"solver_order": 3}, "trailing", False, {"order": 3}),
]


@pytest.mark.parametrize("steps", [10, 30])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", DETERMINISTIC, ids=lambda c: f"{c[0]}-{c[3]}-{c[1].__name__}{c[5] or ''}")
def test_deterministic_samplers_equal_diffusers(tiny_net, case, prediction_type, steps):
    name, scheduler_cls, extra, spacing, _, kwargs = case
    schedule = schedule_for(prediction_type, spacing)
    scheduler = scheduler_cls.from_config(schedule.to_diffusers_config(), **extra)
    with torch.no_grad():
        ours = run_ours(name, schedule, tiny_net, steps, **kwargs)
        ref = run_diffusers(scheduler, tiny_net, steps)
    assert max_rel(ours, ref) <= 1e-4


def same_generator_error(net, name, schedule, scheduler, steps, kwargs) -> float:
    """Max relative error of our sampler against diffusers' scheduler, both drawing from generators seeded 5."""
    step_generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ours = run_ours(name, schedule, net, steps, generator=torch.Generator().manual_seed(5), **kwargs)
        ref = run_diffusers(scheduler, net, steps, step_kwargs=lambda k: {"generator": step_generator, **kwargs})
    return max_rel(ours, ref)


@pytest.mark.parametrize("steps", [10, 30])
@pytest.mark.parametrize("name,scheduler_cls,extra,kwargs", [
    ("euler-a", EulerAncestralDiscreteScheduler, {}, {}),
    ("ddpm", DDPMScheduler, {"clip_sample": False}, {}),
    ("ddim", DDIMScheduler, {"clip_sample": False}, {"eta": 0.5}),
], ids=["euler-a", "ddpm", "ddim-eta0.5"])
def test_ancestral_samplers_equal_diffusers_with_the_same_generator(tiny_net, name, scheduler_cls, extra, kwargs,
                                                                     steps):
    schedule = schedule_for("epsilon", "leading")
    scheduler = scheduler_cls.from_config(schedule.to_diffusers_config(), **extra)
    assert same_generator_error(tiny_net, name, schedule, scheduler, steps, kwargs) <= 1e-4


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name,scheduler_cls,extra,kwargs", [
    ("lcm", LCMScheduler, {}, {}),
    ("tcd", TCDScheduler, {}, {}),
    ("tcd", TCDScheduler, {}, {"eta": 0.0}),
    ("tcd", TCDScheduler, {}, {"eta": 0.7}),
    ("ddim-trailing", DDIMScheduler, {"timestep_spacing": "trailing"}, {}),
], ids=["lcm", "tcd", "tcd-eta0", "tcd-eta0.7", "ddim-trailing"])
def test_few_step_samplers_equal_diffusers_with_the_same_generator(tiny_net, name, scheduler_cls, extra, kwargs,
                                                                   prediction_type, steps):
    """LCM-LoRA / TCD-LoRA / Hyper-SD sampling on an SD1.5 ("leading") schedule, as their authors run it."""
    schedule = schedule_for(prediction_type, "leading")
    scheduler = scheduler_cls.from_config(schedule.to_diffusers_config(), **extra)
    assert same_generator_error(tiny_net, name, schedule, scheduler, steps, kwargs) <= 1e-4


@pytest.mark.parametrize("steps", [10, 30])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_sde_equals_diffusers_fed_the_same_brownian_noise(tiny_net, prediction_type, steps):
    schedule = schedule_for(prediction_type, "trailing")
    scheduler = DPMSolverMultistepScheduler.from_config(schedule.to_diffusers_config(),
                                                        algorithm_type="sde-dpmsolver++")
    sigmas = sampling_sigmas(schedule, steps)
    brownian = BrownianNoise(start_noise(), sigmas[0].item(), torch.Generator().manual_seed(9), "dpm++2m-sde")
    s = sigmas.tolist()
    noises = [brownian(s[k], s[k + 1]) if s[k + 1] > 0 else torch.zeros(SHAPE) for k in range(steps)]
    with torch.no_grad():
        ours = run_ours("dpm++2m-sde-uniform", schedule, tiny_net, steps, generator=torch.Generator().manual_seed(9))
        ref = run_diffusers(scheduler, tiny_net, steps, step_kwargs=lambda k: {"variance_noise": noises[k]})
    assert max_rel(ours, ref) <= 1e-4


@pytest.mark.parametrize("name,scheduler_cls,spacing", [("euler", EulerDiscreteScheduler, "leading"),
                                                        ("dpm++2m", DPMSolverMultistepScheduler, "trailing")])
@pytest.mark.parametrize("steps,strength", [(10, 0.6), (30, 0.35)])
def test_img2img_and_inpainting_equal_diffusers(tiny_net, name, scheduler_cls, spacing, steps, strength):
    schedule = schedule_for("epsilon", spacing)
    scheduler = scheduler_cls.from_config(schedule.to_diffusers_config())
    g = torch.Generator().manual_seed(3)
    image, noise = torch.randn(SHAPE, generator=g) * 0.8, torch.randn(SHAPE, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 3:7] = 1
    scheduler.set_timesteps(steps)
    start = img2img_start(steps, strength)
    t0 = scheduler.timesteps[start:start + 1]

    def diffusers_blend(latents, t_next):
        known = image if t_next is None else scheduler.add_noise(image, noise, t_next.reshape(1))
        return (1 - mask) * known + mask * latents

    sigmas = sampling_sigmas(schedule, steps)
    denoiser = Denoiser(tiny_net, schedule)
    with torch.no_grad():
        for blend, ours_blend in ((None, None), (diffusers_blend, masked_blend(image, noise, mask))):
            scheduler.set_timesteps(steps)
            ref = diffusers_loop(scheduler, tiny_net, scheduler.add_noise(image, noise, t0), steps, start=start,
                                 blend=blend)
            x = noised_latent(image, noise, sigmas, start)
            ours = SAMPLERS[name](denoiser, x, sigmas[start:], callback=with_blend(ours_blend, None))
            assert max_rel(ours, ref) <= 1e-4
    assert torch.equal(ours * (1 - mask), image * (1 - mask))


def test_img2img_start_matches_diffusers_formula():
    for steps in (1, 7, 10, 30, 50):
        for strength in (0.0, 0.1, 0.29, 0.3, 0.5, 0.75, 0.999, 1.0):
            init = min(int(steps * strength), steps)
            assert img2img_start(steps, strength) == max(steps - init, 0)
    assert img2img_start(10, 1.0) == 0 and img2img_start(10, 0.0) == 10


def test_initial_latent_follows_diffusers_init_noise_sigma():
    noise = start_noise()
    for name, spacing, cls in [("euler", "leading", EulerDiscreteScheduler), ("euler", "linspace",
                               EulerDiscreteScheduler), ("heun-karras", "trailing", HeunDiscreteScheduler),
                               ("euler-a", "trailing", EulerAncestralDiscreteScheduler),
                               ("dpm++2m-uniform", "linspace", DPMSolverMultistepScheduler),
                               ("unipc-karras", "linspace", UniPCMultistepScheduler)]:
        schedule = schedule_for("epsilon", spacing)
        scheduler = cls.from_config(schedule.to_diffusers_config(), use_karras_sigmas="karras" in name)
        scheduler.set_timesteps(20)
        choice = parse_sampler(name)
        sigmas = choice.sigmas(schedule, 20)
        expected = noise * scheduler.init_noise_sigma
        if scheduler.init_noise_sigma == 1.0:  # a variance-preserving scheduler: x_T = noise ⇔ x = noise·sqrt(σ²+1)
            expected = noise * (sigmas[0] ** 2 + 1) ** 0.5
        assert torch.allclose(noise * choice.start_scale(float(sigmas[0]), schedule), expected, rtol=1e-6), name


# ---- correctness on a 2-D Gaussian mixture whose exact denoiser is known ----

def mixture_start(mixture, sigmas, n=4000):
    g = torch.Generator().manual_seed(0)
    x0 = mixture.sample(n, g)
    return (x0 + sigmas[0].double() * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()


def assert_samples_the_mixture(mixture, out):
    assert (out.mean(0) - mixture.mean()).abs().max() < 0.06
    assert (torch.cov(out.T) - mixture.covariance()).abs().max() < 0.2
    assert (mixture.mode_weights(out) - mixture.weights).abs().max() < 0.03


@pytest.mark.parametrize("name", [name for name in SAMPLERS if name not in ("lcm", "tcd")])
def test_samples_have_the_mixture_mean_covariance_and_mode_weights(mixture, name):
    steps = 50 if SAMPLER_SPECS[name].noise else 30
    sigmas = schedule_sigmas(NoiseSchedule.sd(), steps, "karras").sigmas
    x = mixture_start(mixture, sigmas)
    noise = SamplerChoice(name).noise(x, float(sigmas[0]), torch.Generator().manual_seed(1))
    assert_samples_the_mixture(mixture, SAMPLERS[name](mixture.denoise, x, sigmas, noise=noise).double())


@pytest.mark.parametrize("name,eta", [("lcm", None), ("tcd", 1.0)])
def test_consistency_samplers_sample_the_mixture_with_its_exact_consistency_function(mixture, name, eta):
    """lcm and tcd sample a consistency model f(x, σ), the end point of the ODE through x (with a diffusion model's
    E[x₀|x] instead they lose modes); given the exact f (the ODE solved by dpm++2m) 4 steps sample the mixture."""
    def consistency(x, sigma, **_):
        ode = torch.cat([torch.exp(torch.linspace(math.log(sigma[0]), math.log(1e-3), 100)), torch.zeros(1)])
        return SAMPLERS["dpm++2m"](mixture.denoise, x, ode)

    schedule, choice = NoiseSchedule.sd(), parse_sampler(name)
    sigmas = choice.sigmas(schedule, 4)
    x = mixture_start(mixture, sigmas)
    noise = choice.noise(x, float(sigmas[0]), torch.Generator().manual_seed(1))
    assert_samples_the_mixture(mixture, choice.fn(consistency, x, sigmas, noise=noise,
                                                  **choice.options(schedule, eta, 4)).double())


def test_higher_order_samplers_are_closer_to_the_ode_solution_than_euler(mixture):
    sigmas = schedule_sigmas(NoiseSchedule.sd(), 10, "karras").sigmas
    x = mixture_start(mixture, sigmas, n=500)

    def log_spaced(steps):
        return torch.cat([torch.exp(torch.linspace(math.log(sigmas[0]), math.log(sigmas[-2]), steps)),
                          torch.zeros(1)])

    reference = SAMPLERS["dpm++2m"](mixture.denoise, x, log_spaced(1000))
    assert (SAMPLERS["dpm++2m"](mixture.denoise, x, log_spaced(500)) - reference).abs().mean() < 1e-4
    error = {name: (SAMPLERS[name](mixture.denoise, x, sigmas) - reference).abs().mean().item()
             for name in ("euler", "heun", "dpm++2m", "unipc")}
    for name in ("heun", "dpm++2m", "unipc"):
        assert error[name] < 0.5 * error["euler"], error


def test_ddim_is_euler_ddpm_is_euler_ancestral_and_noiseless_sde_is_dpmpp_2m(tiny_net):
    schedule = NoiseSchedule.sd()
    sigmas = sampling_sigmas(schedule, 12)
    denoiser, x = Denoiser(tiny_net, schedule), start_noise() * 10
    with torch.no_grad():
        assert max_rel(sample_ddim(denoiser, x, sigmas), sample_euler(denoiser, x, sigmas)) < 1e-5
        a = sample_ddpm(denoiser, x, sigmas, noise=gaussian_noise(x, torch.Generator().manual_seed(2), "ddpm"))
        b = sample_euler_ancestral(denoiser, x, sigmas,
                                   noise=gaussian_noise(x, torch.Generator().manual_seed(2), "euler-a"))
        assert max_rel(a, b) < 1e-5
        sde = SAMPLERS["dpm++2m-sde"](denoiser, x, sigmas, eta=0.0)
        assert max_rel(sde, SAMPLERS["dpm++2m"](denoiser, x, sigmas)) < 1e-5


@pytest.mark.parametrize("name", ["ddpm", "euler-a", "dpm++2m-sde", "lcm", "tcd", "dpm2-a", "dpm++2s-a", "dpm++sde",
                                  "dpm++3m-sde"])
def test_stochastic_samplers_repeat_with_the_seed_and_ignore_batch_position(tiny_net, name):
    schedule = NoiseSchedule.sd()
    sigmas = sampling_sigmas(schedule, 8)
    denoiser = Denoiser(tiny_net, schedule)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    choice = SamplerChoice(name)

    def run(x, generator):
        return choice.fn(denoiser, x, sigmas, noise=choice.noise(x, float(sigmas[0]), generator),
                         **choice.options(schedule, None, 8))

    with torch.no_grad():
        a = run(x, torch.Generator().manual_seed(4))
        b = run(x, torch.Generator().manual_seed(4))
        c = run(x, torch.Generator().manual_seed(5))
        batch = run(x, [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
        alone = run(x[2:], [torch.Generator().manual_seed(9)])
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    # (the conv net itself may round differently per batch size; the third-order solver amplifies that)
    assert max_rel(batch[2:], alone) < (1e-5 if name == "dpm++3m-sde" else 1e-6)


def test_callback_sees_every_step(tiny_net):
    schedule = NoiseSchedule.sd()
    sigmas = sampling_sigmas(schedule, 10)
    seen: list[StepInfo] = []
    with torch.no_grad():
        out = SAMPLERS["heun"](Denoiser(tiny_net, schedule), start_noise(), sigmas[4:], callback=seen.append)
    assert [info.i for info in seen] == list(range(6))
    assert all(info.steps == 6 and info.denoised.shape == SHAPE for info in seen)
    assert [info.sigma for info in seen] == sigmas[4:10].tolist()
    assert seen[-1].sigma_next == 0 and seen[-1].x is out


# ---- names and argument checking ----

@pytest.mark.parametrize("name,expected", [
    ("euler", ("euler", "uniform")), ("Euler a", ("euler-a", "uniform")), ("euler_ancestral", ("euler-a", "uniform")),
    ("DPM++ 2M Karras", ("dpm++2m", "karras")), ("dpmpp_2m_sde", ("dpm++2m-sde", "exponential")),
    ("DPM++ 2M SDE Exponential", ("dpm++2m-sde", "exponential")), ("unipc-karras", ("unipc", "karras")),
    ("DDIM", ("ddim", "uniform")), ("  Heun  ", ("heun", "uniform")), ("ddpm-exponential", ("ddpm", "exponential")),
    ("LCM", ("lcm", "lcm")), ("tcd", ("tcd", "lcm")), ("ddim_trailing", ("ddim", "trailing")),
])
def test_parse_sampler_accepts_our_and_a1111_names(name, expected):
    choice = parse_sampler(name)
    assert (choice.fn, choice.schedule) == (SAMPLERS[expected[0]], expected[1])


def test_every_name_round_trips_through_display_names():
    assert list(SAMPLERS) == ["ddpm", "ddim", "euler", "euler-a", "heun", "lms", "dpm2", "dpm2-a", "dpm++2s-a",
                              "dpm++2s", "dpm++sde", "dpm++2m", "dpm++2m-sde", "dpm++3m-sde", "unipc", "lcm", "tcd"]
    for base in SAMPLERS:
        for schedule in SCHEDULE_LABELS:
            choice = parse_sampler(base, schedule)
            assert parse_sampler(choice.display, choice.schedule_label) == choice
            assert parse_sampler(f"{choice.display} {choice.schedule_label}") == choice
    assert parse_sampler("dpm++2m-karras").display == "DPM++ 2M"
    assert parse_sampler("euler-a").display == "Euler a"
    assert all(fn.__doc__.strip() for fn in SAMPLERS.values())


@pytest.mark.parametrize("name", ["euler b", "dpm++3m", "karras", "", "dpm++4m"])
def test_unknown_sampler_names_raise(name):
    with pytest.raises(SamplerError, match=re.escape(repr(name))):
        parse_sampler(name)


@pytest.mark.parametrize("sigmas,message", [
    ([10.0, 5.0, 5.0, 0.0], r"sigmas\[1\]=5.0 then sigmas\[2\]=5.0"),
    ([1.0, 2.0, 0.0], r"sigmas\[0\]=1.0 then sigmas\[1\]=2.0"),
    ([2.0, 1.0, -0.5], "-0.5"),
    ([3.0], r"\(1,\)"),
])
def test_bad_sigmas_raise(sigmas, message):
    for fn in SAMPLERS.values():
        with pytest.raises(SamplerError, match=message):
            fn(lambda x, s, **_: x, torch.zeros(1, 2), torch.tensor(sigmas), noise=lambda a, b: torch.zeros(1, 2))


def test_every_model_call_gets_its_step_index():
    """Each call names the σ it runs at by index (Heun's second call, at σ_{i+1}, is i + 1); so the pipeline never
    infers the step from σ."""
    calls = []
    sample_euler(lambda x, s, step: calls.append(step) or x, torch.zeros(1, 2), torch.tensor([3.0, 2.0, 1.0, 0.0]))
    SAMPLERS["heun"](lambda x, s, step: calls.append(step) or x, torch.zeros(1, 2), torch.tensor([3.0, 2.0, 0.0]))
    assert calls == [0, 1, 2, 0, 1, 1]


def test_bad_strength_steps_and_options_raise():
    with pytest.raises(SamplerError, match="strength=1.5"):
        img2img_start(10, 1.5)
    with pytest.raises(SamplerError, match="strength=-0.1"):
        img2img_start(10, -0.1)
    with pytest.raises(SamplerError, match="steps=0"):
        img2img_start(0, 0.5)
    with pytest.raises(SamplerError, match="steps=0"):
        sampling_sigmas(NoiseSchedule.sd(), 0)
    sigmas = torch.tensor([2.0, 1.0, 0.0])
    with pytest.raises(SamplerError, match="order=4"):
        SAMPLERS["unipc"](lambda x, s, **_: x, torch.zeros(1, 2), sigmas, order=4)
    with pytest.raises(SamplerError, match="eta=2"):
        sample_ddim(lambda x, s, **_: x, torch.zeros(1, 2), sigmas, eta=2)
    with pytest.raises(NijimiError, match="'euler-a' draws noise"):
        SAMPLERS["euler-a"](lambda x, s, **_: x, torch.zeros(1, 2), sigmas)
    with pytest.raises(SamplerError, match="'lcm' works on the training timesteps: pass schedule="):
        SAMPLERS["lcm"](lambda x, s, **_: x, torch.zeros(1, 2), sigmas, noise=lambda a, b: torch.zeros(1, 2))
    with pytest.raises(SamplerError, match="tcd: eta=1.5"):
        SAMPLERS["tcd"](lambda x, s, **_: x, torch.zeros(1, 2), sigmas, eta=1.5, schedule=NoiseSchedule.sd())
    assert parse_sampler("tcd").options(NoiseSchedule.sd(), 0.5, 4) == {"eta": 0.5, "schedule": NoiseSchedule.sd()}
    assert parse_sampler("euler").options(NoiseSchedule.sd(), None, 4) == {}


def test_default_sampler_keeps_karras_off_a_zero_terminal_snr_schedule():
    assert default_sampler(NoiseSchedule.sd()) == SamplerChoice("dpm++2m", "karras")
    zero = NoiseSchedule(prediction_type="v_prediction", rescale_zero_terminal_snr=True, timestep_spacing="trailing")
    choice = default_sampler(zero)
    assert choice == SamplerChoice("dpm++2m", "uniform")
    karras = schedule_sigmas(zero, 20, "karras").sigmas
    chosen = choice.sigmas(zero, 20)
    assert (karras[:-1] > 14).sum() == 13  # σ_max ≈ 4096: most Karras steps are spent where nothing is formed yet
    assert (chosen[:-1] > 14).sum() == 3 and chosen[1] < 50
