"""The guidance interval (2404.07724) and DeepCache (2312.00858) layers of the model stack, on the small random SD
model of conftest.py: switched off (or covering everything) they give the plain images bit for bit; otherwise every
U-Net call is checked against the plain U-Net (full steps) or the shallow branch computed by hand (cached steps)."""

from __future__ import annotations

import pytest
import torch

from nijimi.diffusion.guidance import Denoiser, GuidedNetwork
from nijimi.errors import ConfigError
from nijimi.models.controlnet import ControlNetModel
from nijimi.models.unet import embed_timesteps
from nijimi.pipelines.control import ControlUnit
from nijimi.pipelines.request import GenerationRequest, parse_interval
from nijimi.pipelines.shortcuts import with_guidance_interval

PROMPT, NEGATIVE = "a red cube on a blue sphere", "blurry"
RUN = {"steps": 7, "seed": 5, "batch": 2, "width": 64, "height": 64, "sampler": "euler"}


def latents(pipe, **fields) -> torch.Tensor:
    return pipe.generate(PROMPT, NEGATIVE, **(RUN | fields)).latents


def spy(pipe, monkeypatch) -> list[dict]:
    """Replace the bottom of ``pipe``'s model stack by one that checks each U-Net call and records it: a full call
    (no cache, or an empty one) must equal the plain U-Net, a cached call the shallow branch by hand (conv_in, the
    cached feature concatenated with its output, the last output block, ``out``)."""
    unet, calls = pipe.model.unet, []

    def checked(x, t, context, *, step, is_cond=None, cache=None, **residuals):
        full = cache is None or cache.feature is None
        feature = None if full else cache.feature
        out = unet(x, t, context, cache=cache, **residuals)
        if full:
            expected = unet(x, t, context, **residuals)
        else:
            emb = embed_timesteps(unet.time_embed, t, unet.config.model_channels, x.shape[0], x.dtype)
            h = torch.cat([feature, unet.input_blocks[0](x, emb, context)], dim=1)
            expected = unet.out(unet.output_blocks[-1](h, emb, context))
        calls.append({"step": step, "full": full, "rows": x.shape[0], "residuals": bool(residuals),
                      "cond_only": bool(is_cond.all()), "equal": torch.equal(out, expected)})
        return out

    monkeypatch.setattr(pipe, "_unet", checked)
    return calls


def test_request_fields_are_checked_and_recorded() -> None:
    request = GenerationRequest("x", guidance_interval=[0.5, 4], deepcache=3)
    assert request.guidance_interval == (0.5, 4.0)
    assert GenerationRequest.from_dict(request.to_dict()) == request
    for bad in [(4, 0.5), (1,), (-1, 2), ("a", 2), (0, float("inf"))]:
        with pytest.raises(ConfigError, match="guidance interval"):
            GenerationRequest("x", guidance_interval=bad)
    with pytest.raises(ConfigError, match="--guidance-interval '1' is not LOW,HIGH"):
        parse_interval("1")
    with pytest.raises(ConfigError, match="deepcache"):
        GenerationRequest("x", deepcache=-1)


def test_guidance_interval_covering_every_step_changes_nothing(sd_nijimi) -> None:
    assert torch.equal(latents(sd_nijimi, guidance_interval=(0.0, 1e9)), latents(sd_nijimi))


def test_guidance_interval_outside_every_step_is_guidance_one(sd_nijimi) -> None:
    assert torch.equal(latents(sd_nijimi, guidance_interval=(1e8, 1e9)), latents(sd_nijimi, guidance=1.0))


def test_outside_the_interval_one_conditional_call_per_step(sd_nijimi, monkeypatch) -> None:
    request = GenerationRequest(PROMPT, NEGATIVE, **RUN)
    s = request.sampler.sigmas(sd_nijimi.model.config.schedule, RUN["steps"]).tolist()
    calls = spy(sd_nijimi, monkeypatch)
    sd_nijimi.generate(request, guidance_interval=((s[4] + s[5]) / 2, (s[1] + s[2]) / 2))
    assert [c["step"] for c in calls] == list(range(7))
    assert [c["rows"] for c in calls] == [2, 2, 4, 4, 4, 2, 2]
    assert all(c["cond_only"] for c in calls if c["rows"] == 2)


