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

from nijimi.cli import run_generation
from nijimi.errors import NijimiError
from nijimi.models.taesd import TAESD, TAESDConfig
from nijimi.pipelines.pipeline import Pipeline, load
from nijimi.pipelines.preview import fit_latent_rgb, save_preview
from nijimi.pipelines.request import GenerationRequest

PROMPT = "a small house by a lake"


class LinearVAE(torch.nn.Module):
    """A 'VAE' whose latent cell is ``mix · (mean colour of its f × f pixels) + shift``: colours are linear in z."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.mix, self.shift = torch.nn.Parameter(torch.randn(4, 3, generator=gen)), torch.nn.Parameter(torch.randn(4))
        self.config = SimpleNamespace(z_channels=4, downscale_factor=factor, scaling_factor=1.0)

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        colour = F.avg_pool2d((x + 1) / 2, self.config.downscale_factor)
        return SimpleNamespace(mean=torch.einsum("cr,brhw->bchw", self.mix, colour) + self.shift.view(1, 4, 1, 1))


def test_fit_inverts_a_linear_encoder():
    vae = LinearVAE(4)
    fitted = fit_latent_rgb(vae)
    colours = torch.rand(2, 3, 3, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        shown = fitted(vae.encode(F.interpolate(colours, scale_factor=4) * 2 - 1).mean)
    assert shown.shape == (2, 3, 12, 20)
    assert torch.allclose(shown, F.interpolate(colours, scale_factor=4, mode="bilinear"), atol=1e-4)


def test_preview_is_close_to_the_embedded_models_image():
    """Mean |preview − VAE image| over pixels in [0, 1], and over the shapes' pixels alone (not white)."""
    pipe = load("embedded")
    for prompt in ("a large red circle in the center", "a green square on the left and a yellow star on the right"):
        gen = pipe.generate(prompt, steps=12, seed=3)
        error = (pipe.preview(gen.latents) - gen.pixels).abs()
        shapes = (gen.pixels.min(1, keepdim=True).values < 0.8).expand_as(error)
        assert float(error.mean()) < 0.1 and float(error[shapes].mean()) < 0.2, prompt


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
