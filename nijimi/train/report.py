"""Training reports: the loss curve (a PNG and its numbers in a CSV beside it) and sample grids, written atomically."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image

from nijimi.errors import optional_import
from nijimi.io.files import atomic_write


def _smoothed(losses: list[float]) -> tuple[np.ndarray, int, np.ndarray]:
    """The losses, the moving-average window (1/50 of the run) and the averages (one per full window)."""
    values = np.asarray(losses, dtype=np.float64)
    window = max(1, len(values) // 50)
    return values, window, np.convolve(values, np.ones(window) / window, mode="valid") if len(values) else values


def write_metrics(losses: list[float], path: Path) -> Path:
    """The loss curve's numbers as CSV: ``step,loss,mean`` per step, ``mean`` the plotted moving average (empty until
    its window is full)."""
    values, window, smooth = _smoothed(losses)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["step", "loss", "mean"])
        for step, loss in enumerate(values.tolist(), 1):
            writer.writerow([step, repr(loss), repr(float(smooth[step - window])) if step >= window else ""])
    return path


def matplotlib_figure():
    """``matplotlib.figure`` for the loss plot; a training run calls it before its first step, so a missing extra
    stops it at once instead of at the first report."""
    return optional_import("matplotlib.figure", "the loss plot needs matplotlib", "plots")


def write_loss_curve(losses: list[float], path: Path, title: str) -> Path:
    """Plot the per-step loss (thin) and its moving average (thick) on a log scale; its numbers go to
    ``metrics.csv`` beside it (``<x>-metrics.csv`` for ``<x>-loss.png``), see :func:`write_metrics`."""
    write_metrics(losses, path.with_name(path.stem.removesuffix("loss") + "metrics.csv"))
    figure = matplotlib_figure()
    values, window, smooth = _smoothed(losses)
    fig = figure.Figure((6, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(values) + 1), values, lw=0.5, alpha=0.4, label="loss")
    ax.plot(np.arange(window, len(values) + 1), smooth, lw=2, label=f"mean of {window}")
    ax.set(title=f"{title} training loss", xlabel="step", ylabel="loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    return path


def grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equally sized images row by row (``cols`` defaults to a near-square layout)."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % cols) * w, (i // cols) * h))
    return sheet


def write_grid(images: list[Image.Image], path: Path, cols: int | None = None, overwrite: bool = True) -> Path:
    """Write :func:`grid` of ``images`` to the PNG ``path`` atomically; an existing one is replaced only if
    ``overwrite`` (a run's own sample grids are; a file a user named is not, unless asked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, overwrite=overwrite) as f:
        grid(images, cols).save(f, format="PNG")
    return path