def test_guidance_interval_layer_outside_equals_scale_one(sd_nijimi) -> None:
    net = lambda x, t, context, **kw: x * context.mean() + t[:, None, None, None] / 1000  # noqa: E731
    schedule = sd_nijimi.model.config.schedule
    guided, plain = Denoiser(GuidedNetwork(net, 7.0), schedule), Denoiser(GuidedNetwork(net, 1.0), schedule)
    x, cond, uncond = torch.randn(2, 4, 8, 8), {"context": torch.ones(2, 3, 5)}, {"context": torch.zeros(2, 3, 5)}
    windowed = with_guidance_interval(guided, 1.0, 2.0)
    for sigma, inside in ((0.5, False), (1.5, True), (2.0, True), (3.0, False)):
        expected = (guided if inside else plain)(x, sigma, cond=cond, uncond=uncond)
        assert torch.equal(windowed(x, torch.full((2,), sigma), cond=cond, uncond=uncond), expected)


@pytest.mark.parametrize("interval", [0, 1])
def test_deepcache_off_is_bit_identical(sd_nijimi, interval) -> None:
    assert torch.equal(latents(sd_nijimi, deepcache=interval), latents(sd_nijimi))


@pytest.mark.parametrize(("sampler", "steps"), [
    ("euler-a", [0, 1, 2, 3, 4, 5, 6]),
    ("heun", [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]),  # Heun's second call of step i belongs to step i + 1
])
def test_deepcache_full_every_nth_step_shallow_between(sd_nijimi, monkeypatch, sampler, steps) -> None:
    calls = spy(sd_nijimi, monkeypatch)
    cached = latents(sd_nijimi, deepcache=3, sampler=sampler)
    assert [c["step"] for c in calls] == steps
    assert [c["full"] for c in calls] == [s % 3 == 0 for s in steps]
    assert all(c["equal"] and c["rows"] == 4 for c in calls)
    assert not torch.equal(cached, latents(sd_nijimi, sampler=sampler))


def test_deepcache_img2img_counts_from_the_first_step_run(sd_nijimi, monkeypatch, picture) -> None:
    calls = spy(sd_nijimi, monkeypatch)
    latents(sd_nijimi, deepcache=2, init_image=picture, strength=0.6)
    assert [c["step"] for c in calls] == [3, 4, 5, 6]
    assert [c["full"] for c in calls] == [True, False, True, False]
    assert all(c["equal"] for c in calls)


def test_deepcache_with_controlnet_uses_residuals_on_full_steps(sd_nijimi, monkeypatch) -> None:
    net = ControlNetModel.from_unet(sd_nijimi.model.unet, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    unit = ControlUnit(net.eval(), torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
    calls = spy(sd_nijimi, monkeypatch)
    latents(sd_nijimi, deepcache=3, control=(unit,))
    assert [c["residuals"] for c in calls] == [c["full"] for c in calls] == [s % 3 == 0 for s in range(7)]
    assert all(c["equal"] for c in calls)


def test_deepcache_with_guidance_interval_keeps_a_cache_per_row_layout(sd_nijimi, monkeypatch) -> None:
    request = GenerationRequest(PROMPT, NEGATIVE, **RUN)
    s = request.sampler.sigmas(sd_nijimi.model.config.schedule, RUN["steps"]).tolist()
    calls = spy(sd_nijimi, monkeypatch)
    sd_nijimi.generate(request, deepcache=3, guidance_interval=((s[3] + s[4]) / 2, 1e9))
    assert [c["rows"] for c in calls] == [4, 4, 4, 4, 2, 2, 2]
    assert [c["full"] for c in calls] == [True, False, False, True, True, False, True]
    assert all(c["equal"] for c in calls)
