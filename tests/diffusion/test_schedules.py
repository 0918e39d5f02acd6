import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

from nijimi.diffusion.schedules import NoiseSchedule, sampling_sigmas, sigma_to_t
from nijimi.diffusion.sigmas import schedule_sigmas
from nijimi.errors import ConfigError, NijimiError, SamplerError

SCHEDULES = {
    "linear": (NoiseSchedule(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
               dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)),
    "scaled_linear": (NoiseSchedule.sd(), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    "cosine": (NoiseSchedule(beta_schedule="cosine"), dict(beta_schedule="squaredcos_cap_v2")),
}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs() / b.abs().clamp(min=1e-12)).max().item()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_betas_and_alphas_cumprod_equal_diffusers(name):
    ours, config = SCHEDULES[name]
    ref = DDPMScheduler(num_train_timesteps=1000, **config)
    assert max_rel(ours.betas, ref.betas) <= 1e-6
    assert max_rel(ours.alphas_cumprod, ref.alphas_cumprod) <= 1e-6


def test_cosine_betas_are_clipped_at_0_999():
    betas = NoiseSchedule(beta_schedule="cosine").betas
    assert betas.max().item() == pytest.approx(0.999)
    assert (betas[:-1] < 0.999).all()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_sigmas_and_log_snr(name):
    ours, config = SCHEDULES[name]
    ref = EulerDiscreteScheduler(num_train_timesteps=1000, **config)
    assert max_rel(ours.sigmas, ref.sigmas[:-1].flip(0)) <= 1e-6
    alpha_bar = ours.alphas_cumprod.double()
    assert max_rel(ours.log_snr, torch.log(alpha_bar / (1 - alpha_bar))) <= 1e-6
    assert torch.allclose(ours.log_snr.double(), -2 * ours.sigmas.double().log(), atol=1e-5)
    assert (ours.log_snr.diff() < 0).all()


def test_zero_terminal_snr_matches_diffusers_and_keeps_first_step():
    ours = NoiseSchedule(rescale_zero_terminal_snr=True)
    ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 rescale_betas_zero_snr=True)
    assert max_rel(ours.betas, ref.betas) <= 1e-6
    assert max_rel(ours.alphas_cumprod, ref.alphas_cumprod) <= 1e-6
    assert ours.betas[-1].item() == pytest.approx(1.0)
    assert ours.alphas_cumprod[-1].item() == 2.0**-24
    assert ours.sigmas[-1].item() == pytest.approx(4096.0, rel=1e-4)
    assert ours.alphas_cumprod[0].item() == pytest.approx(NoiseSchedule.sd().alphas_cumprod[0].item(), rel=1e-6)


@pytest.mark.parametrize("timestep_spacing,steps_offset", [("leading", 1), ("linspace", 0), ("trailing", 0)])
@pytest.mark.parametrize("beta", ["scaled_linear", "cosine"])
def test_sampling_sigmas_and_timesteps_equal_euler_discrete(timestep_spacing, steps_offset, beta):
    base = SCHEDULES[beta][0]
    schedule = NoiseSchedule(**{**base.__dict__, "timestep_spacing": timestep_spacing, "steps_offset": steps_offset})
    for steps in (1, 2, 7, 10, 25, 30, 48, 100):  # (trailing 61: see the next test)
        ref = EulerDiscreteScheduler.from_config(schedule.to_diffusers_config())
        ref.set_timesteps(steps)
        sigmas = sampling_sigmas(schedule, steps)
        assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0
        assert max_rel(sigmas[:-1], ref.sigmas[:-1]) <= 1e-6, steps
        error = (schedule.timesteps(steps).double() - ref.timesteps.double()).abs()
        assert (error / ref.timesteps.double().abs().clamp(min=1)).max() <= 1e-6, steps


def test_trailing_spacing_has_exactly_steps_entries_where_numpy_adds_one():
    schedule = NoiseSchedule(timestep_spacing="trailing", steps_offset=0)
    timesteps = schedule.timesteps(61)
    assert len(timesteps) == 61
    assert timesteps.tolist() == (np.arange(1000, 0, -1000 / 61).round() - 1)[:61].tolist()
    assert timesteps[-1] >= 0


def test_sd_leading_timesteps_are_the_known_values():
    assert NoiseSchedule.sd().timesteps(10).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert NoiseSchedule.sd().timesteps(4).tolist() == [751, 501, 251, 1]


