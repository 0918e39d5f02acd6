"""``vae``: a request decodes (and img2img encodes) with another VAE for that call only, and its decode is diffusers'
AutoencoderKL's of the same file or folder; without it, generation is what it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from helpers import randomize
from safetensors.torch import save_file

from nijimi.errors import CheckpointError, ConfigError
from nijimi.io.keys.vae import vae_config_to_diffusers, vae_key_table
from nijimi.io.vae_file import load_vae
from nijimi.pipelines.pipeline import Pipeline

TOLERANCE = 1e-4  # max |nijimi − diffusers| on pixels in [0, 1], fp32
PROMPT = "a small house by a lake"
ARGS = {"steps": 2, "sampler": "euler", "seed": 1}


@pytest.fixture(scope="module")
def other(config, tmp_path_factory) -> tuple[AutoencoderKL, dict]:
    """A random diffusers AutoencoderKL for the model's latents, saved by diffusers as a folder and in the original
    layout (with ``first_stage_model.``) as a file."""
    theirs = AutoencoderKL.from_config(vae_config_to_diffusers(config.vae)).eval()
    randomize(theirs, 11)
    root = tmp_path_factory.mktemp("vae")
    theirs.save_pretrained(root / "folder")
    native = vae_key_table(config.vae).to_native(theirs.state_dict())
    save_file({"first_stage_model." + k: v.contiguous() for k, v in native.items()}, root / "vae.safetensors")
    return theirs, {"folder": str(root / "folder"), "file": str(root / "vae.safetensors")}


@pytest.fixture(scope="module")
def pipe(make_model, config) -> Pipeline:
    return Pipeline(make_model(config, seed=5))


@pytest.mark.parametrize("layout", ["file", "folder"])
@torch.no_grad()
def test_swapped_decode_equals_diffusers(pipe, other, config, layout):
    theirs, paths = other
    own = pipe.model.vae
    plain = pipe.generate(PROMPT, **ARGS)
    swapped = pipe.generate(PROMPT, vae=paths[layout], **ARGS)
    assert pipe.model.vae is own and torch.equal(swapped.latents, plain.latents)
    assert swapped.request.vae == paths[layout]
    reference = (theirs.decode(swapped.latents / config.vae.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert (swapped.pixels - reference).abs().max() < TOLERANCE
    assert (plain.pixels - swapped.pixels).abs().max() > 1e-2  # the swap changed the picture
    assert torch.equal(pipe.generate(PROMPT, **ARGS).pixels, plain.pixels)


def test_img2img_encodes_and_decodes_with_the_swapped_vae(pipe, other, make_model, config, picture):
    path = other[1]["file"]
    model = make_model(config, seed=5)
    model.vae.load_state_dict(load_vae(path, config.vae).state_dict())
    swapped = pipe.generate(PROMPT, vae=path, init_image=picture, strength=0.6, **ARGS)
    reference = Pipeline(model).generate(PROMPT, init_image=picture, strength=0.6, **ARGS)
    assert torch.equal(swapped.latents, reference.latents) and torch.equal(swapped.pixels, reference.pixels)
    assert list(pipe.vaes) == [Path(path)]
    assert set(pipe.model.state_dict()) == set(model.state_dict())


def test_other_latents_are_refused_and_the_vae_is_restored(pipe, tmp_path):
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "broken.safetensors")
    own = pipe.model.vae
    with pytest.raises(CheckpointError, match="broken.safetensors: not an SD VAE"):
        pipe.generate(PROMPT, vae=tmp_path / "broken.safetensors", **ARGS)
    assert pipe.model.vae is own
    with pytest.raises(ConfigError, match="vae 3 must be a file or folder path"):
        pipe.generate(PROMPT, vae=3, **ARGS)
