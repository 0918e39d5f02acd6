"""``nijimi reproduce`` and ``nijimi info`` on images made by A1111 (PNG, JPEG, WebP) and ComfyUI (PNG), run end to
end on the embedded model: the same pixels as ``nijimi generate`` with the settings the image states, warnings one
line each, bad files one error line. And nijimi's own PNGs read back by A1111's and ComfyUI's rules."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
from foreign_images import (
    a1111_jpeg,
    a1111_png,
    a1111_webp,
    comfyui_graph,
    comfyui_png,
    jpeg_with_app1,
    piexif_dump,
    user_comment_unicode,
)
from helpers import png_pixels as pixels
from helpers import run_cli as run

from nijimi.embedded import ADAPTERS, WEIGHTS
from nijimi.io.find import lora_hash
from nijimi.io.imagemeta import read_image_metadata
from nijimi.io.pngmeta import model_hash

PINK = ADAPTERS / "pink.safetensors"


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    """A user's folders: the embedded model under another name, its demo LoRA renamed."""
    root = tmp_path_factory.mktemp("webui")
    (root / "models").mkdir()
    shutil.copy(WEIGHTS, root / "models" / "shapes-v1.safetensors")
    (root / "loras").mkdir()
    shutil.copy(PINK, root / "loras" / "pinkish.safetensors")
    return root


def _infotext() -> str:
    return ("a red circle on the left <lora:pink:0.7>\nNegative prompt: blue\n"
            "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 42, Size: 64x64, "
            f"Model hash: {model_hash(WEIGHTS)}, Model: some-other-name, Clip skip: 2, RNG: CPU, "
            f'Lora hashes: "pink: {lora_hash(PINK)[:12]}", ADetailer model: face_yolov8n.pt, Version: v1.10.1')


GENERATE = ["a red circle on the left ", "-n", "blue", "--steps", 3, "--sampler", "dpm++2m-karras", "--cfg", 5,
            "--seed", 42, "--size", "64x64", "--clip-skip", 2, "--lora", f"{PINK}:0.7", "--quiet"]


@pytest.mark.parametrize("writer", [a1111_png, a1111_jpeg, a1111_webp])
def test_reproduce_an_a1111_image(capsys, webui, tmp_path, writer):
    """The model and the LoRA are found by their hashes under other names; the image equals `nijimi generate`'s."""
    image = writer(tmp_path / f"a1111.{writer.__name__.split('_')[1]}", _infotext())
    out = tmp_path / "again.png"
    code, stdout, err = run(capsys, "reproduce", image, "--models-dir", webui / "models", "--lora-dir",
                            webui / "loras", "--out", out, "--quiet")
    assert (code, stdout.strip()) == (0, str(out))
    assert err == "warning: ADetailer model: not reproduced (a setting nijimi does not have)\n"
    request = read_image_metadata(out)["recipe"]["request"]
    assert request["loras"] == [["pinkish.safetensors", 0.7, 0.7]]  # by name (and hash): nijimi's recipes
    assert (request["sampler"], request["schedule"], request["seed"], request["clip_skip"]) == (
        "dpm++2m", "karras", 42, 2)
    expected = tmp_path / "expected.png"
    assert run(capsys, "generate", *GENERATE, "--model", webui / "models" / "shapes-v1.safetensors",
               "--out", expected)[0] == 0
    assert np.array_equal(pixels(out), pixels(expected))


