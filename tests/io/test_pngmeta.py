"""PNG metadata: A1111 infotext written and read by A1111's rules (in linear time, crafted texts too), nijimi recipe,
ComfyUI graphs, model hash; save_png never replaces a file unless asked."""

import hashlib
import json
import os
import time

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from nijimi.errors import CheckpointError, ImageError, OutputExistsError
from nijimi.io import pngmeta
from nijimi.io.imagemeta import read_image_metadata
from nijimi.io.pngmeta import (
    format_info,
    format_parameters,
    generation_settings,
    model_hash,
    parse_parameters,
    save_png,
)

# The example in A1111's parse_generation_parameters docstring (modules/infotext_utils.py).
A1111_DOC_INFOTEXT = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse "
    "Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, "
    "mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)

# An A1111 1.x infotext with a multi-line prompt, quoted values, hires fix and LoRA hashes.
A1111_V1_INFOTEXT = (
    "masterpiece, 1girl, <lora:add_detail:0.6>\n"
    "sunset, (city:1.2)\n"
    "Negative prompt: lowres, bad hands\n"
    "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234567890, Size: 512x768, Model hash: 0123456789, "
    "Model: anything-v5, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 10, "
    'Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03, '
    'badhand: 7dd5ebc7b2ae", Version: v1.7.0'
)


def test_format_parameters_writes_a1111_layout():
    settings = generation_settings(
        steps=20, sampler="DPM++ 2M Karras", cfg_scale=7.0, seed=42, size=(512, 512),
        extra={"Model hash": "0123456789", "Model": "name"},
    )  # fmt: skip
    assert format_parameters("a cat", "blurry", settings) == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 0123456789, "
        "Model: name"
    )


def test_format_parameters_keeps_an_empty_negative_line_omits_none_and_quotes_like_a1111():
    """The ``Negative prompt:`` line even when empty: ComfyUI's A1111 importer needs it."""
    settings = generation_settings(
        steps=4, sampler="Euler a", cfg_scale=7.5, seed=1, size=(640, 448),
        extra={"Clip skip": 2, "Lora hashes": "a: 1, b: 2", "Note": 'say "hi"\nbye', "Pad conds": True},
    )  # fmt: skip
    text = format_parameters("p", "", settings)
    assert text == (
        "p\nNegative prompt: \nSteps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 640x448, Clip skip: 2, "
        'Lora hashes: "a: 1, b: 2", Note: "say \\"hi\\"\\nbye", Pad conds: True'
    )
    assert parse_parameters(text)["settings"]["Note"] == 'say "hi"\nbye'
    assert parse_parameters(text)["negative_prompt"] == ""
    assert format_parameters("", "", {"Steps": 1}) == "\nNegative prompt: \nSteps: 1"  # the prompt's line stays


def test_parse_a1111_docstring_example():
    parsed = parse_parameters(A1111_DOC_INFOTEXT)
    assert parsed["prompt"] == A1111_DOC_INFOTEXT.split("\n")[0]
    assert parsed["negative_prompt"] == A1111_DOC_INFOTEXT.split("\n")[1][len("Negative prompt: ") :]
    assert parsed["settings"] == {
        "Steps": 20,
        "Sampler": "Euler a",
        "CFG scale": 7.0,
        "Seed": 965400086,
        "Size": (512, 512),
        "Model hash": "45dee52b",
    }
    assert type(parsed["settings"]["CFG scale"]) is float and type(parsed["settings"]["Steps"]) is int


