"""ControlNet training (nijimi/train/controlnet.py) on a tiny random base: the loss falls, every base weight stays
bit-identical, kill-and-resume equals an uninterrupted run, the saved file is the trained ControlNet; condition maps
from scene geometry, image masks, thresholds and canny; the IoU evaluation against known answers."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import TOY_F4, random_model
from PIL import Image

from nijimi.errors import ConfigError
from nijimi.eval.adherence import accuracy, evaluate_control, format_control_table, mask_iou
from nijimi.io.controlnet import load_controlnet
from nijimi.models.ldm import LatentDiffusion
from nijimi.pipelines.control_maps import canny
from nijimi.train.config import build_config, read_toml
from nijimi.train.controlnet import (
    ControlNetTrainConfig,
    ControlPairs,
    foreground,
    hint_widths_for,
    prepare_training,
    scene_mask,
    to_uint8,
    train_controlnet,
)
from nijimi.train.data import ImageFolder
from nijimi.train.ldm import DiffusionObjective
from nijimi.train.shapes import COLOURS, Scene, Shape, ShapesDataset, render
from nijimi.train.trainer import step_generator

# A 32×32-pixel model with a factor-4 VAE (like the embedded model's): 8×8 latents, a 3-level hint encoder.
CONFIG = TOY_F4


def make_base() -> LatentDiffusion:
    """The same random base every call (:func:`helpers.random_model`, the global RNG untouched)."""
    return random_model(CONFIG, 0)


def config(tmp_path, **kwargs) -> ControlNetTrainConfig:
    settings = {"out": str(tmp_path / "cn.safetensors"), "data_count": 8, "steps": 30, "batch_size": 4, "lr": 3e-3,
                "warmup_steps": 2, "sample_every": 0, "save_every": 10, **kwargs}
    return ControlNetTrainConfig(**settings)


def test_training_lowers_the_loss_and_leaves_the_base_bit_identical(tmp_path):
    base = make_base()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    run = prepare_training(config(tmp_path), base=base)
    objective, batch = run.trainer.module, list(range(8))
    assert set(objective.state_dict()) == {f"controlnet.{k}" for k in run.controlnet.state_dict()}
    assert run.controlnet.config.hint_widths == (16, 32, 96) == hint_widths_for(CONFIG)
    with torch.no_grad():
        before = objective(batch, step_generator(123, 0), slice(None)).item()
    run.trainer.run()
    with torch.no_grad():
        after = objective(batch, step_generator(123, 0), slice(None)).item()
    assert after < 0.9 * before  # measured 1.31 → 1.04
    assert all(torch.equal(v, frozen[k]) for k, v in base.state_dict().items())
    assert not any(p.requires_grad for p in base.parameters())
    assert run.controlnet.middle_block_out[0].weight.abs().max() > 0  # the zero convolutions left zero


def test_the_controlnet_objective_makes_the_diffusion_objectives_draws():
    """Both objectives draw through ``draw_diffusion_batch``: the same generator gives the locked U-Net the same
    x_t, timesteps and (caption-dropped) text conditioning."""
    base, shapes = make_base(), ShapesDataset(32, seed=0, count=8)
    seen: list = []
    base.unet.register_forward_pre_hook(lambda module, args: seen.append([a.clone() for a in args]))
    controlnet = prepare_training(config(Path("unused")), base=base).trainer.module
    plain = DiffusionObjective(base, shapes, caption_dropout=0.5, min_snr_gamma=None, train_text_encoder=False)
    with torch.no_grad():
        for objective in (controlnet, plain):
            objective(list(range(8)), step_generator(5, 0), slice(2, 6))
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(*seen, strict=True))


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    full = train_controlnet(config(tmp_path / "full", steps=6, save_every=3), base=make_base())
    cfg = config(tmp_path / "part", steps=6, save_every=3)
    prepare_training(cfg, base=make_base()).trainer.run(until=3)  # "killed" after the checkpoint at step 3
    resumed = train_controlnet(cfg, base=make_base(), resume=True)
    assert resumed.trainer.losses == full.trainer.losses and len(full.trainer.losses) == 6
    saved_full, _ = load_controlnet(tmp_path / "full" / "cn.safetensors")
    saved_resumed, report = load_controlnet(tmp_path / "part" / "cn.safetensors")
    assert report.config == full.controlnet.config and report.config_source == "metadata"
    for (name, a), b, live in zip(saved_full.state_dict().items(), saved_resumed.state_dict().values(),
                                  full.controlnet.state_dict().values(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, live), name


def test_the_demo_recipe_is_a_valid_config():
    cfg = build_config(ControlNetTrainConfig, read_toml(Path(__file__).parents[2] / "configs/controlnet-shapes.toml"))
    assert (cfg.base, cfg.data, cfg.condition, cfg.caption_dropout) == ("embedded", "shapes", "mask", 0.5)
    assert cfg.out.endswith(".safetensors") and cfg.half  # shipped in fp16 beside the embedded model


def test_training_refuses_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="out 'cn.pt': ControlNets are written as .safetensors"):
        ControlNetTrainConfig(out="cn.pt")
    with pytest.raises(ConfigError, match="caption_dropout must be within"):
        ControlNetTrainConfig(caption_dropout=1.5)
    (tmp_path / "cn.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="cn.safetensors exists; use --overwrite"):
        train_controlnet(config(tmp_path), base=make_base())
    with pytest.raises(ConfigError, match="condition 'canny' needs its preprocessor"):
        ControlPairs(ShapesDataset(32, count=2), "canny")
    with pytest.raises(ConfigError, match="image size 36 must be a positive multiple of 8"):
        prepare_training(config(tmp_path / "b", size=36), base=make_base())


# ---- condition maps -----------------------------------------------------------------------------------------------

def test_scene_mask_is_the_renderer_coverage():
    """Each object's rendering is white mixed with its colour by the mask; a circle's mask adds up to π r²."""
    circle = Shape("purple", "circle", "large", "center", 0.5, 0.5, 0.22)
    star = Shape("yellow", "star", "small", "left", 0.25, 0.5, 0.13)
    for obj in (circle, star):
        mask = scene_mask(Scene((obj,)), 64)
        redrawn = np.rint(255 + mask[..., None] * (np.array(COLOURS[obj.colour]) - 255.0))
        assert np.abs(redrawn - render(Scene((obj,)), 64)).max() <= 1
    assert scene_mask(Scene((circle,)), 64).sum() == pytest.approx(np.pi * (0.22 * 64) ** 2, rel=2e-3)
    both = scene_mask(Scene((star, Shape("red", "square", "small", "right", 0.75, 0.5, 0.13))), 64)
    assert mask_iou(foreground(render(Scene((star, Shape("red", "square", "small", "right", 0.75, 0.5, 0.13))), 64)),
                    both >= 0.5) > 0.95


def test_mask_and_canny_pairs(tmp_path):
    shapes = ShapesDataset(32, seed=2, count=3)
    image, caption, hint = ControlPairs(shapes, "mask")[1]
    assert torch.equal(image, shapes[1][0]) and caption == shapes.caption(1)
    assert hint.shape == (3, 32, 32) and torch.equal(hint[0], hint[2])
    assert torch.allclose(hint[0].double(), torch.from_numpy(scene_mask(shapes.scene(1), 32)), atol=1e-6)
    assert np.array_equal(to_uint8(shapes[1][0]), shapes.item(1)[0])
    edges = ControlPairs(shapes, "canny", lambda im: canny(im, 50, 150))[1][2]
    want = cv2.Canny(shapes.item(1)[0], 50, 150) / 255.0
    assert all(np.array_equal(edges[c].numpy(), want.astype(np.float32)) for c in range(3)) and want.max() == 1


def test_folder_masks_come_from_the_mask_file_or_the_foreground(tmp_path):
    picture = np.full((32, 32, 3), 255, np.uint8)
    picture[8:20, 4:30] = (40, 90, 200)
    Image.fromarray(picture).save(tmp_path / "a.png")
    Image.fromarray(picture).save(tmp_path / "b.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[0:16] = 255
    Image.fromarray(mask).save(tmp_path / "b.mask.png")
    lines = [json.dumps({"file": f, "caption": "a blue bar"}) for f in ("a.png", "b.png")]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    pairs = ControlPairs(ImageFolder(tmp_path, 32), "mask")
    assert torch.equal(pairs[0][2][0], torch.from_numpy((picture.min(axis=2) <= 159).astype(np.float32)))
    assert torch.equal(pairs[1][2][1], torch.from_numpy(mask / 255.0).float())


# ---- evaluation ---------------------------------------------------------------------------------------------------

def test_evaluate_control_scores_perfect_and_blank_images():
    shapes = ShapesDataset(64, seed=1, split="heldout", count=6)
    pairs = ControlPairs(shapes, "mask")
    drawn = iter(range(len(shapes)))
    seen: list = []

    def perfect(captions, maps, seeds):
        seen.append((len(captions), tuple(maps[0].shape), list(seeds)))
        return [Image.fromarray(shapes.item(next(drawn))[0]) for _ in captions]

    result = evaluate_control(perfect, pairs, seeds=range(10, 16), batch_size=4)
    assert seen == [(4, (1, 3, 64, 64), [10, 11, 12, 13]), (2, (1, 3, 64, 64), [14, 15])]
    assert result.ious == (1.0,) * 6 and accuracy(result.scores, "correct") == 1.0
    rng = np.random.default_rng(0)
    noisy = evaluate_control(lambda c, m, s: [Image.fromarray(np.clip(shapes.item(i)[0] + rng.normal(0, 8, (64, 64, 3)),
                                                                      0, 255).astype(np.uint8)) for i in range(6)],
                             pairs, batch_size=6)
    assert 0.9 < min(noisy.ious) < 1.0  # measured 0.94 … 0.997
    blank = evaluate_control(lambda c, m, s: [Image.new("RGB", (64, 64), "white")] * len(c), pairs)
    assert blank.iou == 0.0 and accuracy(blank.scores, "colour") == 0.0 and accuracy(blank.scores, "count") == 0.0
    table = format_control_table(result).splitlines()
    assert table[0].split() == ["n", "IoU", "colour", "shape", "size", "position", "count", "caption"]
    assert table[1].split()[:2] == ["6", f"{result.iou:.3f}"] and table[1].split()[-1] == "100.0%"
    with pytest.raises(ConfigError, match="needs shapes scenes"):
        evaluate_control(perfect, ControlPairs([], "mask"))
