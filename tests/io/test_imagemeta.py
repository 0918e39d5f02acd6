"""Metadata of PNG, JPEG and WebP images as A1111 and ComfyUI write them (the writers in ``foreign_images.py`` follow
their sources byte for byte): the same infotext comes back from each; little-endian and ASCII UserComments, a JPEG
COM comment; corrupt EXIF and undecodable comments are one ImageError."""

import io
import struct

import pytest
from foreign_images import (
    a1111_jpeg,
    a1111_png,
    a1111_webp,
    comfyui_graph,
    comfyui_png,
    comfyui_webp,
    jpeg_with_app1,
    piexif_dump,
    user_comment_unicode,
)
from PIL import Image, PngImagePlugin

from nijimi.errors import ImageError
from nijimi.io.imagemeta import decode_user_comment, read_image_metadata

INFOTEXT = (
    "a cat on a mat, (masterpiece:1.2), 猫 <lora:pink:0.5>\n"
    "Negative prompt: blurry\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, Size: 512x768, "
    'Model hash: 0123456789, Model: anything-v5, RNG: CPU, Lora hashes: "pink: 0123456789ab", Version: v1.10.1'
)
SETTINGS = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 965400086,
            "Size": (512, 768), "Model hash": "0123456789", "Model": "anything-v5", "RNG": "CPU",
            "Lora hashes": "pink: 0123456789ab", "Version": "v1.10.1"}


@pytest.mark.parametrize(("writer", "kind"), [(a1111_png, "PNG"), (a1111_jpeg, "JPEG"), (a1111_webp, "WEBP")])
def test_a1111_infotext_from_png_jpeg_and_webp(tmp_path, writer, kind):
    meta = read_image_metadata(writer(tmp_path / f"x.{kind.lower()}", INFOTEXT))
    assert meta["format"] == kind and meta["parameters"] == INFOTEXT
    assert meta["prompt"] == "a cat on a mat, (masterpiece:1.2), 猫 <lora:pink:0.5>"
    assert meta["negative_prompt"] == "blurry" and meta["settings"] == SETTINGS
    assert meta["recipe"] is None and meta["comfyui_prompt"] is None


def test_the_jpeg_is_laid_out_as_piexif_insert_leaves_it(tmp_path):
    """SOI, then the Exif APP1 segment in place of JFIF's APP0; the UserComment is UNICODE + UTF-16 big-endian."""
    data = a1111_jpeg(tmp_path / "x.jpg", "hi").read_bytes()
    assert data[:4] == b"\xff\xd8\xff\xe1" and data[6:14] == b"Exif\0\0MM"
    assert data.find(b"UNICODE\0\0h\0i") > 0
    with Image.open(tmp_path / "x.jpg") as image:
        assert image.getexif().get_ifd(0x8769)[0x9286] == b"UNICODE\0\0h\0i"


@pytest.mark.parametrize(("writer", "kind"), [(comfyui_png, "PNG"), (comfyui_webp, "WEBP")])
def test_comfyui_graphs_from_png_and_webp(tmp_path, writer, kind):
    graph = comfyui_graph()
    meta = read_image_metadata(writer(tmp_path / f"c.{kind.lower()}", graph))
    assert meta["comfyui_prompt"] == graph and isinstance(meta["comfyui_workflow"], dict)
    assert meta["parameters"] is None


@pytest.mark.parametrize("comment", [
    b"UNICODE\0" + "caf\u00e9 \u732b".encode("utf_16_le"),      # little-endian writers
    b"UNICODE\0" + "caf\u00e9 \u732b".encode("utf_16"),         # with a byte-order mark
    b"UNICODE\0" + "caf\u00e9 \u732b".encode("utf_16_be"),      # piexif
    b"\0" * 8 + "caf\u00e9 \u732b".encode("utf_8"),             # undefined code: UTF-8
    "caf\u00e9 \u732b".encode("utf_8"),                         # no code at all
])
def test_user_comment_codes_and_byte_orders(comment):
    assert decode_user_comment(comment, "x.jpg") == "caf\u00e9 \u732b"


def test_ascii_user_comment_and_jpeg_com_comment(tmp_path):
    meta = read_image_metadata(jpeg_with_app1(tmp_path / "a.jpg", piexif_dump(b"ASCII\0\0\0" + b"p\nSteps: 3, "
                                                                               b"Seed: 1, Size: 8x8")))
    assert meta["prompt"] == "p" and meta["settings"] == {"Steps": 3, "Seed": 1, "Size": (8, 8)}
    Image.new("RGB", (8, 8)).save(tmp_path / "c.jpg", comment=b"q\nSteps: 4, Seed: 2, Size: 16x8")
    meta = read_image_metadata(tmp_path / "c.jpg")
    assert meta["prompt"] == "q" and meta["settings"]["Steps"] == 4


def test_a_user_comment_wins_over_a_png_parameters_chunk(tmp_path):
    """A1111's ``read_info_from_image`` takes the EXIF comment when there is one."""
    buffer = io.BytesIO()
    a1111_png(tmp_path / "x.png", "from the chunk\nSteps: 1, Seed: 1, Size: 8x8")
    with Image.open(tmp_path / "x.png") as image:
        info = image.info
        image.save(buffer, format="PNG", exif=piexif_dump(user_comment_unicode("from exif\nSteps: 2, Seed: 2, "
                                                                                "Size: 8x8")), pnginfo=None)
    (tmp_path / "y.png").write_bytes(buffer.getvalue())
    assert info["parameters"].startswith("from the chunk")
    assert read_image_metadata(tmp_path / "y.png")["prompt"] == "from exif"


def test_garbled_exif_is_one_error(tmp_path):
    broken = b"Exif\0\0MM\0\x2a" + struct.pack(">I", 0xFFFFFF00) + b"\0\x01\x02"
    path = jpeg_with_app1(tmp_path / "bad.jpg", broken)
    with pytest.raises(ImageError, match=r"bad.jpg: EXIF data is corrupt \("):
        read_image_metadata(path)
    odd = jpeg_with_app1(tmp_path / "odd.jpg", piexif_dump(b"UNICODE\0" + b"\x00a\x00"))
    with pytest.raises(ImageError, match=r"odd.jpg: EXIF UserComment is not UNICODE text \(utf_16_be\)"):
        read_image_metadata(odd)
    (tmp_path / "junk.webp").write_bytes(b"RIFF\x10\0\0\0WEBPjunkjunk")
    with pytest.raises(ImageError, match="cannot read image"):
        read_image_metadata(tmp_path / "junk.webp")



def test_json_nested_too_deep_is_kept_as_text(tmp_path):
    """A crafted ``prompt`` chunk deeper than Python's JSON parser recurses stays text (reproduce refuses it)."""
    deep = "[" * 200_000
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", deep)
    Image.new("RGB", (8, 8)).save(tmp_path / "deep.png", pnginfo=info)
    assert read_image_metadata(tmp_path / "deep.png")["comfyui_prompt"] == deep
