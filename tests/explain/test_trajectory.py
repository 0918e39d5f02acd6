"""The trajectory view: one x_t and one x̂₀ panel per step, the last x_t (and x̂₀) is the image the pipeline makes
for the same request, the step callback still sees every step, and a plain generation is untouched by the views."""

from __future__ import annotations

import numpy as np
import pytest

from nijimi.errors import ConfigError
from nijimi.explain.adapter_effects import adapter_effects
from nijimi.explain.trajectory import trajectory
from nijimi.pipelines.request import GenerationRequest


@pytest.mark.parametrize("sampler", [None, "euler-a"])
def test_last_panels_are_the_generated_image(embedded, sampler):
    request = GenerationRequest("a red circle on the left", seed=3, steps=3, width=64, height=64, sampler=sampler)
    seen = []
    result = trajectory(embedded, request, callback=lambda info: seen.append(info.i))
    assert seen == [0, 1, 2]
    assert [p.name for p in result.panels] == ["x_t-001", "x_t-002", "x_t-003", "x0_hat-001", "x0_hat-002",
                                               "x0_hat-003"]
    image = np.asarray(embedded.generate(request).images[0]).astype(int)
    np.testing.assert_array_equal(np.asarray(result.panels[2].image), image)
    assert np.abs(np.asarray(result.panels[5].image).astype(int) - image).max() <= 1
    assert not np.array_equal(np.asarray(result.panels[0].image), image)  # the first step is still noisy
    assert result.info["steps"] == 3 and result.info["seed"] == 3 and result.info["columns"] == 3
    assert result.info["sigma_next"][-1] == 0 and len(result.info["sigma"]) == 3


def test_a_batch_is_refused(embedded):
    with pytest.raises(ConfigError, match="trajectory shows one image; batch 2 must be 1"):
        trajectory(embedded, GenerationRequest("a star", batch=2, steps=2))


def test_generation_is_unchanged_by_the_views_and_no_hook_is_left(embedded):
    request = GenerationRequest("a pink star on the right <lora:pink:1>", seed=5, steps=2, width=64, height=64)
    before = embedded.generate(request)
    trajectory(embedded, request)
    adapter_effects(embedded, request)
    after = embedded.generate(request)
    np.testing.assert_array_equal(before.latents.numpy(), after.latents.numpy())
    for module in embedded.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
