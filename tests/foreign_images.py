"""Images written the way AUTOMATIC1111 and ComfyUI write them, byte for byte where it matters, made with Pillow only.

Sources of the format facts:

- A1111 ``modules/images.py`` ``save_image_with_geninfo``: a PNG gets a tEXt chunk ``parameters``; a JPEG or WebP
  is saved by Pillow, then ``piexif.insert(piexif.dump({"Exif": {piexif.ExifIFD.UserComment:
  piexif.helper.UserComment.dump(geninfo, encoding="unicode")}}), filename)``.
- piexif ``helper.py``: ``UserComment.dump(…, "unicode")`` is ``b"UNICODE\\0"`` + the text in UTF-16 big-endian.
- piexif ``_dump.py``: ``b"Exif\\0\\0"``, a big-endian TIFF header ``MM\\0*`` with IFD0 at offset 8; IFD0 holds one
  entry, the Exif IFD pointer (0x8769, LONG) — its entry count is written as 1 —, then a zero next-IFD offset; the
  Exif IFD (no next-IFD offset) holds UserComment (0x9286, UNDEFINED) whose bytes follow it.
- piexif ``_insert.py`` / ``_common.merge_segments``: in a JPEG the APP1 segment replaces Pillow's JFIF APP0
  segment; in a WebP the bytes without ``Exif\\0\\0`` become an ``EXIF`` chunk after the image data, with the VP8X
  EXIF flag set (what Pillow's WebP writer does with ``exif=``).
- ComfyUI ``nodes.py`` ``SaveImage``: tEXt ``prompt`` = ``json.dumps(api_graph)`` and one tEXt per extra PNG-info
  entry (``workflow``), ``compress_level=4``; ``comfy_extras/nodes_images.py`` ``SaveAnimatedWEBP``: EXIF IFD0 tag
  0x0110 = ``"prompt:" + json``, 0x010F = ``"workflow:" + json``.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

from PIL import Image, PngImagePlugin


def user_comment_unicode(text: str) -> bytes:
    """piexif's ``UserComment.dump(text, encoding="unicode")``."""
    return b"UNICODE\0" + text.encode("utf_16_be")


def piexif_dump(user_comment: bytes) -> bytes:
    """piexif's ``dump({"Exif": {UserComment: user_comment}})``."""
    head = b"Exif\0\0" + b"MM\0\x2a" + struct.pack(">I", 8)
    zeroth = struct.pack(">H", 1) + struct.pack(">HHII", 0x8769, 4, 1, 8 + 18) + b"\0\0\0\0"
    exif_ifd = struct.pack(">H", 1) + struct.pack(">HHII", 0x9286, 7, len(user_comment), 8 + 18 + 14)
    return head + zeroth + exif_ifd + user_comment


def _picture() -> Image.Image:
    return Image.new("RGB", (64, 48), (90, 140, 200))


def a1111_png(path: Path, infotext: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    _picture().save(path, format="PNG", pnginfo=info)
    return path


def jpeg_with_app1(path: Path, app1_payload: bytes) -> Path:
    """A Pillow JPEG whose JFIF APP0 segment is replaced by an APP1 segment (piexif.insert)."""
    buffer = io.BytesIO()
    _picture().save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    assert data[2:4] == b"\xff\xe0", "Pillow writes JFIF APP0 first"
    app0_end = 4 + struct.unpack(">H", data[4:6])[0]
    path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1_payload) + 2) + app1_payload
                     + data[app0_end:])
    return path


def a1111_jpeg(path: Path, infotext: str) -> Path:
    return jpeg_with_app1(path, piexif_dump(user_comment_unicode(infotext)))


def a1111_webp(path: Path, infotext: str) -> Path:
    _picture().save(path, format="WEBP", quality=80, exif=piexif_dump(user_comment_unicode(infotext)))
    return path


def comfyui_png(path: Path, graph: dict, workflow: dict | None = None) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph))
    info.add_text("workflow", json.dumps(workflow or {"nodes": [], "links": []}))
    _picture().save(path, format="PNG", pnginfo=info, compress_level=4)
    return path


def comfyui_webp(path: Path, graph: dict) -> Path:
    exif = _picture().getexif()
    exif[0x0110] = "prompt:" + json.dumps(graph)
    exif[0x010F] = "workflow:" + json.dumps({"nodes": []})
    _picture().save(path, format="WEBP", exif=exif)
    return path


def comfyui_graph(ckpt: str = "sd15/model.safetensors", lora: str | None = "pink.safetensors") -> dict:
    """ComfyUI's default text-to-image graph in API format, with a LoRA and CLIPSetLastLayer between the checkpoint
    and the encoders, a VAELoader, and seed/steps/cfg as the KSampler's widgets."""
    model, clip = ["4", 0], ["4", 1]
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 1234, "steps": 3, "cfg": 6.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0,
            "model": None, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["11", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["11", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }
    if lora:
        graph["10"] = {"class_type": "LoraLoader", "inputs": {"lora_name": lora, "strength_model": 0.8,
                                                              "strength_clip": 0.6, "model": model, "clip": clip}}
        model, clip = ["10", 0], ["10", 1]
    graph["11"] = {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -2, "clip": clip}}
    graph["3"]["inputs"]["model"] = model
    return graph
