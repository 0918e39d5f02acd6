import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_rotated
from PIL import Image

from nijimi.errors import ConfigError, DataError
from nijimi.train.data import ImageFolder, collate, read_records
from nijimi.train.shapes import ShapesDataset, write_shapes_dataset


def _save(path: Path, array: np.ndarray, caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return path


def _columns(width: int, height: int) -> np.ndarray:
    """RGB image whose red channel is 2 × column index, green 3 × row index, blue 77."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return np.stack([2 * x, 3 * y, np.full_like(x, 77)], axis=-1).astype(np.uint8)


def test_sidecar_folder_resizes_shorter_side_and_center_crops(tmp_path: Path) -> None:
    _save(tmp_path / "b" / "wide.png", _columns(96, 64), "a wide picture")
    _save(tmp_path / "a.png", np.full((40, 40, 3), (255, 0, 128), dtype=np.uint8), "  solid  ")
    folder = ImageFolder(tmp_path, size=32)
    assert [r.image.name for r in folder.records] == ["a.png", "wide.png"]
    solid = folder[0]
    assert solid.caption == "solid" and solid.mask is None and solid.image.shape == (3, 32, 32)
    assert torch.allclose(solid.image[:, 5, 5], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)
    wide = folder[1]
    assert wide.caption == "a wide picture"
    # 96×64 → 48×32 (halved), then columns 8..39 kept: red = 2 × (2 × column + 0.5) in the source.
    red = (wide.image[0, 16].numpy() + 1) * 127.5
    expected = 2 * (2 * np.arange(8, 40) + 0.5)
    assert np.abs(red[2:-2] - expected[2:-2]).max() < 1.5
    blue = (wide.image[2] + 1) * 127.5
    assert torch.allclose(blue, torch.full_like(blue, 77.0), atol=1.0)


def test_tall_image_is_cropped_vertically(tmp_path: Path) -> None:
    _save(tmp_path / "tall.png", _columns(32, 64), "tall")
    sample = ImageFolder(tmp_path, size=32)[0]
    green = (sample.image[1, :, 10].numpy() + 1) * 127.5
    assert np.allclose(green, 3 * np.arange(16, 48), atol=1.0)


def test_shapes_dataset_round_trips_bit_exactly(tmp_path: Path) -> None:
    folder = ImageFolder(write_shapes_dataset(tmp_path, count=8, seed=4), size=64)
    dataset = ShapesDataset(size=64, seed=4)
    for index in range(8):
        image, caption = dataset[index]
        assert torch.equal(folder[index].image, image) and folder[index].caption == caption
    assert read_records(tmp_path / "captions.jsonl") == folder.records


def test_exif_orientation_turns_image_and_mask_upright(tmp_path: Path) -> None:
    upright = _columns(32, 48)
    save_rotated(tmp_path / "photo.png", upright)
    save_rotated(tmp_path / "photo.mask.png", np.repeat(upright[..., 1:2], 3, axis=-1))
    (tmp_path / "photo.txt").write_text("a photo", encoding="utf-8")
    sample = ImageFolder(tmp_path, size=32)[0]
    green = (sample.image[1, :, 10].numpy() + 1) * 127.5
    assert np.allclose(green, 3 * np.arange(8, 40), atol=1.0)
    assert sample.mask is not None and np.allclose(sample.mask[0, :, 10].numpy() * 255, green, atol=1.0)


def test_alpha_channel_becomes_mask_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :8, 3] = 255
    rgba[:, 8:, 3] = 0
    _save(tmp_path / "cut.png", rgba, "cut-out")
    sample = ImageFolder(tmp_path, size=16)[0]
    assert sample.mask.shape == (1, 16, 16)
    assert torch.equal(sample.mask[0, :, :8], torch.ones(16, 8))
    assert torch.equal(sample.mask[0, :, 8:], torch.zeros(16, 8))
    assert torch.allclose(sample.image[:, 0, 0], torch.tensor([200 / 127.5 - 1, -1.0, -1.0]))
    assert torch.equal(sample.image[:, 0, 12], torch.ones(3))


def test_mask_file_beside_image(tmp_path: Path) -> None:
    _save(tmp_path / "x.png", np.zeros((20, 40, 3), dtype=np.uint8), "x")
    mask = np.zeros((20, 40), dtype=np.uint8)
    mask[:, 20:] = 255
    Image.fromarray(mask).save(tmp_path / "x.mask.png")
    folder = ImageFolder(tmp_path, size=10)
    assert len(folder) == 1 and folder.records[0].mask == tmp_path / "x.mask.png"
    # 40×20 → 20×10, columns 5..14 kept; the mask's edge lands at column 5 of the crop.
    row = folder[0].mask[0, 5].numpy()
    assert np.all(row[:4] == 0) and np.all(row[6:] == 1)


def test_jsonl_with_mask_key_and_collate(tmp_path: Path) -> None:
    _save(tmp_path / "p.png", np.full((8, 8, 3), 10, dtype=np.uint8))
    _save(tmp_path / "q.png", np.full((8, 8, 3), 20, dtype=np.uint8))
    Image.fromarray(np.full((8, 8), 127, dtype=np.uint8)).save(tmp_path / "m.png")
    lines = [{"file": "p.png", "caption": "p", "mask": "m.png"}, {"file": "q.png", "caption": "q"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    folder = ImageFolder(tmp_path, size=8)
    images, captions, masks = collate([folder[0], folder[1]])
    assert images.shape == (2, 3, 8, 8) and captions == ["p", "q"]
    assert torch.allclose(masks[0], torch.full((1, 8, 8), 127 / 255)) and torch.equal(masks[1], torch.ones(1, 8, 8))
    assert collate([folder[1]])[2] is None
    shapes = ShapesDataset(size=8)
    images, captions, masks = collate([shapes[0], shapes[1]])
    assert torch.equal(images[1], shapes[1][0]) and captions[0] == shapes.caption(0) and masks is None


def _error(root: Path) -> str:
    with pytest.raises(DataError) as info:
        ImageFolder(root, size=16)
    return str(info.value)


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    assert "is empty" in _error(tmp_path) and str(tmp_path) in _error(tmp_path)
    assert "does not exist" in _error(tmp_path / "nope")
    assert "caption file" in _error(tmp_path / "nope.jsonl") and "missing" in _error(tmp_path / "nope.jsonl")
    (tmp_path / "captions.jsonl").write_text("\n")
    assert "lists no images" in _error(tmp_path)


def test_image_without_caption(tmp_path: Path) -> None:
    _save(tmp_path / "one.png", np.zeros((8, 8, 3), dtype=np.uint8), "one")
    _save(tmp_path / "two.png", np.zeros((8, 8, 3), dtype=np.uint8))
    message = _error(tmp_path)
    assert "two.png has no caption" in message and "two.txt" in message and "1 of 2" in message
    (tmp_path / "one.txt").unlink()
    assert "no captions" in _error(tmp_path)


def test_unreadable_images(tmp_path: Path) -> None:
    noise = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    _save(tmp_path / "good.png", noise.numpy(), "good")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    (tmp_path / "bad.txt").write_text("bad")
    assert "bad.png: cannot read training image" in _error(tmp_path)
    (tmp_path / "bad.png").unlink()
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "good.png").write_bytes(data[: len(data) // 2])
    folder = ImageFolder(tmp_path, size=8)  # the header still reads; the pixels do not
    with pytest.raises(DataError, match=r"good\.png: cannot read training image"):
        folder[0]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"file": "a.png"}', 'line 2: expected {"file"'),
        ('["a.png", "x"]', 'line 2: expected {"file"'),
        ('{"file": "missing.png", "caption": "x"}', "line 2: image file .*missing.png not found"),
        ('{"file": "a.png", "caption": "x", "mask": "nomask.png"}', "line 2: mask file .*nomask.png not found"),
    ],
)
def test_bad_jsonl_lines_name_the_line(tmp_path: Path, line: str, expected: str) -> None:
    _save(tmp_path / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "ok"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=expected) as info:
        ImageFolder(tmp_path, size=8)
    assert "captions.jsonl" in str(info.value)


def test_mask_size_mismatch_and_bad_arguments(tmp_path: Path) -> None:
    _save(tmp_path / "x.png", np.zeros((8, 8, 3), dtype=np.uint8), "x")
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "x.mask.png")
    with pytest.raises(DataError, match=r"x\.mask\.png is 4×4 but image .*x\.png is 8×8"):
        ImageFolder(tmp_path, size=8)[0]
    with pytest.raises(ConfigError, match="4"):
        ImageFolder(tmp_path, size=4)
    with pytest.raises(ConfigError, match="empty batch"):
        collate([])
