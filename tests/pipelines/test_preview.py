"""Previews: the linear latent → RGB map is the least-squares fit to the VAE (exact for a linear decoder, close to the
embedded model's decoded images), ``Pipeline.preview`` turns a step callback's x̂₀ into pixels, ``--preview FILE``."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize
from PIL import Image
from safetensors.torch import save_file

from nijimi.errors import NijimiError
from nijimi.models.taesd import TAESD, TAESDConfig
from nijimi.pipelines.pipeline import Pipeline, load
from nijimi.pipelines.preview import fit_latent_rgb, save_preview
from nijimi.pipelines.request import GenerationRequest
from nijimi.ui.generate import run_generation

PROMPT = "a small house by a lake"


class LinearVAE(torch.nn.Module):
    """A 'VAE' whose decode is ``W z + b`` per latent cell, repeated over its f × f pixels, in [-1, 1]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, factor: int) -> None:
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
        self.config = SimpleNamespace(z_channels=weight.shape[1], downscale_factor=factor)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("rc,bchw->brhw", self.weight, z) + self.bias.view(1, 3, 1, 1)
        return F.interpolate(rgb * 2 - 1, scale_factor=self.config.downscale_factor)


def test_fit_recovers_a_linear_decoder():
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)) * 0.02
    bias = torch.tensor([0.5, 0.4, 0.6])
    fitted = fit_latent_rgb(LinearVAE(weight, bias, 4))
    assert torch.allclose(fitted.weight, weight, atol=1e-5) and torch.allclose(fitted.bias, bias, atol=1e-5)
    z = torch.randn(2, 4, 3, 5)
    assert fitted(z).shape == (2, 3, 12, 20)


def test_preview_is_close_to_the_embedded_models_image():
    """Mean |preview − VAE image| over pixels in [0, 1]; measured 0.017–0.082 on the model card's prompts."""
    pipe = load("embedded")
    for prompt in ("a large red circle in the center", "a green square on the left and a yellow star on the right"):
        gen = pipe.generate(prompt, steps=12, seed=3)
        assert float((pipe.preview(gen.latents) - gen.pixels).abs().mean()) < 0.12


def test_callback_previews_every_step(make_model, config, tmp_path):
    pipe = Pipeline(make_model(config, seed=5))
    previews = []
    gen = pipe.generate(PROMPT, steps=3, seed=1, width=64, height=48, callback=lambda info: previews.append(
        pipe.preview(info.denoised)))
    assert [p.shape for p in previews] == [(1, 3, 48, 64)] * 3
    assert all(0 <= float(p.min()) and float(p.max()) <= 1 for p in previews)
    assert pipe.latent_rgb is not None and torch.equal(pipe.preview(gen.latents), pipe.latent_rgb(gen.latents))
    taesd = TAESD(TAESDConfig.sd(), encoder=False)
    randomize(taesd, 1)
    save_file(taesd.decoder.state_dict(), tmp_path / "taesd_decoder.safetensors")
    tiny = f"tiny:{tmp_path / 'taesd_decoder.safetensors'}"
    assert torch.equal(pipe.preview(gen.latents, tiny), pipe.decode(gen.latents, decoder=tiny))


def test_preview_file_shows_the_batch_in_a_row(make_model, config, tmp_path):
    """After the last euler step x̂₀ is the final latent, so the file holds the preview of ``Generation.latents``."""
    pipe = Pipeline(make_model(config, seed=5))
    request = GenerationRequest(PROMPT, steps=2, sampler="euler", seed=1, batch=2, width=64, height=48)
    run_generation(pipe, request, str(tmp_path / "out.png"), False, True, preview=str(tmp_path / "preview.png"))
    expected = torch.cat(list(pipe.preview(pipe.generate(request).latents)), dim=2)
    shown = torch.tensor(np.array(Image.open(tmp_path / "preview.png"))).permute(2, 0, 1) / 255
    assert shown.shape == (3, 48, 128) and float((shown - expected).abs().max()) <= 1 / 255


def test_unwritable_preview_names_the_file(tmp_path):
    with pytest.raises(NijimiError, match="missing/preview.png: cannot write the preview"):
        save_preview(torch.zeros(1, 3, 8, 8), tmp_path / "missing" / "preview.png")
