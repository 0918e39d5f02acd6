"""Schedules: diffusers' per-scheduler timesteps and σ's, k-diffusion's σ-range schedules, and the A1111 / ComfyUI
schedules against their published formulas and tables, recomputed here."""

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    KDPM2DiscreteScheduler,
    UniPCMultistepScheduler,
)
from helpers import rel_err as max_rel
from sampling_ref import load_external, load_sampling
from scipy import stats

from nijimi.diffusion.choice import SamplerChoice, parse_schedule
from nijimi.diffusion.schedules import NoiseSchedule, sampling_sigmas
from nijimi.diffusion.sigmas import AYS_SD15, FAMILIES, SCHEDULES, schedule_sigmas
from nijimi.errors import SamplerError

STEPS = (1, 2, 7, 10, 25, 30)


def spaced(spacing: str, beta: str = "scaled_linear") -> NoiseSchedule:
    return NoiseSchedule(beta_schedule=beta, timestep_spacing=spacing, steps_offset=int(spacing == "leading"))


def network_timesteps(schedule, plan):
    """The timesteps the Denoiser feeds the network for each σ of the plan."""
    table = plan.timestep_table() or {}
    t = schedule.sigma_to_t(plan.sigmas[:-1])
    return torch.tensor([table.get((i, v), u) for i, (v, u) in enumerate(zip(plan.sigmas[:-1].tolist(), t.tolist(),
                                                                             strict=True))])


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler, DPMSolverSinglestepScheduler])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name,config", [("uniform", {}), ("karras", {"use_karras_sigmas": True}),
                                         ("exponential", {"use_exponential_sigmas": True})])
@pytest.mark.parametrize("beta", ["scaled_linear", "cosine"])
def test_multistep_and_singlestep_schedules_equal_dpm_solver_and_unipc(cls, spacing, name, config, beta):
    """DPMSolverSinglestepScheduler picks its timesteps evenly from 0 to T-1 whatever the config's spacing."""
    schedule = spaced(spacing, beta)
    if cls is UniPCMultistepScheduler and beta == "cosine" and name == "karras":
        pytest.skip("UniPC rounds Karras timesteps for every β schedule, DPM-Solver not for cosine; we follow DPM")
    scheduler = cls.from_config(schedule.to_diffusers_config(), **config)
    for steps in STEPS:
        scheduler.set_timesteps(steps)
        plan = schedule_sigmas(schedule, steps, name, "singlestep" if cls is DPMSolverSinglestepScheduler else
                               "multistep")
        assert plan.sigmas.shape == (steps + 1,) and plan.sigmas[-1] == 0
        assert max_rel(plan.sigmas[:-1], scheduler.sigmas[:-1]) <= 1e-6, steps
        assert torch.equal(network_timesteps(schedule, plan).round(), scheduler.timesteps.float()), steps


@pytest.mark.parametrize("name,config,spacing", [("uniform", {}, "leading"), ("uniform", {}, "trailing"),
                                                 ("karras", {"use_karras_sigmas": True}, "linspace"),
                                                 ("exponential", {"use_exponential_sigmas": True}, "linspace")])
def test_kdpm2_schedules_equal_kdpm2_discrete(name, config, spacing):
    """KDPM2DiscreteScheduler spans Karras / exponential σ's over its spaced timesteps: the model's whole range, as
    ours (A1111's) do, on "linspace" models (but for 1 step, where its one timestep is 0)."""
    schedule = spaced(spacing)
    scheduler = KDPM2DiscreteScheduler.from_config(schedule.to_diffusers_config(), **config)
    for steps in STEPS if name == "uniform" else STEPS[1:]:
        scheduler.set_timesteps(steps)
        plan = schedule_sigmas(schedule, steps, name, "kdpm2")
        assert max_rel(plan.sigmas[:-1], scheduler.sigmas[0::2][:steps]) <= 1e-6
        main = scheduler.timesteps[0::2].double()
        assert (network_timesteps(schedule, plan).double() - main).abs().max() < 1e-3, steps


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,fn", [("karras", "get_sigmas_karras"), ("exponential", "get_sigmas_exponential"),
                                     ("polyexponential", "get_sigmas_polyexponential")])
def test_sigma_range_schedules_equal_k_diffusion_over_the_whole_training_range(name, fn, family):
    """A1111 passes the model's first and last training σ to k-diffusion's schedule functions (polyexponential with
    A1111's ρ = 1), for every sampler; so do we, whatever the model's timestep spacing (SD 1.5's "leading", SD 2.1-v's
    config, a "trailing" one)."""
    k = load_sampling()
    for schedule in (NoiseSchedule.sd(), NoiseSchedule.sd("v_prediction"), spaced("trailing", "cosine")):
        sigma_min, sigma_max = schedule.sigmas[0].item(), schedule.sigmas[-1].item()
        for steps in STEPS:
            ours = schedule_sigmas(schedule, steps, name, family).sigmas
            ref = getattr(k, fn)(steps, sigma_min, sigma_max, **({"rho": 1.0} if name == "polyexponential" else {}))
            assert max_rel(ours[:-1], ref[:-1]) <= 1e-6 and ours[-1] == ref[-1] == 0, steps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", ["karras", "exponential"])
