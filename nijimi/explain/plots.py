"""The explain views' charts, drawn with matplotlib (the ``nijimi[plots]`` extra, imported at the point of use):
curves over the timesteps (ᾱ_t, SNR) and bar charts, each as a matplotlib Figure without pyplot's global state, and
:func:`figure_image`, a figure rendered to a PIL image for a :class:`~nijimi.explain.panels.Panel`."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from nijimi.errors import optional_import


def figure(width: float, height: float) -> Any:
    """A matplotlib Figure of ``width`` × ``height`` inches at 100 dpi (no pyplot state)."""
    return optional_import("matplotlib.figure", "explain needs matplotlib", "plots").Figure((width, height), dpi=100)


def curve_figure(title: str, ylabel: str, curves: Mapping[str, torch.Tensor], log: bool = False,
                 marks: Sequence[int] = (), size: tuple[float, float] = (6, 4)) -> Any:
    """One curve per entry of ``curves`` (values over the timesteps t = 0…T-1), a log y axis when ``log``, and a
    dotted vertical line at each timestep of ``marks``."""
    fig = figure(*size)
    ax = fig.add_subplot()
    for label, values in curves.items():
        ax.plot(values.numpy(), label=label)
    for t in marks:
        ax.axvline(t, color="grey", linestyle=":", linewidth=0.8)
    if log:
        ax.set_yscale("log")
    ax.set(title=title, xlabel="timestep t", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def bar_axes(ax: Any, title: str, labels: Sequence[str], series: Mapping[str, Sequence[float]]) -> None:
    """Grouped bars on ``ax``: one group per label, one bar per entry of ``series`` (name → one value per label)."""
    width = 0.8 / max(len(series), 1)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))], values, width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        ax.legend(fontsize=7)


def figure_image(fig: Any) -> Image.Image:
    """The figure rendered as an RGB PIL image."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")
