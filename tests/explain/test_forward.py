"""The forward view on a user's image: the noised latents are q(x_t|x₀) of the VAE's posterior mean, by hand, under
each schedule, decoded; one seeded noise draw; ᾱ_t and SNR in the info; bad timesteps refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from nijimi.errors import ConfigError
from nijimi.explain.forward import DEFAULT_TIMESTEPS, compared_schedules, fitted_size, forward_process
from nijimi.pipelines.images import to_pil, to_tensor


def _picture(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((8, 8, size[0] // 2, size[1] // 2), fill="red")
    return image


def test_panels_are_the_noised_latents_decoded_by_hand(embedded):
    steps = [0, 500, 999]
    result = forward_process(embedded, _picture(), steps, seed=7)
    schedules = compared_schedules(embedded)
    assert result.view == "forward"
    assert [p.name for p in result.panels] == [f"{s}-t{t:04d}" for s in ("model", "linear", "cosine")
                                               for t in steps] + ["alpha_bar", "snr"]
    vae = embedded.model.vae
    with torch.inference_mode():
        x0 = vae.encode(to_tensor(_picture(), 64, 64)).mean * vae.config.scaling_factor
    noise = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(7))
    for row, schedule in enumerate(schedules.values()):
        for col, t in enumerate(steps):
            a = schedule.alphas_cumprod[t]
            by_hand = to_pil(embedded.decode(a.sqrt() * x0 + (1 - a).sqrt() * noise))[0]
            got = np.asarray(result.panels[row * len(steps) + col].image).astype(int)
            assert np.abs(got - np.asarray(by_hand).astype(int)).max() <= 1
    for label, schedule in schedules.items():
        a = schedule.alphas_cumprod[steps].double()
        np.testing.assert_allclose(result.info["schedules"][label]["alpha_bar"], a.numpy())
        np.testing.assert_allclose(result.info["schedules"][label]["snr"], (a / (1 - a)).numpy())
    assert result.info["timesteps"] == steps and result.info["seed"] == 7 and result.info["size"] == [64, 64]


def test_the_seed_fixes_the_noise_and_t0_keeps_the_picture(embedded):
    first, again = (forward_process(embedded, _picture(), [0, 750], seed=1) for _ in range(2))
    other = forward_process(embedded, _picture(), [0, 750], seed=2)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image))
               for a, b in zip(first.panels[:6], again.panels[:6], strict=True))
    assert not np.array_equal(np.asarray(first.panels[1].image), np.asarray(other.panels[1].image))
    reconstruction = to_pil(embedded.decode(
        embedded.model.vae.encode(to_tensor(_picture(), 64, 64)).mean * embedded.model.vae.config.scaling_factor))[0]
    at_zero = np.asarray(first.panels[0].image).astype(float)
    assert np.abs(at_zero - np.asarray(reconstruction)).mean() < 2  # ᾱ_0 ≈ 1: barely any noise


def test_default_timesteps_plots_and_scaling_of_a_large_image(embedded):
    result = forward_process(embedded, _picture((300, 150)))
    assert result.info["timesteps"] == list(DEFAULT_TIMESTEPS) and result.info["size"] == [64, 32]
    assert result.panels[0].image.size == (64, 32)
    assert result.panels[-1].image.size == result.panels[-2].image.size == (400, 300)
    assert fitted_size(Image.new("RGB", (20, 13)), 64) == (16, 8)


@pytest.mark.parametrize("steps, message", [([1000], "timestep 1000 must be an integer from 0 to 999"),
                                            ([-1], "timestep -1"), ([2.5], "timestep 2.5"),
                                            ([], "give 1 to 16 timesteps, not 0"),
                                            (list(range(17)), "not 17")])
def test_bad_timesteps_are_refused(embedded, steps, message):
    with pytest.raises(ConfigError, match=message):
        forward_process(embedded, _picture(), steps)
