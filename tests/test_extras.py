"""Optional extras: OpenCV (``nijimi[control]``) and matplotlib (``nijimi[plots]``) are imported only where used, and
a missing one is a single ``error:`` line naming the extra to install."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli
from PIL import Image

from nijimi.errors import MissingExtraError
from nijimi.pipelines.control_maps import canny
from nijimi.train.report import write_loss_curve


def test_the_command_line_imports_neither_opencv_nor_matplotlib() -> None:
    code = "import sys, nijimi.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'cv2', 'matplotlib'}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_canny_without_opencv_names_the_control_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(MissingExtraError, match=r"^canny needs OpenCV: pip install 'nijimi\[control\]'$"):
        canny(Image.new("RGB", (8, 8)))


def test_explain_without_matplotlib_is_one_error_line(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, out, err = run_cli(capsys, "explain", "schedules", "--out", tmp_path)
    assert (code, out, err) == (2, "", "error: explain needs matplotlib: pip install 'nijimi[plots]'\n")


def test_loss_plot_without_matplotlib_still_writes_the_metrics(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingExtraError, match=r"loss plot needs matplotlib: pip install 'nijimi\[plots\]'"):
        write_loss_curve([1.0, 0.5], tmp_path / "loss.png", "U-Net")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_training_without_matplotlib_stops_before_any_work(monkeypatch, capsys, tmp_path: Path) -> None:
    """The loss plot's extra is checked first: no run is prepared, nothing is written."""
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "adapter.safetensors"
    code, _, err = run_cli(capsys, "train-adapter", "--base", "embedded", "--steps", "1", "--out", out, "--quiet")
    assert code == 2 and err == "error: the loss plot needs matplotlib: pip install 'nijimi[plots]'\n"
    assert list(tmp_path.iterdir()) == []
