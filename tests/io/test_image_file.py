"""The one image opener: special files, decompression bombs and huge PNG text chunks refused in one line naming the
file, for every reader of user images (pipelines, PNG metadata, training data, explain)."""

import io
import os
import zlib

import pytest
from helpers import without_hanging
from PIL import Image, PngImagePlugin

from nijimi.errors import DataError, ImageError
from nijimi.explain.schedules import load_image
from nijimi.io import image_file
from nijimi.io.image_file import BYTES_PER_PIXEL, image_size, max_image_pixels, read_image
from nijimi.io.imagemeta import read_image_metadata
from nijimi.pipelines.images import open_image
from nijimi.train.data import read_records


def _png_claiming(path, width: int, height: int) -> None:
    """A 1×1 PNG whose header (IHDR, CRC fixed) says ``width``×``height``: a bomb as far as any header reader knows."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))


def _png_with_text(path, size: int, compressed: bool) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "x" * size, zip=compressed)
    Image.new("RGB", (8, 8), "white").save(path, pnginfo=info)


def test_pixel_limit_follows_memory_and_never_exceeds_pil():
    assert max_image_pixels(1 << 30) == (1 << 30) // BYTES_PER_PIXEL
    assert max_image_pixels(1 << 50) == Image.MAX_IMAGE_PIXELS
    assert 0 < max_image_pixels() <= Image.MAX_IMAGE_PIXELS


def test_image_over_the_memory_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    _png_claiming(bomb, 5000, 5000)
    monkeypatch.setattr(image_file, "machine_memory", lambda: 1000 * 1000 * BYTES_PER_PIXEL)
    message = f"^{bomb}: image of 5000×5000 pixels is over the limit of 1000000 pixels \\(decompression bomb\\?\\)$"
    with pytest.raises(ImageError, match=message):
        read_image(bomb)
    with pytest.raises(ImageError, match=message):
        open_image(bomb, "L")


@pytest.mark.parametrize("side", [10_000, 60_000])  # above PIL's limit (its warning), above twice it (its error)
def test_decompression_bombs_are_one_error_naming_the_file(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    _png_claiming(bomb, side, side)
    for read in (read_image, image_size, open_image, load_image):
        with pytest.raises(ImageError, match=f"^{bomb}: image (of {side}×{side} pixels is over|refused)"):
            read(bomb)
    with pytest.raises(ImageError, match=f"^{bomb}: image "):
        read_image_metadata(bomb)


def test_training_images_are_checked_by_the_same_opener(tmp_path):
    _png_claiming(tmp_path / "a.png", 20_000, 20_000)
    (tmp_path / "a.txt").write_text("a bomb")
    with pytest.raises(DataError, match=f"^{tmp_path / 'a.png'}: training image "):
        read_records(tmp_path)


@pytest.mark.parametrize("size, compressed, problem", [
    (2 << 20, True, "Decompressed data too large"),  # a zTXt chunk over MAX_TEXT_CHUNK
    (70 << 20, False, "Too much memory used in text chunks"),  # tEXt over MAX_TEXT_MEMORY
])
def test_huge_png_text_chunks_are_one_error_naming_the_file(tmp_path, size, compressed, problem):
    path = tmp_path / "text.png"
    _png_with_text(path, size, compressed)
    with pytest.raises(ImageError, match=f"^{path}: cannot read image: {problem}"):
        read_image_metadata(path)


def test_text_chunks_within_the_limits_are_read(tmp_path):
    path = tmp_path / "text.png"
    _png_with_text(path, 500_000, True)
    assert read_image_metadata(path)["text"]["parameters"] == "x" * 500_000


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_refused_without_opening(tmp_path):
    fifo = tmp_path / "init.png"
    os.mkfifo(fifo)  # opening it would block: the check must come first
    error = without_hanging(lambda: open_image(fifo), fifo)
    assert isinstance(error, ImageError) and str(error) == f"{fifo}: image is a FIFO (named pipe), not a file"
    with pytest.raises(ImageError, match=f"^{tmp_path}: image is a folder, not a file$"):
        read_image_metadata(tmp_path)
    with pytest.raises(ImageError, match=f"^{tmp_path / 'gone.png'}: image file not found$"):
        read_image(tmp_path / "gone.png")


def test_deeply_nested_json_in_a_text_chunk_is_kept_as_text(tmp_path):
    path = tmp_path / "deep.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("nijimi", "[" * 100_000, zip=True)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert read_image_metadata(path)["recipe"] == "[" * 100_000
