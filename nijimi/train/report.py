"""Training reports: the loss curve and sample grids, as PNG files written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from nijimi.io.files import atomic_write


def write_loss_curve(losses: list[float], path: Path, title: str) -> Path:
    """Plot the per-step loss (thin) and its moving average (thick) on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(losses, dtype=np.float64)
    window = max(1, len(values) // 50)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid") if len(values) else values
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(np.arange(1, len(values) + 1), values, lw=0.5, alpha=0.4, label="loss")
    ax.plot(np.arange(window, len(values) + 1), smooth, lw=2, label=f"mean of {window}")
    ax.set(title=f"{title} training loss", xlabel="step", ylabel="loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
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


def write_grid(images: list[Image.Image], path: Path, cols: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        grid(images, cols).save(f, format="PNG")
    return path
