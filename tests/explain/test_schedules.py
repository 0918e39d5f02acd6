import pytest
import torch
from PIL import Image

from nijimi.errors import ImageError
from nijimi.explain.schedules import (
    explain_schedules,
    explained_schedules,
    generated_pattern,
    load_image,
    noising_strip,
    strip_timesteps,
)


def test_explain_schedules_writes_three_pngs(tmp_path):
    paths = explain_schedules(tmp_path / "out")
    assert [p.name for p in paths] == ["alpha_bar.png", "log_snr.png", "noising.png"]
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width >= 500 and img.height >= 300


def test_explain_schedules_with_a_user_image(tmp_path):
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "red.png")
    paths = explain_schedules(tmp_path, image=tmp_path / "red.png")
    assert all(p.exists() for p in paths)


def test_unreadable_image_raises_image_error_naming_it(tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(ImageError, match="not-an-image.png"):
        load_image(bad)
    with pytest.raises(ImageError, match="missing.jpg"):
        explain_schedules(tmp_path, image=tmp_path / "missing.jpg")


def test_load_image_crops_resizes_and_scales_to_unit_range(tmp_path):
    img = Image.new("RGB", (60, 40), (255, 0, 128))
    img.save(tmp_path / "c.png")
    pixels = load_image(tmp_path / "c.png", size=16)
    assert pixels.shape == (3, 16, 16)
    assert torch.allclose(pixels[:, 8, 8], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)


def test_noising_strip_goes_from_the_image_to_unit_noise():
    image = generated_pattern()
    assert image.shape == (3, 96, 96) and image.min() >= -1 and image.max() <= 1
    for name, schedule in explained_schedules().items():
        timesteps = strip_timesteps(schedule)
        assert timesteps.tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
        strip = noising_strip(image, schedule, timesteps, torch.Generator().manual_seed(0))
        assert strip.shape == (10, 3, 96, 96)
        assert (strip[0] - image).abs().mean() < 0.1, name
        signal = torch.corrcoef(torch.stack([strip[-1].flatten(), image.flatten()]))[0, 1]
        assert abs(signal) < 0.1 and strip[-1].std().item() == pytest.approx(1.0, abs=0.05), name
        residual = (strip - image).flatten(1).std(dim=1)
        assert (residual.diff() > 0).all(), name
