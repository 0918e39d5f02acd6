"""The explain views' common result: a grid of panels keeps each panel's pixels in its cell."""

import numpy as np
import pytest
from PIL import Image

from nijimi.explain.panels import Panel, grid


def test_grid_places_each_panel_in_reading_order():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    panels = [Panel(f"p{i}", f"p{i}", Image.new("RGB", (4, 3), c)) for i, c in enumerate(colours)]
    sheet = np.asarray(grid(panels, columns=2))
    assert sheet.shape == (6, 8, 3)
    assert tuple(sheet[0, 0]) == colours[0] and tuple(sheet[0, 4]) == colours[1]
    assert tuple(sheet[3, 0]) == colours[2] and tuple(sheet[3, 4]) == (255, 255, 255)


def test_grid_refuses_no_panels():
    with pytest.raises(ValueError, match="at least one panel"):
        grid([], columns=3)
