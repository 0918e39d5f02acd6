import pytest
import torch
from diffusers import EulerDiscreteScheduler

from nijimi.diffusion.denoiser import Denoiser
from nijimi.diffusion.forward import training_target
from nijimi.diffusion.schedules import NoiseSchedule


class OracleNet:
    """A perfect network for one known x₀: it returns the exact ε, v or x₀ for its input x_t at integer t."""

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule):
        self.x0, self.schedule, self.calls = x0, schedule, []

    def __call__(self, x_t, t, context=None):
        self.calls.append((x_t, t, context))
        alpha_bar = self.schedule.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
        eps = (x_t - alpha_bar.sqrt() * self.x0) / (1 - alpha_bar).sqrt()
        return training_target(self.x0, eps, t.long(), self.schedule)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_a_perfect_network_denoises_exactly(prediction_type):
    schedule = NoiseSchedule.sd(prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 6, 6, generator=g)
    net = OracleNet(x0, schedule)
    denoiser = Denoiser(net, schedule)
    for t in (1, 100, 500, 999):
        sigma = schedule.sigmas[t]
        x = x0 + sigma * torch.randn(x0.shape, generator=g)
        assert torch.allclose(denoiser(x, sigma), x0, atol=2e-4 * max(1.0, sigma.item()))
        x_in, t_in, _ = net.calls[-1]
        assert torch.equal(t_in, torch.full((3,), float(t)))
        assert torch.allclose(x_in, x / (sigma**2 + 1) ** 0.5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoised_equals_diffusers_euler_pred_original_sample(tiny_net, prediction_type):
    schedule = NoiseSchedule.sd(prediction_type)
    ref = EulerDiscreteScheduler.from_config(schedule.to_diffusers_config())
    ref.set_timesteps(20)
    denoiser = Denoiser(tiny_net, schedule)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        for index in (0, 7, 19):
            t = ref.timesteps[index]
            ref._step_index = index
            out = tiny_net(ref.scale_model_input(x, t), t.expand(2))
            expected = ref.step(out, t, x).pred_original_sample
            ours = denoiser(x, ref.sigmas[index])
            assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_continuous_and_quantized_timesteps():
    schedule = NoiseSchedule.sd()
    sigma = torch.tensor([(schedule.sigmas[400] * schedule.sigmas[401]).sqrt().item()])
    assert Denoiser(lambda x, t: x, schedule).timestep(sigma).item() == pytest.approx(400.5, abs=1e-3)
    assert Denoiser(lambda x, t: x, schedule, quantize=True).timestep(sigma).item() in (400.0, 401.0)


def test_clip_sample_clamps_the_prediction_and_cond_is_passed_through():
    schedule = NoiseSchedule.sd("sample")
    seen = {}

    def net(x, t, context, mask):
        seen.update(context=context, mask=mask)
        return torch.full_like(x, 3.0)

    context, mask = torch.ones(1, 77, 8), torch.zeros(1, 1, 4, 4)
    x = torch.zeros(1, 4, 4, 4)
    assert torch.equal(Denoiser(net, schedule)(x, 1.0, context=context, mask=mask), torch.full_like(x, 3.0))
    assert seen["context"] is context and seen["mask"] is mask
    clipped = NoiseSchedule(prediction_type="sample", clip_sample=True, clip_sample_range=1.5)
    assert torch.equal(Denoiser(net, clipped)(x, 1.0, context=context, mask=mask), torch.full_like(x, 1.5))
