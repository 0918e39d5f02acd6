import itertools

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from nijimi.diffusion.forward import (
    convert_prediction,
    diffusion_loss,
    min_snr_weights,
    q_sample,
    timestep_weights,
    training_target,
)
from nijimi.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule
from nijimi.errors import ConfigError


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 5, 5, generator=g)
    noise = torch.randn(6, 4, 5, 5, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    return x0, noise, t


def _reference(schedule: NoiseSchedule) -> DDPMScheduler:
    return DDPMScheduler.from_config(schedule.to_diffusers_config())


def test_q_sample_and_v_target_equal_diffusers(batch):
    x0, noise, t = batch
    schedule = NoiseSchedule.sd("v_prediction")
    ref = _reference(schedule)
    assert torch.allclose(q_sample(x0, t, noise, schedule), ref.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
    assert torch.allclose(training_target(x0, noise, t, schedule), ref.get_velocity(x0, noise, t),
                          rtol=1e-6, atol=1e-6)


def test_epsilon_and_sample_targets(batch):
    x0, noise, t = batch
    assert torch.equal(training_target(x0, noise, t, NoiseSchedule.sd("epsilon")), noise)
    assert torch.equal(training_target(x0, noise, t, NoiseSchedule.sd("sample")), x0)


def test_q_sample_has_the_marginal_variance():
    schedule = NoiseSchedule(beta_schedule="cosine")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4000, 3, generator=g) * 0.5
    t = torch.full((4000,), 600)
    x_t = q_sample(x0, t, torch.randn(4000, 3, generator=g), schedule)
    alpha_bar = schedule.alphas_cumprod[600].item()
    assert x_t.var().item() == pytest.approx(alpha_bar * 0.25 + 1 - alpha_bar, rel=0.05)


@pytest.mark.parametrize("source,target", list(itertools.permutations(PREDICTION_TYPES, 2)))
def test_convert_prediction_between_all_kinds(batch, source, target):
    x0, noise, t = batch
    t = t[1:-1]  # the ε↔x₀ conversion is ill-posed at ᾱ→0 and ᾱ→1
    x0, noise = x0[1:-1], noise[1:-1]
    schedule = NoiseSchedule.sd()
    x_t = q_sample(x0, t, noise, schedule)
    kinds = {"epsilon": noise, "sample": x0,
             "v_prediction": training_target(x0, noise, t, NoiseSchedule.sd("v_prediction"))}
    converted = convert_prediction(kinds[source], x_t, t, schedule, source, target)
    assert torch.allclose(converted, kinds[target], atol=2e-4)


def test_convert_prediction_rejects_unknown_kinds(batch):
    x0, noise, t = batch
    with pytest.raises(ConfigError, match="'flow'"):
        convert_prediction(noise, x0, t, NoiseSchedule.sd(), "epsilon", "flow")


def _diffusers_min_snr(schedule: NoiseSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """The weights as diffusers' train_text_to_image.py computes them."""
    snr = compute_snr(_reference(schedule), t)
    weights = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    if schedule.prediction_type == "epsilon":
        return weights / snr
    return weights / (snr + 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_diffusers_training_script(batch, prediction_type):
    _, _, t = batch
    schedule = NoiseSchedule.sd(prediction_type)
    expected = _diffusers_min_snr(schedule, t, 5.0)
    assert torch.allclose(min_snr_weights(t, schedule, 5.0), expected, rtol=1e-5)
    assert min_snr_weights(t, schedule, 5.0)[0] < 0.01  # t=0 has SNR ≈ 1170: heavily down-weighted


def test_min_snr_weights_for_sample_prediction_and_zero_terminal_snr():
    t = torch.tensor([0, 999])
    x0_weights = min_snr_weights(t, NoiseSchedule.sd("sample"), 5.0)
    assert x0_weights[0].item() == 5.0
    zero_snr = NoiseSchedule(rescale_zero_terminal_snr=True)
    assert torch.isfinite(min_snr_weights(t, zero_snr, 5.0)).all()
    assert min_snr_weights(t, zero_snr, 5.0)[1].item() == pytest.approx(1.0)


def test_diffusion_loss_plain_and_weighted(batch):
    x0, noise, t = batch
    schedule = NoiseSchedule.sd()
    pred = noise + 0.1 * x0
    loss, per_sample = diffusion_loss(pred, noise, t, schedule)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(pred, noise).item(), rel=1e-6)
    assert per_sample.shape == (6,)
    weighted, weighted_per_sample = diffusion_loss(pred, noise, t, schedule, min_snr_gamma=5.0)
    expected = ((pred - noise) ** 2).mean(dim=(1, 2, 3)) * _diffusers_min_snr(schedule, t, 5.0)
    assert torch.allclose(weighted_per_sample, expected, rtol=1e-5)
    assert weighted.item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_diffusion_loss_carries_gradients_and_checks_shapes(batch):
    x0, noise, t = batch
    pred = x0.clone().requires_grad_()
    loss, _ = diffusion_loss(pred, noise, t, NoiseSchedule.sd(), min_snr_gamma=1.0)
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match=r"\(6, 4, 5, 5\)"):
        diffusion_loss(pred[:, :2], noise, t, NoiseSchedule.sd())


def test_bad_timesteps_raise(batch):
    x0, noise, _ = batch
    with pytest.raises(ConfigError, match="1000"):
        q_sample(x0, torch.full((6,), 1000), noise, NoiseSchedule.sd())
    with pytest.raises(ConfigError, match=r"\(3,\)"):
        q_sample(x0, torch.zeros(3), noise, NoiseSchedule.sd())
    with pytest.raises(ConfigError, match="min_snr_gamma=0"):
        min_snr_weights(torch.zeros(2), NoiseSchedule.sd(), 0)


def test_timestep_weights_favour_the_chosen_part():
    assert timestep_weights(1000) is None
    later = timestep_weights(1000, "later", multiplier=2.0, portion=0.4)
    assert later.sum().item() == pytest.approx(1.0)
    assert later[600:].sum().item() == pytest.approx(0.8 / 1.4) and later[599].item() == pytest.approx(later[600] / 2)
    earlier = timestep_weights(1000, "earlier", multiplier=3.0, portion=0.1)
    assert earlier[:100].sum().item() == pytest.approx(0.3 / 1.2) and earlier[100] == earlier[999]
    ranged = timestep_weights(1000, "range", multiplier=0.5, begin=200, end=300)
    assert ranged[200:300].sum().item() == pytest.approx(0.05 / 0.95) and ranged[199] == ranged[300]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"strategy": "late"}, "unknown timestep bias strategy 'late'; choose one of none, earlier, later, range"),
    ({"strategy": "later", "multiplier": 0.0}, "timestep bias multiplier must be > 0, got 0.0"),
    ({"strategy": "earlier", "portion": 1.5}, r"timestep bias portion must be in \(0, 1\], got 1.5"),
    ({"strategy": "range", "begin": 900, "end": 1200}, r"timestep bias range \[900, 1200\) is not inside"),
])
def test_timestep_weights_name_a_bad_setting(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        timestep_weights(1000, **kwargs)