def test_euler_karras_and_exponential_equal_euler_discrete_given_the_models_sigma_range(spacing, name):
    """diffusers' Euler with ``use_karras_sigmas`` spans its spaced timesteps' σ's (σ(951)…σ(1) on SD's "leading"
    config) unless ``sigma_min`` / ``sigma_max`` are set: set to the model's range it gives A1111's σ's, and ours, at
    the same continuous network timesteps."""
    schedule = spaced(spacing)
    train = schedule.sigmas
    scheduler = EulerDiscreteScheduler.from_config(schedule.to_diffusers_config(), **{f"use_{name}_sigmas": True},
                                                   sigma_min=train[0].item(), sigma_max=train[-1].item())
    for steps in STEPS[1:]:
        scheduler.set_timesteps(steps)
        plan = schedule_sigmas(schedule, steps, name, "euler")
        assert max_rel(plan.sigmas[:-1], scheduler.sigmas[:-1]) <= 1e-6, steps
        assert plan.timestep_table() is None
        assert (schedule.sigma_to_t(plan.sigmas[:-1]) - scheduler.timesteps).abs().max() < 1e-3, steps


def log_interp_sigma(schedule, t):
    """σ at continuous timesteps t, linear in log σ between the neighbouring training σ's (ComfyUI's
    ``ModelSamplingDiscrete.sigma``, k-diffusion's ``t_to_sigma``)."""
    log_sigmas = np.log(schedule.sigmas.numpy().astype(np.float64))
    return np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas))


