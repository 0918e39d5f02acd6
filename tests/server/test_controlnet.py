"""The sd-webui-controlnet extension's API against a running server (a real HTTP client): a unit steers txt2img to
the very pixels ``nijimi generate --control`` makes and records itself as generate does, a saved image replays with
``nijimi reproduce``, the extension's own endpoints answer, and bad units are refused naming the field."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import png_pixels, run_cli
from PIL import Image, ImageDraw

from nijimi.embedded import CONTROLNET
from nijimi.errors import ConfigError
from nijimi.io.find import legacy_model_hash
from nijimi.io.imagemeta import read_image_metadata
from nijimi.pipelines.control_maps import ControlSpec, canny
from nijimi.pipelines.request import GenerationRequest
from nijimi.server.a1111 import Limits
from nijimi.server.controlnet import read_units
from nijimi.server.folders import ControlNetEntry

FAST = {"prompt": "a red circle", "steps": 3, "seed": 7, "width": 64, "height": 64}
EMBEDDED_TITLE = f"embedded-controlnet-mask [{legacy_model_hash(CONTROLNET)}]"
README = Path(__file__).parents[2] / "README.md"


def layout() -> Image.Image:
    """A silhouette mask: a white disc on black, 80×48 (not the output's size, so resizing matters)."""
    picture = Image.new("RGB", (80, 48))
    ImageDraw.Draw(picture).ellipse((10, 6, 46, 42), fill=(255, 255, 255))
    return picture


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def txt2img(served, *units, **fields):
    return served.call("/sdapi/v1/txt2img", {**FAST, **fields, "alwayson_scripts": {"controlnet": {"args": units}}})


def generate_cli(capsys, tmp_path, spec: str, name: str = "cli.png"):
    out = tmp_path / name
    code, _, err = run_cli(capsys, "generate", FAST["prompt"], "--steps", 3, "--seed", 7, "--size", "64x64",
                           "--control", spec, "--out", out, "--quiet")
    assert (code, err) == (0, "")
    return out


def test_a_unit_makes_the_pixels_of_generate_and_records_itself(served, capsys, tmp_path):
    layout().save(tmp_path / "layout.png")
    unit = {"enabled": True, "image": b64(layout()), "module": "none", "model": EMBEDDED_TITLE, "weight": 0.8,
            "guidance_start": 0.0, "guidance_end": 0.9, "resize_mode": "Just Resize", "control_mode": 2,
            "processor_res": 512, "threshold_a": 64, "threshold_b": 64, "pixel_perfect": False, "low_vram": False}
    status, answer = txt2img(served, unit, save_images=True)
    assert (status, answer["warnings"]) == (200, [])
    cli = generate_cli(capsys, tmp_path, f"model=embedded,image={tmp_path / 'layout.png'},scale=0.8,end=0.9,"
                                         "guess=true")
    np.testing.assert_array_equal(served.pixels(answer["images"][0]), png_pixels(cli))
    text = json.loads(answer["info"])["infotexts"][0]
    assert text == read_image_metadata(cli)["parameters"]
    assert (f'ControlNet 0: "Module: none, Model: {EMBEDDED_TITLE}, Weight: 0.8, Resize Mode: Just Resize, Guidance '
            'Start: 0, Guidance End: 0.9, Control Mode: ControlNet is more important"') in text
    plain = served.call("/sdapi/v1/txt2img", FAST)[1]
    assert np.abs(served.pixels(plain["images"][0]).astype(int) - png_pixels(cli)).max() > 20
    saved = served.root / "outputs" / json.loads(answer["info"])["files"][0]
    control = read_image_metadata(saved)["recipe"]["request"]["control"][0]
    assert (control["model"], control["guess"]) == (str(CONTROLNET), True)
    again = tmp_path / "again.png"
    assert run_cli(capsys, "reproduce", saved, "--out", again, "--quiet")[0] == 0
    np.testing.assert_array_equal(png_pixels(again), png_pixels(cli))


def test_a_canny_unit_from_the_folder_in_the_extensions_old_field_names(served, capsys, tmp_path):
    layout().save(tmp_path / "layout.png")
    unit = {"input_image": b64(layout()), "module": "canny", "model": "MASK", "threshold_a": 50, "guidance": 0.8,
            "lowvram": True, "pixel_perfect": True, "processor_res": 512}
    status, answer = txt2img(served, unit)
    assert (status, answer["warnings"]) == (200, [])
    cli = generate_cli(capsys, tmp_path, f"model={served.root / 'controlnets' / 'mask.safetensors'},"
                                         f"image={tmp_path / 'layout.png'},pre=canny,low=50,high=200,end=0.8,"
                                         "resize=crop")
    np.testing.assert_array_equal(served.pixels(answer["images"][0]), png_pixels(cli))
    sent = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    assert "ControlNet 0" in sent.info["parameters"] and "nijimi" not in sent.info  # an in-memory image: no recipe


def test_img2img_units_take_the_init_image_and_several_units_add_up(served):
    init = b64(layout().resize((64, 64)))
    units = [{"model": "embedded", "weight": 0.5}, {"model": "mask", "weight": 0.5, "image": [b64(layout()), init]}]
    status, answer = served.call("/sdapi/v1/img2img", {**FAST, "init_images": [init], "denoising_strength": 0.6,
                                                       "alwayson_scripts": {"ControlNet": {"args": units}}})
    assert status == 200
    assert answer["warnings"] == ["alwayson_scripts.controlnet.args[1]: nijimi's preprocessors take no mask; the "
                                  "mask is ignored"]
    text = json.loads(answer["info"])["infotexts"][0]
    assert 'ControlNet 0: "Module: none, Model: embedded-controlnet-mask [' in text
    assert f'ControlNet 1: "Module: none, Model: mask [{legacy_model_hash(CONTROLNET)}], Weight: 0.5, Resize Mode: '\
           'Crop and Resize' in text


def test_what_nijimi_does_not_have_is_named(served):
    unit = {"image": b64(layout()), "model": "mask", "module": "canny", "control_mode": "My prompt is more important",
            "processor_res": 512, "hr_option": "Low res only", "magic": 1, "save_detected_map": True}
    status, answer = txt2img(served, unit)
    assert status == 200
    key = "alwayson_scripts.controlnet.args[0]"
    assert answer["warnings"] == [
        f"{key}.hr_option is not supported by nijimi; ignored",
        f"{key}.magic is not a ControlNet unit field nijimi knows; ignored",
        f"{key}.control_mode 'My prompt is more important' is not supported by nijimi; the unit runs Balanced",
        f"{key}.processor_res 512: nijimi runs canny on the image at the output size (the extension's "
        "pixel_perfect); ignored"]
    status, answer = served.call("/sdapi/v1/txt2img", {**FAST, "steps": 1, "alwayson_scripts": {
        "ADetailer": {"args": [True]}, "controlnet": {"args": [{"enabled": False, "model": "nothing"}]}}})
    assert (status, answer["warnings"]) == (200, ["alwayson_scripts.ADetailer is not supported by nijimi; ignored"])


def test_the_extensions_endpoints(served):
    assert served.call("/controlnet/version") == (200, {"version": 2})
    assert served.call("/controlnet/settings") == (200, {"control_net_unit_count": 3})
    assert served.call("/controlnet/model_list") == (200, {"model_list": [
        EMBEDDED_TITLE, f"mask [{legacy_model_hash(CONTROLNET)}]"]})  # the symlink out of the folder is not listed
    status, modules = served.call("/controlnet/module_list")
    assert (status, modules["module_list"]) == (200, ["none", "canny", "invert"])
    assert [s["value"] for s in modules["module_detail"]["canny"]["sliders"]] == [512, 100, 200]
    aliases = served.call("/controlnet/module_list?alias_names=true")[1]["module_list"]
    assert aliases == ["none", "canny", "invert (from white bg & black line)"]
    picture = layout()
    status, answer = served.call("/controlnet/detect", {
        "controlnet_module": "canny", "controlnet_input_images": [b64(picture)], "controlnet_threshold_a": 50,
        "controlnet_threshold_b": 150})
    assert (status, answer["info"], len(answer["images"])) == (200, "Success", 1)
    np.testing.assert_array_equal(served.pixels(answer["images"][0]), np.asarray(canny(picture, 50, 150)))
    status, answer = served.call("/controlnet/detect", {
        "controlnet_module": "invert (from white bg & black line)", "controlnet_input_images": [b64(picture)] * 2,
        "controlnet_processor_res": 24})
    assert status == 200 and [served.pixels(i).shape for i in answer["images"]] == [(24, 40, 3)] * 2
    assert served.pixels(answer["images"][0])[12, 14].tolist() == [0, 0, 0]  # inside the disc: white → black


@pytest.mark.parametrize("unit, status, detail", [
    ({"model": "nothing"}, 422, "alwayson_scripts.controlnet.args[0].model: no ControlNet model 'nothing'; the "
                                "ControlNet models here: embedded-controlnet-mask, mask"),
    ({"model": "mask", "module": "depth_midas"}, 422, "alwayson_scripts.controlnet.args[0].module 'depth_midas': "
                                                      "not a preprocessor nijimi has; it has none, canny, invert"),
    ({"model": "mask", "image": "not base64!"}, 422, "alwayson_scripts.controlnet.args[0].image: not base64 data"),
    ({"model": "mask", "image": None}, 422, "alwayson_scripts.controlnet.args[0].image: the unit has no control "
                                            "image (base64)"),
    ({"model": "None"}, 422, "alwayson_scripts.controlnet.args[0].model: the unit names no ControlNet model"),
    ({"model": "mask", "weight": 3}, 422, "alwayson_scripts.controlnet.args[0].weight must be a number from 0 to 2"),
    ({"model": "mask", "guidance_start": 0.5, "guidance_end": 0.5}, 422,
     "alwayson_scripts.controlnet.args[0]: guidance_start 0.5 must be below guidance_end 0.5"),
    ({"model": "mask", "resize_mode": "Stretch"}, 422, "alwayson_scripts.controlnet.args[0].resize_mode 'Stretch' "
                                                       "must be 0 to 3 or one of Just Resize, Crop and Resize"),
    ({"model": "mask", "module": "canny", "threshold_a": 200, "threshold_b": 100}, 422,
     "alwayson_scripts.controlnet.args[0].threshold_a 200 must not exceed threshold_b 100 (canny's low and high "
     "thresholds)"),
    ({"model": "mask", "image": "x", "input_image": "y"}, 422, "alwayson_scripts.controlnet.args[0]: give 'image' or "
                                                               "its old name 'input_image', not both"),
    ("mask", 422, "alwayson_scripts.controlnet.args[0] must be a ControlNet unit (an object), not str"),
], ids=["unknown-model", "unknown-module", "bad-base64", "no-image", "no-model", "weight", "guidance", "resize",
        "thresholds", "two-names", "not-an-object"])
def test_bad_units_are_refused_naming_the_field(served, unit, status, detail):
    if isinstance(unit, dict):
        unit = {"image": b64(layout()), **unit}
    code, answer = txt2img(served, unit)
    assert code == status and answer["detail"].startswith(detail), answer


def test_too_many_units_and_controlnets_outside_the_folder_are_refused(served):
    unit = {"image": b64(layout()), "model": "mask"}
    code, answer = txt2img(served, *[unit] * 4)
    assert (code, answer["detail"]) == (422, "alwayson_scripts.controlnet: 4 enabled units; nijimi takes at most 3 "
                                             "(GET /controlnet/settings)")
    for name in ("outside", "outside.safetensors", "../secret.txt", str(served.root / "controlnets" / "mask"),
                 str(CONTROLNET)):
        code, answer = txt2img(served, {**unit, "model": name})
        assert (code, answer["detail"]) == (422, f"alwayson_scripts.controlnet.args[0].model: no ControlNet model "
                                                 f"{name!r}; the ControlNet models here: embedded-controlnet-mask, "
                                                 "mask")
    code, answer = served.call("/controlnet/detect", {"controlnet_module": "openpose", "controlnet_input_images": []})
    assert (code, answer["detail"]) == (422, "controlnet_module 'openpose': not a preprocessor nijimi has; it has "
                                             "none, canny, invert (GET /controlnet/module_list)")
    code, answer = served.call("/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": []})
    assert (code, answer["detail"]) == (422, "controlnet_input_images must be a list of 1 to 256 base64 images")
    code, answer = served.call("/controlnet/detect", {"controlnet_module": "canny", "controlnet_threshold_a": 300,
                                                      "controlnet_input_images": [b64(layout())]})
    assert (code, answer["detail"]) == (422, "controlnet_threshold_a must be a number from -1 to 255, not 300")
    code, answer = served.call("/controlnet/detect", {"controlnet_module": "none", "controlnet_input_images": ["@"]})
    assert (code, answer["detail"]) == (422, "controlnet_input_images[0]: not base64 data")


