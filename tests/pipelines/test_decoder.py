"""``decoder``: the VAE by default (bit for bit the plain VAE decode), or a TAESD decoder from a file (``tiny:PATH``)
or shipped beside the model's weights (``tiny``). The TAESD weights are random (fitting one is a training run), so
the tiny path is checked for what it decodes, not for resemblance to the VAE's picture."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize
from safetensors.torch import save_file

from nijimi.errors import CheckpointError, ConfigError
from nijimi.io.checkpoint import save_single
from nijimi.models.taesd import TAESD, TAESDConfig
from nijimi.pipelines.images import to_unit
from nijimi.pipelines.pipeline import Pipeline, load

PROMPT = "a small house by a lake"
SD = TAESDConfig.sd()


def tiny_file(path, cfg: TAESDConfig = SD, seed: int = 0) -> TAESD:
    """A random TAESD whose decoder is saved at ``path`` in the published layout; returns it."""
    taesd = TAESD(cfg, encoder=False).eval()
    randomize(taesd, seed)
    save_file(taesd.decoder.state_dict(), path)
    return taesd


@pytest.fixture(scope="module")
def pipe(make_model, config) -> Pipeline:
    return Pipeline(make_model(config, seed=5))


def test_vae_is_the_plain_vae_decode(pipe):
    default = pipe.generate(PROMPT, steps=2, sampler="euler", seed=1, width=64, height=48)
    vae = pipe.generate(PROMPT, steps=2, sampler="euler", seed=1, width=64, height=48, decoder="vae")
    assert default.request.decoder == "vae" and torch.equal(default.pixels, vae.pixels)
    assert torch.equal(vae.pixels, to_unit(pipe.model.vae.decode_latents(vae.latents)))


@torch.no_grad()
def test_tiny_path_decodes_the_same_latents(pipe, tmp_path):
    taesd = tiny_file(tmp_path / "taesd_decoder.safetensors")
    vae = pipe.generate(PROMPT, steps=2, sampler="euler", seed=1, width=64, height=48)
    tiny = pipe.generate(PROMPT, steps=2, sampler="euler", seed=1, width=64, height=48,
                         decoder=f"tiny:{tmp_path / 'taesd_decoder.safetensors'}")
    assert torch.equal(tiny.latents, vae.latents) and tiny.images[0].size == (64, 48)
    assert torch.equal(tiny.pixels, to_unit(taesd.decode_latents(tiny.latents)))
    assert tiny.request.to_dict()["decoder"] == f"tiny:{tmp_path / 'taesd_decoder.safetensors'}"
    assert pipe.tiny_decoder(tiny.request.decoder) is pipe.tiny_decoders[tmp_path / "taesd_decoder.safetensors"]


def test_tiny_beside_the_model(make_model, config, tmp_path):
    save_single(make_model(config, seed=5), tmp_path / "model.safetensors")
    pipe = load(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="taesd_decoder.safetensors: the model ships no tiny decoder here"):
        pipe.generate(PROMPT, steps=1, seed=1, decoder="tiny")
    taesd = tiny_file(tmp_path / "taesd_decoder.safetensors")
    gen = pipe.generate(PROMPT, steps=1, seed=1, decoder="tiny")
    with torch.no_grad():
        assert torch.equal(gen.pixels, to_unit(taesd.decode_latents(gen.latents)))


def test_unfit_decoders_are_refused(pipe, make_model, config, tmp_path):
    tiny_file(tmp_path / "f4.safetensors", TAESDConfig.tiny())
    with pytest.raises(CheckpointError, match="f4.safetensors: holds a TAESD decoder of factor 4 for 4 latent "
                                              "channels; this model needs a TAESD decoder of factor 8"):
        pipe.decode(torch.zeros(1, 4, 8, 8), decoder=f"tiny:{tmp_path / 'f4.safetensors'}")
    encoder = TAESD(SD, decoder=False)
    save_file(encoder.encoder.state_dict(), tmp_path / "taesd_encoder.safetensors")
    with pytest.raises(CheckpointError, match="holds no decoder"):
        pipe.decode(torch.zeros(1, 4, 8, 8), decoder=f"tiny:{tmp_path / 'taesd_encoder.safetensors'}")
    with pytest.raises(ConfigError, match="not loaded from a file"):
        Pipeline(make_model(config, seed=5)).decode(torch.zeros(1, 4, 8, 8), decoder="tiny")