def test_reproduce_a_comfyui_image(capsys, webui, tmp_path):
    graph = comfyui_graph(ckpt="shapes-v1.safetensors", lora="pinkish.safetensors")
    graph["3"]["inputs"].update(seed=42, steps=3, cfg=5)
    graph["5"]["inputs"].update(width=64, height=64)
    graph["6"]["inputs"]["text"], graph["7"]["inputs"]["text"] = "a red circle on the left", "blue"
    image = comfyui_png(tmp_path / "comfy.png", graph)
    out = tmp_path / "again.png"
    code, stdout, err = run(capsys, "reproduce", image, "--models-dir", webui / "models", "--lora-dir",
                            webui / "loras", "--out", out, "--quiet")
    assert (code, stdout.strip(), err) == (0, str(out), "")
    assert read_image_metadata(out)["recipe"]["request"]["loras"] == [["pinkish.safetensors", 0.6, 0.8]]
    expected = tmp_path / "expected.png"
    flags = [f if f != f"{PINK}:0.7" else f"{PINK}:0.6:0.8" for f in GENERATE]
    flags[0] = "a red circle on the left"
    assert run(capsys, "generate", *flags, "--model", WEIGHTS, "--out", expected)[0] == 0
    assert np.array_equal(pixels(out), pixels(expected))
    code, text, _ = run(capsys, "info", image)
    assert code == 0 and "ComfyUI settings:" in text and "  Sampler: dpmpp_2m" in text.splitlines()
    assert "  LoRA: pinkish.safetensors (text encoder 0.6, U-Net 0.8)" in text.splitlines()


def test_info_reads_jpeg_and_webp(capsys, tmp_path):
    for writer in (a1111_jpeg, a1111_webp):
        code, text, err = run(capsys, "info", writer(tmp_path / f"x.{writer.__name__[6:]}", _infotext()))
        lines = text.splitlines()
        assert (code, err) == (0, "") and lines[:2] == ["Prompt: a red circle on the left <lora:pink:0.7>",
                                                        "Negative prompt: blue"]
        assert "Schedule type: Karras" in lines and "Size: 64x64" in lines


def test_bad_foreign_images_are_one_error_line(capsys, webui, tmp_path):
    garbled = jpeg_with_app1(tmp_path / "garbled.jpg", b"Exif\0\0MM\0\x2a\xff\xff\xff\x00\0\x01")
    odd = jpeg_with_app1(tmp_path / "odd.jpg", piexif_dump(user_comment_unicode("x")[:-1]))
    cyclic = comfyui_graph(lora=None)
    cyclic["3"]["inputs"]["model"] = ["30", 0]
    cyclic["30"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["30", 0]}}
    huge = {str(i): {"class_type": "Note", "inputs": {}} for i in range(20_000)}
    cases = {
        garbled: f"error: {garbled}: EXIF data is corrupt (",
        odd: f"error: {odd}: EXIF UserComment is not UNICODE text (utf_16_be)",
        comfyui_png(tmp_path / "cyclic.png", cyclic): "error: ComfyUI graph has a cycle through node 30",
        comfyui_png(tmp_path / "huge.png", huge): "error: ComfyUI graph has 20000 nodes; nijimi reads at most 10000",
        a1111_png(tmp_path / "nomodel.png", _infotext()): "error: A1111 image made with model 'some-other-name' [",
    }
    for image, message in cases.items():
        for command in ("reproduce", "info"):
            if command == "info" and image.name == "nomodel.png":
                continue
            code, out, err = run(capsys, command, image, "--out", tmp_path / "r.png") if command == "reproduce" \
                else run(capsys, command, image)
            assert (code, out) == (2, "") and err.startswith(message) and len(err.splitlines()) == 1, (command, err)
    assert not (tmp_path / "r.png").exists()


# ---- nijimi's PNGs as A1111 and ComfyUI read them --------------------------------------------------------------------

# A1111 modules/infotext_utils.py: re_param_code and parse_generation_parameters (the rules, written out here).
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_parse(x: str) -> dict[str, str]:
    """parse_generation_parameters: prompt lines until ``Negative prompt:``; the last line holds the settings if
    re_param finds at least 3 pairs; quoted values are JSON; ``WxH`` values split into ``-1``/``-2``; a missing Clip
    skip is 1, a missing RNG is GPU, a missing Schedule type is Automatic."""
    res: dict[str, str] = {}
    prompt, negative, done = "", "", False
    *lines, last = x.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done, line = True, line[16:].strip()
        if done:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in RE_PARAM.findall(last):
        if v[:1] == '"' and v[-1:] == '"':
            v = json.loads(v)
        m = RE_IMAGESIZE.match(v)
        if m:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    res.setdefault("Clip skip", "1")
    res.setdefault("RNG", "GPU")
    res.setdefault("Schedule type", "Automatic")
    return res


