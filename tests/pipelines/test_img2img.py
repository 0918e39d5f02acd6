"""img2img against diffusers' StableDiffusionImg2ImgPipeline (same folder, same seeds → same pixels, the VAE's
posterior sample included), and strength 0 returns the input through the VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
)

from nijimi.errors import ConfigError, ImageError
from nijimi.pipelines.images import to_tensor, to_unit

TOLERANCE = 1e-4  # max |nijimi − diffusers| on pixels in [0, 1], fp32 (the issue asks 1e-3; measured ≤ 1.2e-5)
PROMPT, NEGATIVE = "a watercolour of a lighthouse", "dark"


def run_diffusers(pipe, scheduler, picture, *, seed: int, batch: int = 1, **kwargs) -> np.ndarray:
    pipe = StableDiffusionImg2ImgPipeline(**{**pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    return pipe(PROMPT, picture, negative_prompt=NEGATIVE, num_images_per_prompt=batch, generator=generators,
                output_type="np", **kwargs).images


@pytest.mark.parametrize(("sampler", "scheduler_cls", "strength", "batch"), [
    ("euler", EulerDiscreteScheduler, 0.6, 2),
    ("ddim", DDIMScheduler, 0.8, 1),
    ("euler-a", EulerAncestralDiscreteScheduler, 0.5, 1),
    ("euler", EulerDiscreteScheduler, 1.0, 1),
    ("lcm", LCMScheduler, 0.5, 2),
], ids=["euler-0.6-batch2", "ddim-0.8", "euler-a-0.5", "euler-1.0", "lcm-0.5-batch2"])
def test_img2img_equals_diffusers(sd_nijimi, sd_diffusers, picture, max_abs, sampler, scheduler_cls, strength,
                                  batch):
    scheduler = scheduler_cls.from_config(sd_diffusers.scheduler.config)
    theirs = run_diffusers(sd_diffusers, scheduler, picture, seed=5, batch=batch, strength=strength,
                           num_inference_steps=5, guidance_scale=5.0)
    ours = sd_nijimi.generate(PROMPT, NEGATIVE, steps=5, sampler=sampler, guidance=5.0, seed=5, batch=batch,
                              init_image=picture, strength=strength)
    assert ours.request.width == ours.request.height == 64
    assert max_abs(ours.pixels, theirs) <= TOLERANCE


def test_posterior_sample_matters(sd_nijimi, sd_diffusers, picture, max_abs):
    """The VAE's posterior std is large here, so the parity above needs the same posterior draw: the posterior mean
    (what a pipeline drawing the noise first, or not sampling, would use) is far off."""
    posterior = sd_nijimi.model.vae.encode(to_tensor(picture, 64, 64))
    assert posterior.std.mean() > 0.5
    scheduler = EulerDiscreteScheduler.from_config(sd_diffusers.scheduler.config)
    theirs = run_diffusers(sd_diffusers, scheduler, picture, seed=5, strength=0.4, num_inference_steps=5,
                           guidance_scale=5.0)
    ours = sd_nijimi.generate(PROMPT, NEGATIVE, steps=5, sampler="euler", guidance=5.0, seed=5, init_image=picture,
                              strength=0.4)
    assert max_abs(ours.pixels, theirs) <= TOLERANCE
    with torch.no_grad():
        from_mean = sd_nijimi.model.vae.decode_latents(posterior.mean * sd_nijimi.model.config.scaling_factor)
    assert max_abs(to_unit(from_mean), theirs) > 0.05


def test_strength_zero_returns_the_image_through_the_vae(sd_nijimi, picture):
    """No denoising: the result is decode(posterior sample of the image), the sample drawn from the seed."""
    ours = sd_nijimi.generate(PROMPT, steps=4, sampler="euler", seed=9, init_image=picture, strength=0.0)
    vae, scale = sd_nijimi.model.vae, sd_nijimi.model.config.scaling_factor
    with torch.no_grad():
        posterior = vae.encode(to_tensor(picture, 64, 64))
        latent = posterior.sample(torch.Generator().manual_seed(9)) * scale
        expected = to_unit(vae.decode_latents(latent))
    assert torch.equal(ours.latents, latent)
    assert float((ours.pixels - expected).abs().max()) <= 1e-6


def test_batch_image_equals_its_single_generation(sd_nijimi, picture):
    batch = sd_nijimi.generate(PROMPT, steps=3, sampler="euler-a", seed=20, batch=2, init_image=picture,
                               strength=0.7)
    single = sd_nijimi.generate(PROMPT, steps=3, sampler="euler-a", seed=21, init_image=picture, strength=0.7)
    assert float((batch.pixels[1] - single.pixels[0]).abs().max()) <= 1e-4  # batched vs single convolutions


def test_init_image_size_and_resize(sd_nijimi, picture):
    """Sizes default to the init image's, rounded down to the model's multiple; an explicit size resizes."""
    odd = picture.resize((70, 67))
    gen = sd_nijimi.generate(PROMPT, steps=2, seed=1, init_image=odd, strength=0.5, sampler="euler")
    assert (gen.request.width, gen.request.height) == (64, 64) and gen.images[0].size == (64, 64)
    gen = sd_nijimi.generate(PROMPT, steps=2, seed=1, init_image=picture, strength=0.5, sampler="euler", width=32)
    assert gen.images[0].size == (32, 64)


def test_bad_strength_and_unreadable_image(sd_nijimi, picture, tmp_path):
    for strength in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="strength"):
            sd_nijimi.generate(PROMPT, steps=2, init_image=picture, strength=strength)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="broken.png"):
        sd_nijimi.generate(PROMPT, steps=2, init_image=broken)
    with pytest.raises(ImageError, match="not found"):
        sd_nijimi.generate(PROMPT, steps=2, init_image=tmp_path / "missing.png")
