"""What every explain view returns: labelled pictures plus numbers (:class:`Explanation`), one shape for the CLI (which
writes the panels as PNG files) and the web page (which shows them from base64 PNGs).

A view is a function ``(pipe, inputs…) → Explanation`` in :mod:`nijimi.explain`; it never writes files itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Panel:
    """One picture of a view: ``label`` says what it shows (``"t = 500"``, ``"'red'"``, ``"step 4: x̂₀"``); ``name``
    is a file-name stem for it (letters, digits, ``-`` and ``_`` only)."""

    label: str
    name: str
    image: Image.Image


@dataclass(frozen=True)
class Explanation:
    """A view's result: its ``view`` name, the ``panels`` in reading order, and ``info`` — JSON-ready numbers
    (tables of floats, lists of labels) that the panels plot or that a test checks."""

    view: str
    panels: tuple[Panel, ...]
    info: dict[str, Any] = field(default_factory=dict)


def grid(panels: tuple[Panel, ...] | list[Panel], columns: int) -> Image.Image:
    """The panels' images side by side, ``columns`` per row, on white; every cell is the size of the largest image."""
    if not panels:
        raise ValueError("a grid needs at least one panel")
    width = max(p.image.width for p in panels)
    height = max(p.image.height for p in panels)
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, panel in enumerate(panels):
        sheet.paste(panel.image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return sheet
