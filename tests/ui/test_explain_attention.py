"""``nijimi explain attention`` and ``nijimi eval attention`` end to end, and the explain writer
(nijimi.ui.explain.write_explanation): every file or none, never replacing one without --overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import png_pixels, run_cli
from PIL import Image

from nijimi.errors import OutputExistsError
from nijimi.explain.panels import Explanation, Panel
from nijimi.ui.explain import explanation_files, parse_words, write_explanation

EXPLANATION = Explanation("demo", (Panel("a", "first", Image.new("RGB", (8, 8), "red")),
                                   Panel("b", "second", Image.new("RGB", (8, 8), "blue"))), {"x": [1.5]})


def test_writer_writes_panels_grid_and_info(tmp_path):
    paths = write_explanation(EXPLANATION, tmp_path / "out", overwrite=False)
    assert [p.name for p in paths] == ["first.png", "second.png", "demo.png", "demo.json"]
    assert paths == explanation_files(EXPLANATION, tmp_path / "out")
    assert png_pixels(paths[2]).shape == (8, 16, 3)
    assert json.loads(paths[3].read_text()) == {"x": [1.5]}


def test_writer_refuses_an_existing_file_before_writing_any(tmp_path):
    (tmp_path / "demo.json").write_text("keep")
    with pytest.raises(OutputExistsError, match="demo.json exists"):
        write_explanation(EXPLANATION, tmp_path, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]
    assert (tmp_path / "demo.json").read_text() == "keep"
    write_explanation(EXPLANATION, tmp_path, overwrite=True)
    assert json.loads((tmp_path / "demo.json").read_text()) == {"x": [1.5]}


def test_words_option():
    assert parse_words(None) is None
    assert parse_words("red, circle") == ["red", "circle"]


def test_explain_attention_command(tmp_path, capsys):
    out = tmp_path / "att"
    code, stdout, err = run_cli(capsys, "explain", "attention", "a red circle on the left and a blue square on the "
                                "right", "--seed", "3", "--steps", "8", "--words", "red,blue", "--out", out, "--quiet")
    assert (code, err) == (0, "")
    names = ["image.png", "word-0-red.png", "word-1-blue.png", "attention.png", "attention.json"]
    assert stdout.split() == [str(out / name) for name in names]
    info = json.loads((out / "attention.json").read_text())
    assert list(info["words"]) == ["red", "blue"]
    assert info["words"]["red"]["peak_fraction"][0] < 0.5 < info["words"]["blue"]["peak_fraction"][0]
    assert png_pixels(out / "attention.png").shape == (256, 768, 3)
    assert not np.array_equal(png_pixels(out / "word-0-red.png"), png_pixels(out / "word-1-blue.png"))


def test_eval_attention_command(capsys):
    code, stdout, err = run_cli(capsys, "eval", "attention", "--n", "1", "--steps", "6", "--quiet")
    assert (code, err) == (0, "")
    lines = stdout.splitlines()
    assert lines[0].split() == ["colour", "words", "2"] and lines[2].startswith("mean ratio")
