"""Pipeline: float pixels and their rounding, batches and seeds, sizes, bf16 networks with fp32 sampling, devices,
automatic and explicit attention slicing, VAE tiles, the memory a loaded pipeline holds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import random_model, resident_kib

from nijimi.errors import ConfigError
from nijimi.io.checkpoint import save_diffusers
from nijimi.models.layers import Attention
from nijimi.pipelines import pipeline, runtime
from nijimi.pipelines.images import to_unit
from nijimi.pipelines.pipeline import Pipeline, _in_dtype
from nijimi.pipelines.request import GenerationRequest

PROMPT = "a small house by a lake"


@pytest.fixture(scope="module")
def pipe(make_model, config) -> Pipeline:
    return Pipeline(make_model(config, seed=5))


def slice_sizes(pipe: Pipeline) -> set:
    return {m.slice_size for m in pipe.model.unet.modules() if isinstance(m, Attention)}


def test_images_are_the_rounded_pixels(pipe):
    gen = pipe.generate(PROMPT, steps=2, sampler="euler", seed=1, batch=2, width=64, height=32)
    assert gen.pixels.dtype == torch.float32 and gen.pixels.shape == (2, 3, 32, 64)
    assert 0 <= float(gen.pixels.min()) and float(gen.pixels.max()) <= 1
    for image, pixels in zip(gen.images, gen.pixels, strict=True):
        assert image.size == (64, 32)
        assert np.array_equal(np.asarray(image), (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    assert gen.latents.shape == (2, 4, 4, 8) and gen.seeds == [1, 2]
    assert torch.equal(pipe.decode(gen.latents, tile=None), gen.pixels)


def test_batch_images_equal_single_generations(pipe):
    batch = pipe.generate(PROMPT, steps=3, sampler="euler-a", seed=30, batch=3, width=64, height=64)
    single = pipe.generate(PROMPT, steps=3, sampler="euler-a", seed=32, width=64, height=64)
    assert float((batch.pixels[2] - single.pixels[0]).abs().max()) <= 1e-4


def test_settings_record_every_knob(pipe):
    gen = pipe.generate(PROMPT, "dark", steps=2, sampler="Euler a", guidance=4.0, seed=3, width=64, height=64,
                        clip_skip=2)
    r = gen.request
    assert (r.sampler.name, r.guidance, r.seed, r.clip_skip, r.negative_prompt) == ("euler-a", 4.0, 3, 2, "dark")
    assert (r.vae_tile, r.attention_slice, r.init_image, r.width, r.height) == (0, 0, None, 64, 64)


def test_guidance_defaults_to_the_models(make_model, config, pipe):
    """A request without a guidance scale takes the model's (``ModelConfig.guidance``: 7 unless its file names
    another), in the plain path, the hires fix and ``sample_latents``; the recipe records the scale used."""
    assert pipe.generate(PROMPT, steps=2, sampler="euler", seed=3, width=32, height=32).request.guidance == 7.0
    model = make_model(config, seed=5)
    model.set_config(dataclasses.replace(model.config, guidance=2.5))
    own = Pipeline(model)
    request = GenerationRequest(PROMPT, steps=2, sampler="euler", seed=3, width=32, height=32)
    gen = own.generate(request)
    assert gen.request.guidance == 2.5
    assert torch.equal(gen.pixels, own.generate(request, guidance=2.5).pixels)
    assert not torch.equal(gen.pixels, pipe.generate(request).pixels)  # the same weights at 7
    assert torch.equal(own.sample_latents(request)[1], gen.latents)
    assert own.generate(request, hires_scale=1.5, hires_steps=1).request.guidance == 2.5


def test_random_seed_is_recorded_and_replays(pipe):
    first = pipe.generate(PROMPT, steps=2, sampler="euler", width=64, height=64)
    again = pipe.generate(PROMPT, steps=2, sampler="euler", width=64, height=64, seed=first.request.seed)
    assert torch.equal(first.pixels, again.pixels)


@pytest.mark.parametrize(("width", "height"), [(60, 64), (64, 68), (0, 64), (64, -16)])
def test_sizes_must_be_multiples_of_8(pipe, width, height):
    with pytest.raises(ConfigError, match="multiple of 8 pixels"):
        pipe.generate(PROMPT, steps=2, width=width, height=height)


def test_sizes_need_not_fit_the_unet_levels(pipe):
    """72 px = 9 latent cells, odd at the U-Net's second level: upsampled back to the skip's size, as diffusers."""
    assert pipe.generate(PROMPT, steps=1, seed=0, width=72, height=64).images[0].size == (72, 64)


def test_default_size_is_native(pipe):
    assert pipe.native_size == 64
    assert pipe.generate(PROMPT, steps=1, seed=0).images[0].size == (64, 64)


def test_bf16_networks_fp32_sampling(make_model, config):
    """bf16 casts the U-Net and text encoder; the sampler's latents, the VAE and the returned pixels stay fp32, and
    the picture stays close to the fp32 one."""
    reference = Pipeline(make_model(config, seed=5)).generate(PROMPT, "dark", steps=4, sampler="euler", seed=2)
    pipe = Pipeline(make_model(config, seed=5), dtype=torch.bfloat16)
    model = pipe.model
    assert {p.dtype for p in model.unet.parameters()} == {p.dtype for p in model.text_encoder.parameters()} == {
        torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}
    seen = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: seen.append((args[0].dtype, args[2].dtype)))
    try:
        gen = pipe.generate(PROMPT, "dark", steps=4, sampler="euler", seed=2)
    finally:
        hook.remove()
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert gen.latents.dtype == gen.pixels.dtype == torch.float32 and pipe.dtype == torch.bfloat16
    x = torch.randn(1, 4, 8, 8)
    assert _in_dtype(pipe._unet, pipe.dtype)(x, torch.tensor([500.0]), torch.randn(1, 77, 32)).dtype == torch.float32
    error = (gen.pixels - reference.pixels).abs()
    assert float(error.mean()) < 0.02 and 0 < float(error.max()) < 0.2


def test_unsupported_dtype(make_model, config):
    with pytest.raises(ConfigError, match="float16"):
        Pipeline(make_model(config, seed=5), dtype=torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(make_model, config):
    cpu = Pipeline(make_model(config, seed=5)).generate(PROMPT, "dark", steps=4, sampler="euler-a", seed=2)
    cuda = Pipeline(make_model(config, seed=5), device="cuda").generate(PROMPT, "dark", steps=4, sampler="euler-a",
                                                                        seed=2)
    assert float((cpu.pixels - cuda.pixels).abs().max()) <= 1e-3


def test_automatic_attention_slicing_when_memory_is_short(pipe, monkeypatch):
    """8×8 latents, attention at level 1: 16 tokens, 2 heads, 2 rows with guidance: a 4 KiB score matrix. With
    4 KiB free (a quarter of it, 1 KiB, for scores) the U-Net computes 4 query rows at a time — and the same
    numbers."""
    unsliced = pipe.generate(PROMPT, "dark", steps=3, sampler="euler", seed=8)
    assert slice_sizes(pipe) == {None}
    monkeypatch.setattr(runtime, "available_memory", lambda: 4096)
    monkeypatch.setattr(pipeline, "check_generation_memory", lambda *args: None)  # slicing, not refusing, is tested
    sliced = pipe.generate(PROMPT, "dark", steps=3, sampler="euler", seed=8)
    assert sliced.request.attention_slice == 4 and slice_sizes(pipe) == {4}
    assert float((sliced.pixels - unsliced.pixels).abs().max()) <= 1e-4  # other SDPA blocking: ~1e-5
    pipe.generate(PROMPT, "dark", steps=1, sampler="euler", seed=8, attention_slice=0)
    assert slice_sizes(pipe) == {None}


def test_explicit_attention_slice(pipe):
    unsliced = pipe.generate(PROMPT, steps=2, sampler="euler", seed=8, attention_slice=0)
    sliced = pipe.generate(PROMPT, steps=2, sampler="euler", seed=8, attention_slice=3)
    assert slice_sizes(pipe) == {3} and sliced.request.attention_slice == 3
    assert float((sliced.pixels - unsliced.pixels).abs().max()) <= 1e-4  # other SDPA blocking: ~1e-5
    with pytest.raises(ConfigError, match="attention slice"):
        pipe.generate(PROMPT, steps=2, attention_slice=-1)


def test_vae_tile(pipe, picture):
    """An explicit tile decodes (and encodes) in tiles; 0 never tiles."""
    whole = pipe.generate(PROMPT, steps=2, sampler="euler", seed=8, vae_tile=0)
    tiled = pipe.generate(PROMPT, steps=2, sampler="euler", seed=8, vae_tile=32)
    assert torch.equal(whole.latents, tiled.latents) and tiled.request.vae_tile == 32
    vae, scale = pipe.model.vae, pipe.model.config.scaling_factor
    with torch.no_grad():
        assert torch.equal(tiled.pixels, to_unit(vae.tiled_decode(tiled.latents / scale, 32)))
        assert torch.equal(whole.pixels, to_unit(vae.decode(whole.latents / scale)))
        posterior = vae.tiled_encode(torch.zeros(1, 3, 64, 64) + 0.2, 32)
    assert float((tiled.pixels - whole.pixels).abs().max()) > 1e-3
    kept = pipe.generate(PROMPT, steps=2, seed=9, init_image=picture, strength=0.0, vae_tile=32)
    assert kept.latents.shape == posterior.mean.shape
    with pytest.raises(ConfigError, match="multiple of the VAE factor 8"):
        pipe.generate(PROMPT, steps=2, vae_tile=12)


def test_automatic_vae_tile_when_memory_is_short(pipe, monkeypatch):
    monkeypatch.setattr(runtime, "available_memory", lambda: 1 << 20)
    monkeypatch.setattr(pipeline, "check_generation_memory", lambda *args: None)  # slicing, not refusing, is tested
    gen = pipe.generate(PROMPT, steps=1, sampler="euler", seed=8)
    assert gen.request.vae_tile == 512  # larger than the image: decoded whole, same pixels
    assert torch.equal(gen.pixels, pipe.generate(PROMPT, steps=1, sampler="euler", seed=8, vae_tile=0).pixels)


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_a_loaded_pipeline_holds_the_weights_once_and_only_those_a_generation_ran(tmp_path, config):
    """No second copy of the weights: each parameter views its file's map. After a txt2img generation only what it
    ran is resident, not the VAE encoder nor the token embedding's unused rows (most of this toy model's bytes)."""
    save_diffusers(random_model(config, seed=5), tmp_path / "m")
    files = sorted((tmp_path / "m").glob("*/*.safetensors"))
    pipe = pipeline.load(tmp_path / "m")
    model = pipe.model
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == len(files)
    pipe.generate(PROMPT, steps=2, sampler="euler", seed=1, width=64, height=64)
    unused = _bytes(model.vae.encoder.parameters()) + _bytes(model.text_encoder.text_model.embeddings.token_embedding
                                                             .parameters())
    assert unused > 4 << 20
    assert sum(resident_kib(f) for f in files) * 1024 <= _bytes(model.parameters()) - unused + (2 << 20)
