"""The shipped embedded model: small fp16 weights in the package, loaded by name, drawing what it is asked for."""

from __future__ import annotations

from PIL import Image

import nijimi
from nijimi import cli
from nijimi.embedded import WEIGHTS
from nijimi.io.safetensors import read_header
from nijimi.train.detect import score


def test_weights_ship_small_and_half_precision():
    assert WEIGHTS.stat().st_size <= 40 * 2**20
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
    verdict = score(first, "a large red circle in the center")
    assert verdict.colour and verdict.shape and verdict.size and verdict.count


def test_load_by_name_generates_at_the_native_size():
    pipe = nijimi.load("embedded")
    image = pipe.generate("a small blue star at the top", steps=20, seed=3).images[0]
    verdict = score(image, "a small blue star at the top")
    assert image.size == (64, 64) and verdict.colour and verdict.shape