def test_parse_multiline_prompt_and_quoted_values():
    parsed = parse_parameters(A1111_V1_INFOTEXT)
    assert parsed["prompt"] == "masterpiece, 1girl, <lora:add_detail:0.6>\nsunset, (city:1.2)"
    assert parsed["negative_prompt"] == "lowres, bad hands"
    settings = parsed["settings"]
    assert settings["Size"] == (512, 768) and settings["CFG scale"] == 6.5 and settings["Clip skip"] == 2
    assert settings["Denoising strength"] == 0.45 and settings["Hires upscale"] == 2.0 and settings["Hires steps"] == 10
    assert settings["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert settings["TI hashes"] == "easynegative: c74b4e810b03, badhand: 7dd5ebc7b2ae"
    assert settings["Version"] == "v1.7.0"
    assert list(settings)[:6] == ["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash"]


@pytest.mark.parametrize(
    ("text", "prompt", "negative", "settings"),
    [
        ("a cat: cute, b: c", "a cat: cute, b: c", "", {}),
        ("a cat\nSteps: 3, Seed: 1, Sampler: Euler", "a cat", "", {"Steps": 3, "Seed": 1, "Sampler": "Euler"}),
        ("Steps: 3, Seed: x, Sampler: Euler", "", "", {"Steps": 3, "Seed": "x", "Sampler": "Euler"}),
        ("a\nNegative prompt:\nb\nc", "a", "b\nc", {}),
        ("a\nNegative prompt: n\nSteps: 3, Sampler: , Seed: 2, Size: 8x16", "a", "n",
         {"Steps": 3, "Seed": 2, "Size": (8, 16)}),
        ("  a cat  \n\n", "a cat", "", {}),
        ('p\nx y z, Steps: 1, Aa: "q, \\"r\\"", Bb: "u" v, -/ Cc: 2,Dd:"",Ee: "x, A: 1', "p", "",
         {"Steps": 1, "Aa": 'q, "r"', "Bb": '"u" v', "Cc": "2", "Dd": "", "Ee": '"x'}),
    ],
)  # fmt: skip
def test_parse_parameters_follows_a1111_rules(text, prompt, negative, settings):
    parsed = parse_parameters(text)
    assert (parsed["prompt"], parsed["negative_prompt"], parsed["settings"]) == (prompt, negative, settings)


CRAFTED = {  # ~1 MB each: the shapes that made A1111's pattern (and nijimi's copy of it) take hours
    "words without colons": "a" + "word " * 200_000,
    "key characters without colons": "Key Key-Key/Key " * 62_500,
    "escaped quotes": 'Steps: 1, Seed: 2, Quoted: "' + '\\"x, ' * 200_000,
    "quotes": '"' * 1_000_000,
    "Key: pairs": "p\n" + "Key: v, " * 125_000,
    "colons": ":" * 1_000_000,
    "commas": "," * 1_000_000,
    "spaces then a colon": " " * 1_000_000 + ":",
}


@pytest.mark.parametrize("text", CRAFTED.values(), ids=CRAFTED.keys())
def test_a_crafted_megabyte_parses_in_under_a_second(text):
    start = time.process_time()  # this process's CPU time: other processes on the machine do not count
    parse_parameters(text)
    assert time.process_time() - start < 1.0


def test_an_infotext_over_the_limit_is_refused_naming_it():
    with pytest.raises(ImageError, match=f"infotext of {pngmeta.MAX_INFOTEXT + 1} characters is longer than the "
                                         f"{pngmeta.MAX_INFOTEXT} nijimi reads"):
        parse_parameters("a" * (pngmeta.MAX_INFOTEXT + 1))


def test_save_png_replaces_a_file_only_when_asked(tmp_path):
    path = tmp_path / "out.png"
    save_png(_image(0), path, "first")
    with pytest.raises(OutputExistsError, match=f"^{path} exists; use --overwrite to replace it$"):
        save_png(_image(1), path, "second")
    assert read_image_metadata(path)["parameters"] == "first"
    save_png(_image(1), path, "second", overwrite=True)
    assert read_image_metadata(path)["parameters"] == "second" and os.listdir(tmp_path) == ["out.png"]


def _image(seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_save_png_round_trip(tmp_path):
    image = _image()
    settings = generation_settings(steps=20, sampler="Euler", cfg_scale=7, seed=42, size=(32, 24))
    parameters = format_parameters("ein Kätzchen, 猫, (masterpiece:1.2)", "blurry, lowres", settings)
    recipe = {"sampler": "euler", "schedule": "karras", "dtype": np.float16, "hashes": {"unet": "abc"}, "steps": 20}
    path = tmp_path / "out.png"
    save_png(image, path, parameters, recipe)
    meta = read_image_metadata(path)
    assert meta["parameters"] == parameters
    assert meta["prompt"] == "ein Kätzchen, 猫, (masterpiece:1.2)" and meta["negative_prompt"] == "blurry, lowres"
    assert meta["settings"] == {"Steps": 20, "Sampler": "Euler", "CFG scale": 7.0, "Seed": 42, "Size": (32, 24)}
    assert meta["recipe"] == {**recipe, "dtype": "<class 'numpy.float16'>"}
    assert meta["comfyui_prompt"] is None and meta["comfyui_workflow"] is None
    with Image.open(path) as back:
        assert np.array_equal(np.asarray(back), np.asarray(image))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    info = format_info(meta)
    assert info.splitlines()[:3] == [
        "Prompt: ein Kätzchen, 猫, (masterpiece:1.2)",
        "Negative prompt: blurry, lowres",
        "Steps: 20",
    ]
    assert "Size: 32x24" in info and '  schedule: "karras"' in info


def test_png_written_the_a1111_way_parses(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_DOC_INFOTEXT)
    path = tmp_path / "00001-965400086.png"
    _image(1).save(path, pnginfo=info)
    meta = read_image_metadata(path)
    assert meta["parameters"] == A1111_DOC_INFOTEXT and meta["recipe"] is None
    assert meta["settings"]["Seed"] == 965400086 and meta["settings"]["Model hash"] == "45dee52b"
    assert meta["prompt"].startswith("girl with an artist's beret")
    assert meta["negative_prompt"].endswith("messy drawing")


def test_comfyui_png_parses(tmp_path):
    api_graph = {
        "3": {"class_type": "KSampler", "inputs": {"seed": 7, "steps": 20, "cfg": 8.0, "model": ["4", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    }
    workflow = {"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}, {"id": 4, "type": "CheckpointLoader"}]}
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(api_graph))
    info.add_text("workflow", json.dumps(workflow))
    path = tmp_path / "ComfyUI_00001_.png"
    _image(2).save(path, pnginfo=info)
    meta = read_image_metadata(path)
    assert meta["comfyui_prompt"] == api_graph and meta["comfyui_workflow"] == workflow
    assert meta["parameters"] is None and meta["prompt"] == "" and meta["settings"] == {}
    assert format_info(meta) == "ComfyUI prompt: 3 nodes\nComfyUI workflow: 2 nodes"


def test_png_without_metadata(tmp_path):
    path = tmp_path / "plain.png"
    _image().save(path)
    meta = read_image_metadata(path)
    assert meta["text"] == {} and meta["parameters"] is None
    assert format_info(meta) == "no generation metadata"


def test_reading_a_plain_jpeg_or_a_bad_file(tmp_path):
    jpeg, junk = tmp_path / "a.jpg", tmp_path / "b.png"
    _image().save(jpeg)
    junk.write_bytes(b"not an image")
    meta = read_image_metadata(jpeg)
    assert meta["format"] == "JPEG" and meta["parameters"] is None and meta["text"] == {}
    with pytest.raises(ImageError, match="b.png: cannot read image"):
        read_image_metadata(junk)
    with pytest.raises(ImageError, match="missing.png: image file not found"):
        read_image_metadata(tmp_path / "missing.png")


def test_failed_save_leaves_no_file(tmp_path):
    path = tmp_path / "cmyk.png"
    with pytest.raises(ImageError, match="cannot write PNG .* CMYK"):
        save_png(_image().convert("CMYK"), path, "p")
    assert list(tmp_path.iterdir()) == []


def test_model_hash_is_a1111_sha256_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("NIJIMI_CACHE_DIR", str(tmp_path / "cache"))
    empty, abc = tmp_path / "empty.bin", tmp_path / "abc.bin"
    empty.write_bytes(b"")
    abc.write_bytes(b"abc")
    assert model_hash(empty) == "e3b0c44298"  # SHA-256 test vectors (FIPS 180-2)
    assert model_hash(abc) == "ba7816bf8f"
    data = np.random.default_rng(5).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    big = tmp_path / "model.safetensors"
    big.write_bytes(data)
    monkeypatch.setattr(pngmeta, "HASH_BLOCK", 4096)
    assert model_hash(big) == hashlib.sha256(data).hexdigest()[:10]
    with pytest.raises(CheckpointError, match="missing.ckpt"):
        model_hash(tmp_path / "missing.ckpt")


def test_model_hash_is_cached_per_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("NIJIMI_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"abc")
    assert model_hash(model) == "ba7816bf8f"
    assert (tmp_path / "cache" / "model_hashes.json").is_file()
    stat = model.stat()
    model.write_bytes(b"abd")  # same size; with the old mtime back, only a re-read could notice
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_hash(model) == "ba7816bf8f"
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_hash(model) == hashlib.sha256(b"abd").hexdigest()[:10]
    gone, other = tmp_path / "gone.bin", tmp_path / "other.bin"
    gone.write_bytes(b"x")
    other.write_bytes(b"y")
    model_hash(gone)
    gone.unlink()
    model_hash(other)
    cache = json.loads((tmp_path / "cache" / "model_hashes.json").read_text())
    assert sorted(cache) == sorted(str(p.absolute()) for p in (model, other))  # entries of deleted files dropped


def test_model_hash_ignores_a_corrupt_cache_and_uses_the_xdg_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("NIJIMI_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pngmeta.cache_dir() == tmp_path / "xdg" / "nijimi"
    (tmp_path / "xdg" / "nijimi").mkdir(parents=True)
    (tmp_path / "xdg" / "nijimi" / "model_hashes.json").write_text("{not json")
    model = tmp_path / "abc.bin"
    model.write_bytes(b"abc")
    assert model_hash(model) == "ba7816bf8f"
    cache = json.loads((tmp_path / "xdg" / "nijimi" / "model_hashes.json").read_text())
    assert cache == {str(model.absolute()): [3, model.stat().st_mtime_ns, hashlib.sha256(b"abc").hexdigest()]}
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pngmeta.cache_dir() == tmp_path / "home" / ".cache" / "nijimi"