def test_the_readme_controlnet_example_works_as_written(served, tmp_path, monkeypatch, capsys):
    section = README.read_text(encoding="utf-8").split("\n## nijimi serve\n", 1)[1].split("\n## ", 1)[0]
    code = next(block for block in re.findall(r"```python\n(.*?)```", section, re.S) if "alwayson_scripts" in block)
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:7860", served.url), "README.md", "exec"), {})
    assert capsys.readouterr().out == f"{EMBEDDED_TITLE} []\n"
    layout = Image.new("RGB", (64, 64))
    ImageDraw.Draw(layout).ellipse((8, 8, 40, 40), fill="white")
    request = GenerationRequest("a red circle", steps=20, seed=42, width=64, height=64,
                                control=(ControlSpec("embedded", layout),))
    np.testing.assert_array_equal(png_pixels(tmp_path / "controlnet.png"),
                                  np.asarray(served.pipe.generate(request).images[0]).astype(int))


def test_unit_forms_and_numbered_modes_without_a_server():
    models = [ControlNetEntry("Lines", Path("/cn/Lines.safetensors"))]
    picture, mask = b64(layout()), b64(Image.new("L", (80, 48)))
    forms = [{"image": picture}, {"image": {"image": picture, "mask": mask}}, {"image": [{"image": picture}]},
             {"image": [picture, mask]}, {"input_image": picture, "mask_image": mask}]
    for form in forms:
        spec = read_units({"args": [{"model": "lines [0000abcd]", **form}]}, {}, "txt2img", Limits(), models)[0]
        assert np.array_equal(np.asarray(spec["control"][0].image.convert("RGB")), np.asarray(layout()))
    for number, resize in enumerate(("resize", "crop", "fill", "resize")):
        unit = {"image": picture, "model": "Lines", "resize_mode": number, "control_mode": number % 3,
                "module": "Invert (from white bg & black line)", "guidance": 0.5}
        (spec,) = read_units({"args": [unit]}, {}, "txt2img", Limits(), models)[0]["control"]
        assert (spec.model, spec.resize, spec.pre, spec.end, spec.guess) == ("/cn/Lines.safetensors", resize,
                                                                             "invert", 0.5, number == 2)
    assert read_units({"args": [{"image": picture, "model": "Lines", "resize_mode": "Envelope (Outer Fit)"}]}, {},
                      "txt2img", Limits(), models)[0]["control"][0].resize == "fill"
    with pytest.raises(ConfigError, match=r"args\[0\].image: one image, \{\"image\", \"mask\"\} or \[image, mask\]; "
                                          "several input images are for IP-Adapter units"):
        read_units({"args": [{"model": "Lines", "image": [{"image": picture}] * 2}]}, {}, "txt2img", Limits(), models)
    with pytest.raises(ConfigError, match=r'alwayson_scripts.controlnet must be \{"args": \[unit, …\]\}'):
        read_units([picture], {}, "txt2img", Limits(), models)
