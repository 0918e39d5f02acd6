"""The shipped embedded model: small fp16 weights in the package, loaded by name, drawing what it is asked for."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

import nijimi
from nijimi import cli
from nijimi.cli import DEMO_PROMPT
from nijimi.embedded import ADAPTERS, CONTROLNET, WEIGHTS
from nijimi.eval.adherence import mask_iou, score, shape_coverage
from nijimi.io.imagemeta import read_image_metadata
from nijimi.io.safetensors import read_header, read_metadata
from nijimi.io.taesd import load_taesd
from nijimi.pipelines.adapters import lora_requests
from nijimi.pipelines.images import to_pil, to_unit
from nijimi.train.controlnet import scene_mask
from nijimi.train.shapes import COLOURS, CONCEPT_COLOURS, ShapesDataset

PINK_SEED = 2
LCM_CAPTION, LCM_SEED = "a blue square on the left and a yellow star on the right", 0
CONTROL_SCENES = 8


def test_weights_ship_small_and_half_precision():
    shipped = [WEIGHTS, CONTROLNET, *ADAPTERS.glob("*.safetensors")]
    assert len(shipped) == 4 and sum(p.stat().st_size for p in shipped) <= 40 * 2**20
    assert {info.dtype for info in read_header(WEIGHTS).values()} == {"F16"}


def test_demo_draws_the_prompts_colours_and_shapes(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "demo.png"), str(tmp_path / "grid.png")]
    demo = Image.open(tmp_path / "demo.png")
    assert demo.size == (64, 64) and "Steps: 20" in demo.info["parameters"]
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    assert grid.size == (256, 256)
    first = grid.crop((0, 0, 64, 64))  # "a large red circle in the center", seed 0
    assert score(first, "a large red circle in the center").correct
    assert score(demo, DEMO_PROMPT).correct  # "a red circle on the left and a blue square on the right"


def test_load_by_name_generates_at_the_native_size():
    pipe = nijimi.load("embedded")
    image = pipe.generate("a large blue star at the top", steps=20, seed=3).images[0]
    verdict = score(image, "a large blue star at the top")
    assert image.size == (64, 64) and verdict.correct  # colour, shape, size, place and count


def test_load_passes_device_and_dtype():
    pipe = nijimi.load("embedded", device="cpu", dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and next(pipe.model.unet.parameters()).dtype == torch.bfloat16
    assert next(pipe.model.vae.parameters()).dtype == torch.float32 and pipe.device == torch.device("cpu")


def test_demo_adapter_teaches_pink():
    """The shipped LoCon (`--lora pink`, trained on 64 pink scenes) draws a colour the base model has never seen, and
    at the CFG the README advises, the whole caption."""
    pipe = nijimi.load("embedded")
    caption, palette = "a large pink circle in the center", {**COLOURS, **CONCEPT_COLOURS}
    metadata = read_metadata(ADAPTERS / "pink.safetensors")
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_num_train_images"] == "64"
    assert json.loads(metadata["ss_network_args"])["conv_dim"] == "4"
    plain = pipe.generate(caption, seed=PINK_SEED).images[0]
    tuned = pipe.generate(caption, seed=PINK_SEED, loras=lora_requests(["pink"])).images[0]
    assert not score(plain, caption, palette=palette).colour
    assert score(tuned, caption, palette=palette).colour
    star = "a large pink star on the left"
    drawn = pipe.generate(star, guidance=4, seed=0, loras=lora_requests(["pink"])).images[0]
    assert score(drawn, star, palette=palette).correct


def test_lcm_adapter_draws_the_caption_in_two_and_four_steps():
    """The shipped LCM-LoRA (`--lora lcm`, distilled by ``train-adapter --type lcm``) at its recipe: LCM sampler, no
    CFG, 4 steps — and 2."""
    pipe, caption = nijimi.load("embedded"), LCM_CAPTION
    assert read_metadata(ADAPTERS / "lcm.safetensors")["nijimi_sampler"] == "lcm"
    for steps in (4, 2):
        image = pipe.generate(caption, sampler="lcm", steps=steps, guidance=1.0, seed=LCM_SEED,
                              loras=lora_requests(["lcm"])).images[0]
        assert score(image, caption).correct, steps


def test_demo_controlnet_places_objects_on_the_mask(tmp_path):
    """`--control model=embedded,image=MASK` draws the objects where a silhouette mask says: ``nijimi eval control``'s
    measure (mask IoU) on the first held-out scenes, with the seeds the evaluation gives them, against the same
    generations without the ControlNet (whose objects sit in the caption's places too, but not on the mask)."""
    scenes = ShapesDataset(64, seed=0, split="heldout", count=CONTROL_SCENES)
    controlled, free = [], []
    for i in range(CONTROL_SCENES):
        mask = scene_mask(scenes.scene(i), 64)
        Image.fromarray((mask * 255).round().astype(np.uint8)).convert("RGB").save(tmp_path / "mask.png")
        for control, ious in ((["--control", f"model=embedded,image={tmp_path / 'mask.png'}"], controlled), ([], free)):
            out = tmp_path / f"{i}-{len(control)}.png"
            assert cli.main(["generate", scenes.caption(i), "--seed", str(i), "--out", str(out), "--quiet",
                             *control]) == 0
            ious.append(mask_iou(shape_coverage(np.asarray(Image.open(out).convert("RGB"))) >= 0.5, mask >= 0.5))
    assert np.mean(controlled) >= 0.8 and np.mean(controlled) >= np.mean(free) + 0.1, (controlled, free)


def test_generate_decoder_tiny_decodes_with_the_shipped_taesd(tmp_path):
    """`--decoder tiny` on the embedded model finds the TAESD decoder shipped beside its weights (fp16, small): the
    image is that decoder's picture of the latents the VAE would have decoded, and reads as the caption."""
    shipped = WEIGHTS.with_name("taesd_decoder.safetensors")
    assert shipped.stat().st_size <= 2**20 and {info.dtype for info in read_header(shipped).values()} == {"F16"}
    caption, out = "a large blue star at the top", tmp_path / "tiny.png"
    assert cli.main(["generate", caption, "--seed", "3", "--decoder", "tiny", "--out", str(out), "--quiet"]) == 0
    vae = nijimi.load("embedded").generate(caption, seed=3)
    with torch.no_grad():
        expected = np.asarray(to_pil(to_unit(load_taesd(shipped).decode_latents(vae.latents)))[0])
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(drawn, expected) and not np.array_equal(drawn, np.asarray(vae.images[0]))
    assert read_image_metadata(out)["recipe"]["request"]["decoder"] == "tiny"
    assert score(drawn, caption).correct and score(vae.images[0], caption).correct