def comfy_reference(name, schedule, steps):
    """The schedules of ComfyUI's ``comfy/samplers.py`` and A1111's ``modules/sd_schedulers.py``, from their
    published formulas, on the model's training σ's (T = 1000)."""
    train = schedule.sigmas.double().numpy()
    T = len(train)
    if name == "normal":
        sigmas = log_interp_sigma(schedule, np.linspace(T - 1, 0, steps))
    elif name == "sgm_uniform":
        sigmas = log_interp_sigma(schedule, np.linspace(T - 1, 0, steps + 1)[:-1])
    elif name == "simple":
        sigmas = [train[-(1 + int(x * T / steps))] for x in range(steps)]
    elif name == "ddim_uniform":
        sigmas = [train[i] for i in range(1, T, max(T // steps, 1))][::-1]
    elif name == "beta":
        ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * (T - 1)).astype(int)
        sigmas = [train[t] for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
    elif name == "kl_optimal":
        a_min, a_max = math.atan(train[0]), math.atan(train[-1])
        sigmas = [math.tan(k / (steps - 1) * a_min + (1 - k / (steps - 1)) * a_max) for k in range(steps)]
    else:  # align_your_steps: NVIDIA's table, log-linearly interpolated to `steps` points unless steps = 11
        table = list(AYS_SD15)
        sigmas = table if steps == 11 else np.exp(np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, 11),
                                                            np.log(table[::-1])))[::-1]
    return np.append(np.asarray(sigmas, dtype=np.float64), 0.0)


@pytest.mark.parametrize("name", ["normal", "sgm_uniform", "simple", "ddim_uniform", "beta", "kl_optimal",
                                  "align_your_steps"])
def test_comfyui_and_a1111_schedules_follow_their_formulas(name):
    schedule = NoiseSchedule.sd()
    for steps in (2, 7, 10, 11, 20, 30):
        ours = schedule_sigmas(schedule, steps, name, "euler").sigmas
        ref = comfy_reference(name, schedule, steps)
        assert ours.shape == ref.shape and ours[-1] == 0, (steps, ours.shape, ref.shape)
        assert max_rel(ours[:-1], torch.from_numpy(ref[:-1])) <= 1e-6, steps
        assert (ours[:-1].diff() < 0).all()


def test_align_your_steps_is_the_published_table_and_ddim_uniform_may_add_a_step():
    """NVIDIA publishes SD 1.5's AYS schedule as σ's (2404.14507, Table 3; A1111's table) and as timesteps (project
    how-to page): each σ lies within 0.6 of its timestep. No SD 2.x table exists, so SD 2.1-v (same σ's) gets the
    same one. Other step counts:
    ``steps`` points log-linearly interpolated on an even grid over the table, then 0 (A1111's rule); 11 steps: the
    table itself."""
    schedule = NoiseSchedule.sd()
    published = torch.tensor([999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0], dtype=torch.float64)
    assert (schedule.sigma_to_t(torch.tensor(AYS_SD15)).double() - published).abs().max() <= 0.6
    assert schedule_sigmas(schedule, 11, "align_your_steps", "euler").sigmas[:-1].tolist() == \
        pytest.approx([14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029], rel=1e-6)
    for steps in (4, 10, 20):
        ours = schedule_sigmas(NoiseSchedule.sd("v_prediction"), steps, "align_your_steps", "euler").sigmas
        assert torch.equal(ours, schedule_sigmas(schedule, steps, "align_your_steps", "euler").sigmas)
        grid = np.linspace(0, 10, steps)  # position on the table's 11 points, from its top
        low = np.minimum(np.floor(grid).astype(int), 9)
        log_table = np.log(np.array(AYS_SD15))
        expected = np.exp(log_table[low] + (grid - low) * (log_table[low + 1] - log_table[low]))
        assert max_rel(ours[:-1], torch.from_numpy(expected)) <= 1e-6 and ours[-1] == 0 and len(ours) == steps + 1
    ten = schedule_sigmas(schedule, 10, "align_your_steps", "euler").sigmas
    assert ten[0].item() == pytest.approx(14.615) and ten[-2].item() == pytest.approx(0.029) and len(ten) == 11
    assert len(schedule_sigmas(schedule, 30, "ddim_uniform", "euler").sigmas) == 32  # 1, 34, …, 991: 31 σ's
    assert schedule_sigmas(schedule, 30, "ddim_uniform", "euler").sigmas[0] == schedule.sigmas[991]


def test_uniform_is_the_models_own_spacing_and_a1111s_uniform_is_k_diffusions_get_sigmas():
    """nijimi's ``uniform`` is the model's own timesteps (951 … 1 for SD at 20 steps); A1111's "Uniform" (and
    Automatic for Euler, Euler a, Heun, LMS) is k-diffusion's ``DiscreteSchedule.get_sigmas``, our ``normal``."""
    external = load_external()
    for schedule in (NoiseSchedule.sd(), NoiseSchedule.sd("v_prediction"), spaced("trailing", "cosine")):
        reference = external.DiscreteSchedule(schedule.sigmas, quantize=False)
        for steps in STEPS + (20,):
            ours = schedule_sigmas(schedule, steps, parse_schedule("Uniform"), "euler").sigmas
            assert max_rel(ours[:-1], reference.get_sigmas(steps)[:-1]) <= 1e-6 and ours[-1] == 0, steps
        for family in ("euler", "kdiffusion"):
            assert torch.equal(schedule_sigmas(schedule, 20, "uniform", family).sigmas, sampling_sigmas(schedule, 20))
    assert schedule_sigmas(NoiseSchedule.sd(), 20, "uniform").sigmas[0] == NoiseSchedule.sd().sigmas[951]


def test_discard_next_to_last_sigma_for_dpm2_and_3m_sde():
    schedule = NoiseSchedule.sd()
    for base, name in (("dpm2", "karras"), ("dpm2-a", "karras"), ("dpm++3m-sde", "exponential")):
        choice = SamplerChoice(base, name)
        longer = schedule_sigmas(schedule, 11, name, choice.spec.family).sigmas
        assert torch.equal(choice.sigmas(schedule, 10), torch.cat([longer[:-2], longer[-1:]]))
        assert len(choice.sigmas(schedule, 10)) == 11
    assert SamplerChoice("dpm++2m", "karras").sigmas(schedule, 10).tolist() == \
        schedule_sigmas(schedule, 10, "karras", "multistep").sigmas.tolist()


def test_every_schedule_gives_decreasing_sigmas_ending_at_zero():
    for schedule in (NoiseSchedule.sd(), spaced("trailing", "cosine"), spaced("linspace")):
        for name in SCHEDULES:
            for family in FAMILIES:
                sigmas = schedule_sigmas(schedule, 9, name, family).sigmas
                assert (sigmas.diff() < 0).all() and sigmas[-1] == 0, (name, family)


def test_unknown_schedule_and_family_raise():
    with pytest.raises(SamplerError, match="schedule 'quadratic' is not one of uniform, karras"):
        schedule_sigmas(NoiseSchedule.sd(), 10, "quadratic")
    with pytest.raises(SamplerError, match="sampler family 'rk4'"):
        schedule_sigmas(NoiseSchedule.sd(), 10, "karras", "rk4")
    with pytest.raises(SamplerError, match="steps=0"):
        schedule_sigmas(NoiseSchedule.sd(), 0, "beta")