def comfyui_import(parameters: str) -> dict:
    """ComfyUI_frontend src/scripts/pnginfo.ts ``importA1111``: the widget values it sets."""
    p = parameters.rfind("\nSteps:")
    opts = {}
    for match in re.finditer(r'\s*([^:]+:\s*([^"\{].*?|".*?"|\{.*?\}))\s*(,|$)', parameters[p:].split("\n")[1]):
        s = match.group(0).split(":")
        value = s[1][:-1] if s[1].endswith(",") else s[1]
        opts[s[0].strip().lower()] = value.strip()
    p2 = parameters.rfind("\nNegative prompt:", 0, p + 1)
    assert p2 > -1, "the importer reads nothing without a Negative prompt line"
    positive, negative = parameters[:p2].strip(), parameters[p2 + 18:p].strip()
    loras = []

    def take(m: re.Match) -> str:
        name, weight = m.group(1).split(":")[:2]
        loras.append((name, float(re.match(r"[-+]?\d*\.?\d*", weight).group(0))))
        return ""

    positive = re.sub(r"<lora:([^:]+:[^>]+)>", take, positive)
    name = opts["sampler"].lower().replace("++", "pp").replace(" ", "_")
    scheduler = "karras" if "karras" in name else "normal"
    name = re.sub(r"_+$", "", name.replace("karras", "", 1))
    w, h = (math.ceil(int(v) / 64) * 64 for v in opts["size"].split("x"))
    return {"ckpt_name": opts.get("model"), "cfg": float(opts["cfg scale"]), "stop_at_clip_layer":
            -int(opts["clip skip"]) if "clip skip" in opts else None, "sampler_name": name, "scheduler": scheduler,
            "width": w, "height": h, "steps": int(opts["steps"]), "seed": int(opts["seed"]), "positive": positive,
            "negative": negative, "loras": loras}


def test_nijimi_pngs_read_back_by_a1111_and_comfyui_rules(capsys, tmp_path):
    out = tmp_path / "n.png"
    assert run(capsys, "generate", "a red circle <lora:pink:0.5>", "--lora", f"{PINK}:0.7", "--steps", 2,
               "--seed", 9, "--size", "64x64", "--cfg", 6, "--clip-skip", 2, "--sampler", "DPM++ 2M Karras",
               "--quiet", "--out", out)[0] == 0
    text = read_image_metadata(out)["parameters"]
    pink = lora_hash(PINK)[:12]
    assert text.endswith(f'RNG: CPU, Lora hashes: "pink: {pink}"')
    res = a1111_parse(text)
    assert res["Prompt"] == "a red circle <lora:pink:0.5> <lora:pink:0.7>" and res["Negative prompt"] == ""
    assert {k: res[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size-1", "Size-2", "Model hash", "Model",
                                "Clip skip", "RNG", "Lora hashes")} == {
        "Steps": "2", "Sampler": "DPM++ 2M Karras", "CFG scale": "6", "Seed": "9", "Size-1": "64", "Size-2": "64",
        "Model hash": model_hash(WEIGHTS), "Model": "embedded", "Clip skip": "2", "RNG": "CPU",
        "Lora hashes": f"pink: {pink}"}
    assert comfyui_import(text) == {
        "ckpt_name": "embedded", "cfg": 6.0, "stop_at_clip_layer": -2, "sampler_name": "dpmpp_2m",
        "scheduler": "karras", "width": 64, "height": 64, "steps": 2, "seed": 9, "positive": "a red circle  ",
        "negative": "", "loras": [("pink", 0.5), ("pink", 0.7)]}