def test_lcm_spacing_is_lcm_and_tcd_schedulers_skipping_schedule():
    schedule = NoiseSchedule.sd()
    for cls in (LCMScheduler, TCDScheduler):
        scheduler = cls.from_config(schedule.to_diffusers_config())
        for steps in range(1, 51):
            scheduler.set_timesteps(steps)
            assert schedule.timesteps(steps, "lcm").tolist() == scheduler.timesteps.tolist(), (cls, steps)
    assert schedule.timesteps(4, "lcm").tolist() == [999, 759, 499, 259]
    sigmas = sampling_sigmas(schedule, 4, "lcm")
    assert sigmas[:-1].tolist() == schedule.sigmas[[999, 759, 499, 259]].tolist() and sigmas[-1] == 0
    with pytest.raises(SamplerError, match="steps=51: LCM's schedule has 50 timesteps"):
        schedule.timesteps(51, "lcm")


def test_trailing_sigma_spacing_overrides_the_models_leading_timesteps():
    scheduler = DDIMScheduler.from_config(NoiseSchedule.sd().to_diffusers_config(), timestep_spacing="trailing")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    assert sampling_sigmas(NoiseSchedule.sd(), 4, "trailing")[:-1].tolist() == \
        NoiseSchedule.sd().sigmas[[999, 749, 499, 249]].tolist()


def test_karras_spacing_follows_rho_7():
    sigmas = schedule_sigmas(NoiseSchedule.sd(), 20, "karras", "euler").sigmas[:-1].double()
    ramp = sigmas ** (1 / 7)
    assert torch.allclose(ramp.diff(), ramp.diff()[0].expand(19), rtol=1e-4)
    assert sigmas[0].item() == pytest.approx(NoiseSchedule.sd().sigmas[-1].item(), rel=1e-6)
    assert sigmas[-1].item() == pytest.approx(NoiseSchedule.sd().sigmas[0].item(), rel=1e-6)


def test_sigma_to_t_inverts_training_sigmas_and_matches_diffusers():
    schedule = NoiseSchedule.sd()
    assert torch.equal(schedule.sigma_to_t(schedule.sigmas), torch.arange(1000, dtype=torch.float32))
    ref = EulerDiscreteScheduler.from_config(schedule.to_diffusers_config())
    log_sigmas = np.log(schedule.sigmas.numpy())
    probe = torch.exp(torch.linspace(-4.5, 3.5, 97, dtype=torch.float64))
    expected = ref._sigma_to_t(probe.numpy(), log_sigmas)
    assert np.abs(schedule.sigma_to_t(probe).numpy() - expected).max() < 1e-3
    assert sigma_to_t(torch.tensor([1e-6, 1e6]), schedule.sigmas.double().log()).tolist() == [0.0, 999.0]


def test_diffusers_config_round_trip_and_sd15_config():
    sd15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1, "trained_betas": None, "clip_sample": False}
    assert NoiseSchedule.from_diffusers_config(sd15) == NoiseSchedule.sd()
    for schedule in (NoiseSchedule.sd("v_prediction"), NoiseSchedule(beta_schedule="cosine", clip_sample=True),
                     NoiseSchedule(timestep_spacing="trailing", rescale_zero_terminal_snr=True)):
        config = schedule.to_diffusers_config()
        assert NoiseSchedule.from_diffusers_config(config) == schedule
        ref = DDIMScheduler.from_config(config)
        assert torch.equal(ref.alphas_cumprod[:-1], schedule.alphas_cumprod[:-1])
        assert ref.config.prediction_type == schedule.prediction_type
    assert NoiseSchedule(beta_schedule="cosine").to_diffusers_config()["beta_schedule"] == "squaredcos_cap_v2"


@pytest.mark.parametrize("key,value", [("thresholding", True), ("trained_betas", [0.1] * 1000),
                                       ("timestep_type", "continuous"), ("interpolation_type", "log_linear")])
def test_unsupported_diffusers_config_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        NoiseSchedule.from_diffusers_config({key: value})


@pytest.mark.parametrize("field,value", [("beta_schedule", "quadratic"), ("prediction_type", "flow"),
                                         ("timestep_spacing", "uniform"), ("num_train_timesteps", 1),
                                         ("steps_offset", -1), ("beta_start", 0.5)])
def test_bad_schedule_fields_raise_config_error_naming_them(field, value):
    with pytest.raises(ConfigError, match=field):
        NoiseSchedule(**{field: value})


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_bad_step_counts_raise(steps):
    with pytest.raises(SamplerError, match=f"steps={steps!r}"):
        sampling_sigmas(NoiseSchedule(timestep_spacing="linspace", steps_offset=0), steps)


def test_leading_offset_past_the_last_timestep_raises():
    with pytest.raises(SamplerError, match="timestep 1000"):
        NoiseSchedule.sd().timesteps(1000)


def test_unknown_sigma_spacing_raises():
    with pytest.raises(NijimiError, match="'polyexponential'"):
        sampling_sigmas(NoiseSchedule.sd(), 10, "polyexponential")
