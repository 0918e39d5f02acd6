"""Init and mask images: ``open_image`` turns photos upright by their EXIF orientation."""

from pathlib import Path

import numpy as np
import pytest
from helpers import save_rotated
from PIL import Image

from nijimi.pipelines.images import open_image

UPRIGHT = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 2


def test_png_orientation_tag_is_honoured(tmp_path: Path) -> None:
    path = save_rotated(tmp_path / "photo.png", UPRIGHT)
    with Image.open(path) as raw:
        assert raw.size == (4, 6)
        assert np.array_equal(np.asarray(open_image(raw)), UPRIGHT)
    assert np.array_equal(np.asarray(open_image(path)), UPRIGHT)
    assert open_image(path, "L").size == (6, 4)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_orientation_tag_is_honoured(tmp_path: Path, mode: str) -> None:
    upright = np.zeros((32, 48, 3), dtype=np.uint8)
    upright[:, :24] = 255
    image = open_image(save_rotated(tmp_path / "photo.jpg", upright), mode)
    assert image.size == (48, 32)
    assert np.asarray(image.convert("RGB"))[16, 4].min() > 240 and np.asarray(image.convert("RGB"))[16, 44].max() < 15
