"""The explain writer: a PNG per panel, the grid and the info JSON, all refused before any is written when one
exists (unless overwrite), and the CLI's prompt views writing through it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nijimi.cli import main
from nijimi.errors import ConfigError, OutputExistsError
from nijimi.explain.panels import Explanation, Panel, grid
from nijimi.ui.explain import write_explanation


def _explanation(view: str = "demo") -> Explanation:
    panels = tuple(Panel(f"panel {i}", f"p{i}", Image.new("RGB", (8, 8), (40 * i, 0, 0))) for i in range(3))
    return Explanation(view, panels, {"columns": 3, "numbers": [1.5, 2]})


def test_writes_panels_grid_and_info(tmp_path):
    paths = write_explanation(_explanation(), tmp_path / "out")
    assert [p.name for p in paths] == ["p0.png", "p1.png", "p2.png", "demo.png", "demo.json"]
    assert np.asarray(Image.open(paths[1]))[0, 0].tolist() == [40, 0, 0]
    np.testing.assert_array_equal(np.asarray(Image.open(paths[3])), np.asarray(grid(_explanation().panels, 3)))
    assert json.loads(paths[4].read_text()) == {"columns": 3, "numbers": [1.5, 2]}


def test_an_existing_file_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "demo.json").write_text("mine")
    with pytest.raises(OutputExistsError, match="demo.json"):
        write_explanation(_explanation(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]
    write_explanation(_explanation(), tmp_path, overwrite=True)
    assert json.loads((tmp_path / "demo.json").read_text())["numbers"] == [1.5, 2]


def test_a_panel_named_like_the_view_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="two of its files would share a name"):
        write_explanation(_explanation("p1"), tmp_path)
    assert not list(tmp_path.iterdir())


def test_the_trajectory_command_writes_its_files(tmp_path, capsys):
    assert main(["explain", "trajectory", "a red circle", "--steps", "2", "--size", "64x64", "--out",
                 str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in printed] == ["x_t-001.png", "x_t-002.png", "x0_hat-001.png",
                                                      "x0_hat-002.png", "trajectory.png", "trajectory.json"]
    assert json.loads((tmp_path / "trajectory.json").read_text())["steps"] == 2
