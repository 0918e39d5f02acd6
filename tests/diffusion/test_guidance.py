"""The denoiser (σ-space wrapper of an ε/v/x₀ network) and classifier-free guidance."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from nijimi.diffusion.forward import training_target
from nijimi.diffusion.guidance import Denoiser, GuidedNetwork, batch_conditions, rescale_guidance
from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.errors import ConfigError


class CountingNet:
    def __init__(self, net):
        self.net, self.batches = net, []

    def __call__(self, x, t, context):
        self.batches.append(x.shape[0])
        return self.net(x, t, context)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0]),
            torch.randn(2, 77, 8, generator=g), torch.randn(2, 77, 8, generator=g))


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_is_one_batched_call_equal_to_two_separate_calls(tiny_net, inputs, rescale):
    x, t, cond, uncond = inputs
    net = CountingNet(tiny_net)
    with torch.no_grad():
        guided = GuidedNetwork(net, 7.5, rescale)(x, t, {"context": cond}, {"context": uncond})
        p_c, p_u = tiny_net(x, t, cond), tiny_net(x, t, uncond)
    assert net.batches == [4]
    expected = p_u + 7.5 * (p_c - p_u)
    if rescale:
        expected = rescale_noise_cfg(expected, p_c, guidance_rescale=rescale)
    assert torch.allclose(guided, expected, atol=1e-5)


def test_rescale_equals_diffusers_rescale_noise_cfg():
    g = torch.Generator().manual_seed(1)
    guided, cond = torch.randn(3, 4, 8, 8, generator=g) * 4, torch.randn(3, 4, 8, 8, generator=g)
    for phi in (0.0, 0.3, 1.0):
        assert torch.allclose(rescale_guidance(guided, cond, phi), rescale_noise_cfg(guided, cond, phi), atol=1e-6)
    full = rescale_guidance(guided, cond, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-5)


def test_scale_one_or_no_uncond_is_a_single_unguided_call(tiny_net, inputs):
    x, t, cond, uncond = inputs
    net = CountingNet(tiny_net)
    with torch.no_grad():
        a = GuidedNetwork(net, 1.0)(x, t, {"context": cond}, {"context": uncond})
        b = GuidedNetwork(net, 7.5)(x, t, {"context": cond})
        expected = tiny_net(x, t, cond)
    assert net.batches == [2, 2]
    assert torch.equal(a, expected) and torch.equal(b, expected)


def test_guided_network_under_the_denoiser(tiny_net, inputs):
    x, _, cond, uncond = inputs
    schedule = NoiseSchedule.sd()
    with torch.no_grad():
        guided = Denoiser(GuidedNetwork(tiny_net, 5.0), schedule)(x, 3.0, cond={"context": cond},
                                                                  uncond={"context": uncond})
        d_c = Denoiser(tiny_net, schedule)(x, 3.0, context=cond)
        d_u = Denoiser(tiny_net, schedule)(x, 3.0, context=uncond)
    assert torch.allclose(guided, d_u + 5.0 * (d_c - d_u), atol=1e-5)  # CFG on ε is CFG on x̂₀


def test_batch_conditions_walks_nested_inputs():
    hint = object()
    control = [torch.ones(1, 3), torch.ones(1, 5)]
    uncond = {"context": torch.zeros(1, 77, 8), "added": {"time_ids": torch.zeros(1, 6)}, "hint": hint,
              "control": [torch.zeros(1, 3), torch.zeros(1, 5)], "masked": None}
    cond = {"context": torch.ones(1, 77, 8), "added": {"time_ids": torch.ones(1, 6)}, "hint": hint,
            "control": control, "masked": None}
    both = batch_conditions(uncond, cond)
    assert both["context"].shape == (2, 77, 8) and both["context"][0].sum() == 0 and both["context"][1].min() == 1
    assert both["added"]["time_ids"].shape == (2, 6)
    assert both["hint"] is hint and both["masked"] is None
    assert [c.shape for c in both["control"]] == [(2, 3), (2, 5)] and isinstance(both["control"], list)


@pytest.mark.parametrize("uncond,cond,message", [
    ({"context": torch.zeros(1, 77, 8)}, {"context": torch.zeros(1, 77, 4)}, "'context'"),
    ({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, r"\['b'\]"),
    ({"flag": True}, {"flag": False}, "'flag'"),
])
def test_batch_conditions_refuses_mismatches(uncond, cond, message):
    with pytest.raises(ConfigError, match=message):
        batch_conditions(uncond, cond)


def test_rescale_outside_unit_interval_raises(tiny_net):
    with pytest.raises(ConfigError, match="1.5"):
        GuidedNetwork(tiny_net, 7.5, 1.5)


# ---- the denoiser ----

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


def test_continuous_timesteps_and_a_steps_table():
    schedule = NoiseSchedule.sd()
    sigma = torch.tensor([(schedule.sigmas[400] * schedule.sigmas[401]).sqrt().item()])
    assert Denoiser(lambda x, t: x, schedule).timestep(sigma).item() == pytest.approx(400.5, abs=1e-3)
    table = Denoiser(lambda x, t: x, schedule, timesteps={(3, sigma.item()): 401.0})
    assert table.timestep(sigma, 3).item() == 401.0
    assert table.timestep(sigma, 2).item() == pytest.approx(400.5, abs=1e-3)  # another step at the same σ
    assert table.timestep(sigma).item() == pytest.approx(400.5, abs=1e-3)


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
