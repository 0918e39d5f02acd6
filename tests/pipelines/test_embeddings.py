"""Textual-inversion embeddings at generation time: the prompt conditioning equals diffusers'
``load_textual_inversion`` + ``encode_prompt`` on the same file (A1111, kohya and diffusers layouts; one and several
vectors; SD 1.x and SD 2.x text-encoder widths), a generation names the embeddings it used, the PNG records their
A1111 hashes and ``reproduce`` checks them."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import TOY_F8, png_pixels, random_model, run_cli
from safetensors.torch import save_file

from nijimi.errors import CheckpointError
from nijimi.io.checkpoint import save_diffusers, save_single
from nijimi.io.embeddings import EmbeddingLibrary, save_embedding
from nijimi.io.imagemeta import read_image_metadata
from nijimi.io.pngmeta import parse_name_hashes
from nijimi.models.ldm import ModelConfig
from nijimi.pipelines.pipeline import Pipeline

TOLERANCE = 1e-5  # max |nijimi − diffusers| of the prompt embeddings, fp32


def wide_config(width: int) -> ModelConfig:
    """TOY_F8 with a one- (SD 1.x) or two-layer (SD 2.x: GELU, penultimate layer, "!" padding) text encoder of the
    real width, over the full CLIP vocabulary."""
    text = dataclasses.replace(TOY_F8.text, width=width, num_layers=1, num_heads=2, mlp_width=64)
    if width == 1024:
        text = dataclasses.replace(text, num_layers=2, activation="gelu", clip_skip=2)
    unet = dataclasses.replace(TOY_F8.unet, context_dim=width)
    return dataclasses.replace(TOY_F8, unet=unet, text=text, family="sd2" if width == 1024 else "sd1",
                               pad_token_id=0 if width == 1024 else 49407)


def write(path, layout: str, vectors: torch.Tensor):
    """``vectors`` in one of the layouts users hold."""
    if layout == "a1111":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "x", "step": 10}, path)
    elif layout == "kohya":
        save_file({"emb_params": vectors}, path)
    else:
        content = {"<concept>": vectors[0] if len(vectors) == 1 else vectors}
        (save_file if path.suffix == ".safetensors" else torch.save)(content, path)
    return path


# (layout, file name, vectors, prompt, negative prompt)
CASES = [
    ("a1111", "ink-style.pt", 3, "a castle, ink-style, at dusk", ""),
    ("kohya", "mychar.safetensors", 2, "portrait of mychar smiling", "blurry mychar"),
    ("diffusers", "learned_embeds.bin", 1, "a learned_embeds toy on a table", ""),
    ("diffusers", "cattoy.safetensors", 4, "cattoy", "cattoy"),
]


@pytest.mark.parametrize("width", [768, 1024], ids=["sd1-768", "sd2-1024"])
def test_conditioning_equals_diffusers_load_textual_inversion(tmp_path, width):
    """Every layout, one to four vectors, in prompts and negative prompts; diffusers loads all files at once (each
    load resizes its 49408-row token table, which takes seconds)."""
    model = random_model(wide_config(width), seed=4)
    save_diffusers(model, tmp_path / "model")
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    ours = Pipeline(model)
    paths = [write(tmp_path / name, layout, torch.randn(count, width, generator=torch.Generator().manual_seed(count)))
             for layout, name, count, _, _ in CASES]
    theirs.load_textual_inversion([str(p) for p in paths], token=[p.stem for p in paths])
    library = EmbeddingLibrary(files=paths, width=width)
    for path, (_, _, _, prompt, negative) in zip(paths, CASES, strict=True):
        expected, expected_negative = theirs.encode_prompt(prompt, "cpu", 1, True, negative)
        conds = ours.conditioner.step_conditioning(prompt, negative, 20, None, True, library)
        assert conds.embeddings == [path.stem]
        assert (conds.cond.at_step(0) - expected[0]).abs().max() <= TOLERANCE
        assert (conds.uncond.at_step(0) - expected_negative[0]).abs().max() <= TOLERANCE
        plain = ours.conditioner.step_conditioning(prompt, negative, 20, None, True)
        assert (plain.cond.at_step(0) - expected[0]).abs().max() > 100 * TOLERANCE  # the embedding mattered


def test_generation_names_the_embeddings_it_used_and_refuses_another_width(tmp_path):
    pipe = Pipeline(random_model(TOY_F8, seed=1))
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_embedding(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), folder / "glow.safetensors")
    save_embedding(torch.randn(1, 32, generator=torch.Generator().manual_seed(1)), folder / "dull.safetensors")
    save_embedding(torch.ones(1, 768), folder / "wide.safetensors")
    run = dict(steps=2, seed=3, width=64, height=64, embeddings_dir=folder)
    used = pipe.generate("a glow cube", "dull, glow", **run)
    assert used.embeddings == {"glow": folder / "glow.safetensors", "dull": folder / "dull.safetensors"}
    plain = pipe.generate("a glow cube", "dull, glow", steps=2, seed=3, width=64, height=64)
    assert plain.embeddings == {} and (used.pixels - plain.pixels).abs().max() > 0.01
    with pytest.raises(CheckpointError, match="wide.safetensors: embedding 'wide' is 768 wide \\(SD 1.x\\); this "
                                              "model's text encoder is 32 wide$"):
        pipe.generate("a wide cube", **run)


def test_ti_hashes_in_the_infotext_and_reproduce_checks_them(capsys, tmp_path):
    """``TI hashes: "glow: <sha256[:12]>, dull: …"`` as A1111 writes it (the prompt's embeddings, then the negative
    prompt's), read back by name; ``reproduce`` finds the same files and refuses changed ones, writing nothing."""
    model_file = tmp_path / "tiny.safetensors"
    save_single(random_model(TOY_F8, seed=1), model_file)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_embedding(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), folder / "glow.safetensors")
    save_embedding(torch.randn(1, 32, generator=torch.Generator().manual_seed(1)), folder / "dull.safetensors")
    digest = {name: hashlib.sha256((folder / f"{name}.safetensors").read_bytes()).hexdigest()[:12]
              for name in ("glow", "dull")}
    first = tmp_path / "a.png"
    code, _, err = run_cli(capsys, "generate", "a glow cube", "-n", "dull, glow", "--model", model_file,
                           "--embeddings-dir", folder, "--seed", 2, "--steps", 2, "--size", "64x64", "--quiet",
                           "--out", first)
    assert (code, err) == (0, "")
    meta = read_image_metadata(first)
    expected = f"glow: {digest['glow']}, dull: {digest['dull']}"
    assert meta["parameters"].endswith(f'TI hashes: "{expected}"')
    assert meta["settings"]["TI hashes"] == expected
    assert parse_name_hashes(meta["settings"]["TI hashes"]) == digest == meta["recipe"]["embeddings"]
    assert meta["recipe"]["request"]["embeddings_dir"] == str(folder)
    assert run_cli(capsys, "reproduce", first, "--out", tmp_path / "b.png", "--quiet")[:2] == (0, f"{tmp_path}/b.png\n")
    assert np.array_equal(png_pixels(first), png_pixels(tmp_path / "b.png"))
    save_embedding(torch.zeros(2, 32), folder / "glow.safetensors")
    code, out, err = run_cli(capsys, "reproduce", first, "--out", tmp_path / "c.png", "--quiet")
    assert (code, out) == (2, "") and err.startswith("error: the prompts used the embeddings {'glow': ")
    assert err.count("\n") == 1 and "the embedding files have changed" in err and not (tmp_path / "c.png").exists()
