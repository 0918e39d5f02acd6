"""A1111's variation seeds and seed resize through the pipeline and the CLI: off, they change nothing; at strength 1
the variation seed's picture; recorded in the infotext and replayed by ``nijimi reproduce``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nijimi.cli import main
from nijimi.errors import ConfigError
from nijimi.io.imagemeta import read_image_metadata
from nijimi.pipelines.request import GenerationRequest

FAST = {"steps": 3, "width": 64, "height": 64}


def test_off_is_bit_identical_and_strength_one_is_the_variation_seeds_generation(sd_nijimi):
    plain = sd_nijimi.generate("a red cube", seed=3, batch=2, **FAST)
    off = sd_nijimi.generate("a red cube", seed=3, batch=2, variation_seed=40, seed_resize=(64, 64), **FAST)
    assert torch.equal(off.latents, plain.latents) and torch.equal(off.pixels, plain.pixels)
    other = sd_nijimi.generate("a red cube", seed=40, batch=2, **FAST)
    full = sd_nijimi.generate("a red cube", seed=3, batch=2, variation_seed=40, variation_strength=1.0, **FAST)
    assert torch.equal(full.latents, other.latents)
    half = sd_nijimi.generate("a red cube", seed=3, variation_seed=40, variation_strength=0.5, **FAST)
    assert not torch.equal(half.latents, plain.latents[:1]) and not torch.equal(half.latents, other.latents[:1])
    resized = sd_nijimi.generate("a red cube", seed=3, seed_resize=(32, 48), **FAST)
    assert not torch.equal(resized.latents, plain.latents[:1])


def test_img2img_noise_varies_too(sd_nijimi, picture):
    plain = sd_nijimi.generate("a red cube", seed=3, init_image=picture, strength=0.8, **FAST)
    off = sd_nijimi.generate("a red cube", seed=3, init_image=picture, strength=0.8, variation_seed=1, **FAST)
    varied = sd_nijimi.generate("a red cube", seed=3, init_image=picture, strength=0.8, variation_seed=1,
                                variation_strength=0.7, **FAST)
    assert torch.equal(off.latents, plain.latents) and not torch.equal(varied.latents, plain.latents)


@pytest.mark.parametrize("bad", [{"variation_strength": 1.5}, {"variation_strength": -0.1},
                                 {"variation_seed": -1}, {"variation_seed": 2**64 - 1, "batch": 2},
                                 {"seed_resize": (500, 512)}, {"seed_resize": (512,)}, {"seed_resize": "512x512"}])
def test_bad_variation_fields_are_refused(bad):
    with pytest.raises(ConfigError, match="variation|seed_resize"):
        GenerationRequest("a", **bad)


def test_a_variation_strength_without_a_seed_draws_one_and_the_recipe_round_trips():
    request = GenerationRequest("a", variation_strength=0.2, seed_resize=[64, 128])
    assert isinstance(request.variation_seed, int) and request.seed_resize == (64, 128)
    assert GenerationRequest.from_dict(request.to_dict()) == request
    assert request.single(2).variation_seed == request.variation_seed + 2
    assert GenerationRequest("a").variation_seed is None


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_the_cli_records_variations_as_a1111_does_and_reproduce_replays_them(capsys, sd_folder, tmp_path):
    out = tmp_path / "v.png"
    argv = ["generate", "a red cube", "--model", sd_folder, "--seed", 5, "--steps", 3, "--size", "64x64", "--quiet",
            "--variation-seed", 9, "--variation-strength", 0.25, "--seed-resize", "48x80", "--batch", 2, "--out", out]
    assert main([str(a) for a in argv]) == 0
    first, second = sorted(tmp_path.glob("v*.png"))
    settings = read_image_metadata(second)["settings"]
    assert (settings["Seed"], settings["Variation seed"], settings["Variation seed strength"],
            settings["Seed resize from"]) == (6, 10, 0.25, (48, 80))
    keys = list(settings)
    assert keys.index("Seed") < keys.index("Variation seed") < keys.index("Seed resize from")
    again = tmp_path / "again.png"
    found = ["--models-dir", str(sd_folder.parent)]  # the recipe names the model by name and hash
    assert main(["reproduce", str(second), "--out", str(again), "--quiet", *found]) == 0
    assert read_image_metadata(again)["recipe"] == read_image_metadata(second)["recipe"]
    difference = np.abs(pixels(second).astype(int) - pixels(again).astype(int))
    assert difference.max() <= 1  # batched convolutions round differently (~1e-5), a rare ±1 after uint8 rounding
    single, again = tmp_path / "single.png", tmp_path / "single-again.png"
    assert main([str(a) for a in [*argv[:-4], "--out", single]]) == 0
    assert main(["reproduce", str(single), "--out", str(again), "--quiet", *found]) == 0
    assert np.array_equal(pixels(single), pixels(again))
    assert not np.array_equal(pixels(first), pixels(second))
    plain = tmp_path / "plain.png"
    assert main([str(a) for a in [*argv[:6], "--steps", 3, "--size", "64x64", "--quiet", "--out", plain]]) == 0
    assert not {"Variation seed", "Variation seed strength", "Seed resize from"} & set(
        read_image_metadata(plain)["settings"])
    assert not np.array_equal(pixels(first), pixels(plain))
    capsys.readouterr()
