import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from nijimi.diffusion.denoiser import Denoiser
from nijimi.diffusion.guidance import GuidedNetwork, batch_conditions, rescale_guidance
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
