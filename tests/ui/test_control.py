"""``nijimi generate --control`` through the real command line (``nijimi.cli.main``): the ControlNet steers the image,
the PNG records it (A1111's "ControlNet 0" infotext, the recipe) and ``reproduce`` replays it to identical pixels;
user errors exit 2 with one ``error:`` line and no file. The ``train-controlnet`` and ``eval control`` parsers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import TOY_F4, TOY_F8, perturb, random_model
from helpers import png_pixels as pixels
from helpers import run_cli as run
from PIL import Image, ImageDraw

from nijimi.io.checkpoint import save_single
from nijimi.io.controlnet import save_original
from nijimi.io.find import legacy_model_hash
from nijimi.io.imagemeta import read_image_metadata
from nijimi.io.safetensors import read_metadata
from nijimi.models.controlnet import ControlNetModel
from nijimi.pipelines.control_maps import parse_control_spec
from nijimi.pipelines.infotext import control_spec_text, control_unit_settings
from nijimi.ui.control import control_infotext

CONFIG = TOY_F8
FAST = ["--steps", "3", "--size", "64x64", "--seed", "5", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A small random model file, a random ControlNet for it, one for a VAE of another scale, and a map picture."""
    folder = tmp_path_factory.mktemp("control_cli")
    model = random_model(CONFIG, 0)
    save_single(model, folder / "tiny.safetensors")
    save_original(perturb(ControlNetModel.from_unet(model.unet), 1), folder / "cn.safetensors")
    save_original(ControlNetModel.from_unet(model.unet, hint_widths=(16, 32, 96)), folder / "cn4.safetensors")
    picture = Image.new("RGB", (80, 48))
    ImageDraw.Draw(picture).rectangle((20, 10, 50, 40), fill=(255, 255, 255))
    picture.save(folder / "map.png")
    return {"model": folder / "tiny.safetensors", "cn": folder / "cn.safetensors", "cn4": folder / "cn4.safetensors",
            "map": folder / "map.png"}


def test_generate_with_control_records_and_reproduces(capsys, files, tmp_path):
    spec = f"model={files['cn']},image={files['map']},pre=canny,low=50,high=150,scale=0.9,end=0.8"
    steered, plain, again = tmp_path / "steered.png", tmp_path / "plain.png", tmp_path / "again.png"
    code, out, err = run(capsys, "generate", "a cat", "--model", files["model"], *FAST, "--control", spec, "--out",
                         steered)
    assert (code, out.strip(), err) == (0, str(steered), "")
    run(capsys, "generate", "a cat", "--model", files["model"], *FAST, "--out", plain)
    assert np.abs(pixels(steered) - pixels(plain)).max() > 5
    meta = read_image_metadata(steered)
    assert meta["settings"]["ControlNet 0"] == (f"Module: canny, Model: cn [{legacy_model_hash(files['cn'])}], "
                                                "Weight: 0.9, Resize Mode: Just Resize, "
                                                "Threshold A: 50, Threshold B: 150, Guidance Start: 0, "
                                                "Guidance End: 0.8, Control Mode: Balanced")
    assert meta["recipe"]["request"]["control"] == [{
        "model": str(files["cn"]), "image": str(files["map"]), "scale": 0.9, "pre": "canny", "start": 0.0, "end": 0.8,
        "low": 50.0, "high": 150.0, "resize": "resize", "guess": False}]
    code, out, err = run(capsys, "reproduce", steered, "--out", again, "--quiet", "--models-dir",
                         Path(files["model"]).parent)
    assert (code, err) == (0, "")
    assert np.array_equal(pixels(again), pixels(steered))


@pytest.mark.parametrize(("spec", "message"), [
    ("model={cn},image={map},resize=none", "error: control map is 80×48 but the output is 64×64 (resize=none"),
    ("model={cn},image={missing}", "error: {missing}: image file not found"),
    ("model={cn},image={map},pre=depth", "error: unknown control preprocessor pre='depth'; choose one of map, invert"),
    ("model={cn4},image={map}", "error: ControlNet 0 reads maps 4× the latent size, but this model's latents are 1/8"),
    ("model={missing},image={map}", "error: {missing}"),
    ("model={cn},scale=2", "error: --control: missing image (need model=PATH,image=IMG)"),
], ids=["size-mismatch", "missing-map", "unknown-pre", "other-vae", "missing-controlnet", "no-image"])
def test_control_errors_exit_2_with_one_line(capsys, files, tmp_path, spec, message):
    names = {**{k: str(v) for k, v in files.items()}, "missing": str(tmp_path / "nothing.png")}
    out_file = tmp_path / "x.png"
    code, out, err = run(capsys, "generate", "a cat", "--model", files["model"], *FAST, "--control",
                         spec.format(**names), "--out", out_file)
    assert (code, out) == (2, "")
    assert err.startswith(message.format(**names)) and err.count("\n") == 1
    assert not out_file.exists()


