"""Small random-weight SD 1.x models for the pipeline tests (txt2img, img2img, inpainting, conditioning), the same
models saved as diffusers folders and loaded back by diffusers' own StableDiffusionPipeline, and test pictures.

The models have SD's architecture at toy size: a 2-level U-Net (attention at level 1, 2 heads, 32-wide context), a
4-level VAE (factor 8, like SD's, so diffusers' ``vae_scale_factor`` agrees), a 2-layer CLIP text encoder over the
full CLIP vocabulary. Their weights are perturbed away from the init so every part (the VAE's posterior std too)
matters. 64×64 images are 8×8 latents: a whole generation takes well under a second.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
from helpers import TOY_F8, random_model
from PIL import Image, ImageDraw

from nijimi.io.checkpoint import save_diffusers
from nijimi.models.ldm import ModelConfig
from nijimi.pipelines.pipeline import Pipeline, load

SIZE = 64
CONFIG = TOY_F8
INPAINT_CONFIG = dataclasses.replace(CONFIG, unet=dataclasses.replace(CONFIG.unet, in_channels=9))


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory) -> Path:
    """The 4-channel model saved with nijimi's ``save_diffusers``."""
    folder = tmp_path_factory.mktemp("sd") / "model"
    save_diffusers(random_model(CONFIG, seed=1), folder)
    return folder


@pytest.fixture(scope="session")
def inpaint_folder(tmp_path_factory) -> Path:
    """The 9-channel inpainting model saved with nijimi's ``save_diffusers``."""
    folder = tmp_path_factory.mktemp("sd_inpaint") / "model"
    save_diffusers(random_model(INPAINT_CONFIG, seed=2), folder)
    return folder


@pytest.fixture(scope="session")
def sd_diffusers(sd_folder) -> StableDiffusionPipeline:
    """diffusers' own pipeline loaded from the folder nijimi wrote (fp32, CPU, no progress bars)."""
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def inpaint_diffusers(inpaint_folder) -> StableDiffusionInpaintPipeline:
    """The inpainting folder through ``StableDiffusionPipeline.from_pretrained`` (its components; the folder's
    model_index.json lacks ``_diffusers_version``, which ``StableDiffusionInpaintPipeline.from_pretrained`` needs)."""
    loaded = StableDiffusionPipeline.from_pretrained(inpaint_folder, safety_checker=None)
    pipe = StableDiffusionInpaintPipeline(**loaded.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_picture(seed: int = 0, size: int = SIZE) -> Image.Image:
    """Smooth colour ramps plus noise and a dark disc: every part of the VAE's input range is used."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 1 - (x + y) / 2], axis=-1) * 200 + rng.uniform(0, 55, (size, size, 3))
    image = Image.fromarray(rgb.astype(np.uint8))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, size // 2, size // 2), fill=(20, 10, 30))
    return image


def make_mask(size: int = SIZE) -> Image.Image:
    """White (repaint) on the right half's middle band, black elsewhere; edges on the 8-pixel latent grid."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 2, size // 4, size - 1, 3 * size // 4 - 1), fill=255)
    return mask


def _max_abs(ours: torch.Tensor, theirs: np.ndarray) -> float:
    """Max |nijimi − diffusers| over pixels in [0, 1]; ours (B, 3, H, W), theirs (B, H, W, 3) (output_type="np")."""
    return float(np.abs(ours.permute(0, 2, 3, 1).numpy() - theirs).max())


# Test modules cannot import this file (importlib import mode): its helpers reach them as fixtures.

@pytest.fixture
def picture() -> Image.Image:
    return make_picture()


@pytest.fixture
def mask() -> Image.Image:
    return make_mask()


@pytest.fixture(scope="session")
def config() -> ModelConfig:
    return CONFIG


@pytest.fixture(scope="session")
def inpaint_config() -> ModelConfig:
    return INPAINT_CONFIG


@pytest.fixture(scope="session")
def make_model():
    """``make_model(config, seed)`` → :func:`random_model`."""
    return random_model


@pytest.fixture(scope="session")
def max_abs():
    return _max_abs


@pytest.fixture(scope="session")
def sd_nijimi(sd_folder) -> Pipeline:
    """nijimi's pipeline over the same folder (read back by nijimi's loader)."""
    return load(sd_folder)


@pytest.fixture(scope="session")
def inpaint_nijimi(inpaint_folder) -> Pipeline:
    return load(inpaint_folder)