def test_infotext_of_a_unit_and_guess_mode():
    entries = [{"scale": 1.0, "start": 0.25, "end": 1.0, "guess_mode": True},
               {"model": "/x/lines.safetensors", "image": "a.png", "scale": 1.5, "pre": "invert", "start": 0.0,
                "end": 1.0, "low": None, "high": None, "resize": "fill", "guess": False}]
    assert control_infotext(entries) == {
        "ControlNet 0": "Module: none, Weight: 1, Resize Mode: Just Resize, Guidance Start: 0.25, Guidance End: 1, "
                        "Control Mode: ControlNet is more important",
        "ControlNet 1": "Module: invert, Model: lines, Weight: 1.5, Resize Mode: Resize and Fill, Guidance Start: 0, "
                        "Guidance End: 1, Control Mode: Balanced"}
    assert control_infotext(None) == {}


def test_the_infotext_of_a_spec_reads_back_as_the_same_spec(files):
    spec = parse_control_spec(f"model={files['cn']},image=a.png,pre=canny,low=50,high=150,scale=0.9,start=0.2,"
                              "end=0.8,resize=fill,guess=true")
    text = control_infotext([dataclasses.asdict(spec)])["ControlNet 0"]
    flag = control_spec_text(control_unit_settings(text))
    assert flag.startswith("model=cn,image=IMAGE,")
    assert parse_control_spec(flag.replace("model=cn", f"model={files['cn']}").replace("IMAGE", "a.png")) == spec


# ---- train-controlnet and eval control ----------------------------------------------------------------------------

SMALL = TOY_F4  # 32×32 images, a factor-4 VAE like the embedded model's


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    model = random_model(SMALL, 1)
    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    save_single(model, path)
    return path


def test_train_generate_and_evaluate_through_the_cli(capsys, small_model, tmp_path):
    out = tmp_path / "cn.safetensors"
    code, stdout, err = run(capsys, "train-controlnet", "--base", small_model, "--condition", "canny", "--steps", 2,
                            "--batch-size", 2, "--out", out, "--data-count=4", "--sample-every=2", "--sample-steps=2",
                            "--sample-count=2", "--low=50", "--high=150", "--quiet")
    assert (code, stdout.strip(), err) == (0, str(out), "")
    work = tmp_path / "cn-train"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint.pt", "loss.png", "metrics.csv", "samples-000000.png",
                                                      "samples-000002.png"]
    with Image.open(work / "samples-000002.png") as grid:
        assert grid.size == (64, 64)  # two maps above two samples, 32×32 each
    assert json.loads(read_metadata(out)["nijimi_controlnet_config"])["hint_widths"] == [16, 32, 96]
    edges = tmp_path / "scene.png"
    Image.fromarray(np.asarray(Image.open(work / "samples-000002.png"))[:32, :32]).save(edges)
    code, stdout, err = run(capsys, "generate", "a red circle", "--model", small_model, "--size", "32x32", "--steps",
                            2, "--quiet", "--control", f"model={out},image={edges}", "--out", tmp_path / "g.png")
    assert (code, err) == (0, "")
    code, stdout, err = run(capsys, "eval", "control", "--controlnet", out, "--model", small_model, "--condition",
                            "canny", "--low", 50, "--high", 150, "--n", 2, "--steps", 2, "--grid", tmp_path / "e.png",
                            "--quiet")
    assert (code, err) == (0, "")
    header, row = stdout.strip().splitlines()
    assert header.split()[:3] == ["n", "IoU", "colour"] and row.split()[0] == "2" and 0 <= float(row.split()[1]) <= 1
    with Image.open(tmp_path / "e.png") as grid:
        assert grid.size == (64, 64)


@pytest.mark.parametrize(("flags", "message"), [
    (["--condition", "depth"], "error: unknown condition 'depth'; choose one of mask, map, invert, canny"),
    (["--condition", "canny", "--low=300", "--high=100"], "error: canny thresholds must satisfy 0 <= low <= high"),
    (["--caption-dropout=2"], "error: caption_dropout must be within [0, 1], got 2.0"),
    (["--out", "cn.pt"], "error: out 'cn.pt': ControlNets are written as .safetensors"),
    (["--base", "nowhere.safetensors"], "error: nowhere.safetensors"),
], ids=["condition", "thresholds", "dropout", "suffix", "base"])
def test_train_controlnet_errors_exit_2_with_one_line(capsys, tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "train-controlnet", "--steps", 1, "--quiet", *flags)
    assert (code, out) == (2, "")
    assert err.startswith(message) and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
