"""The page's side of the server through a real HTTP client: the bundle served at ``/`` (complete, nothing fetched
from elsewhere), the gallery of saved images, and ``/nijimi/v1/recipe`` reading nijimi, A1111 (PNG, JPEG) and
ComfyUI images into txt2img fields that ask for the same request."""

from __future__ import annotations

import base64
import http.client
import json
import re

import pytest
from foreign_images import a1111_jpeg, a1111_png, comfyui_graph, comfyui_png
from PIL import Image

from nijimi.embedded import ADAPTERS
from nijimi.pipelines.adapters import LoraRequest
from nijimi.pipelines.request import GenerationRequest
from nijimi.server.a1111 import TXT2IMG, Limits, parse_call, request_fields
from nijimi.server.page import PAGE


def get(served, path: str) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", served.server.server_address[1], timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    answer = response.status, response.getheader("Content-Type"), response.read()
    connection.close()
    return answer


@pytest.mark.parametrize("body", [
    {"prompt": "a red circle", "negative_prompt": "blue", "steps": 7, "cfg_scale": 5.5, "seed": 3, "width": 64,
     "height": 48, "batch_size": 2, "sampler_name": "Euler a", "scheduler": "karras", "subseed": 9,
     "subseed_strength": 0.25, "eta": 0.5},
    {"prompt": "a star <lora:pink:0.5>", "seed": -1},
])
def test_request_fields_ask_for_the_same_request(body):
    request = parse_call(body, TXT2IMG, Limits()).request
    again = parse_call(request_fields(request), TXT2IMG, Limits())
    assert again.request == request and again.warnings == ()


def test_request_fields_write_loras_as_prompt_tags():
    pink = ADAPTERS / "pink.safetensors"
    request = GenerationRequest("a cat ", loras=(LoraRequest(pink, 0.6, 0.8), LoraRequest(pink, 0.5, 0.5)))
    assert request_fields(request)["prompt"] == "a cat <lora:pink:0.6:0.8> <lora:pink:0.5>"


def test_the_page_is_served_at_the_root_and_needs_nothing_from_elsewhere(served):
    status, kind, html = get(served, "/")
    assert (status, kind, html) == (200, "text/html", (PAGE / "index.html").read_bytes())
    names = {"index.html"}
    for path in sorted(PAGE.iterdir()):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[\w.-]+\.\w", text), f"{path.name} names another site"
        names |= {a or b for a, b in re.findall(r'(?:src|href)="/([\w.]+)"|from "\./([\w.]+)"', text)}
    assert names == {p.name for p in PAGE.iterdir()}
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        assert get(served, f"/{name}")[:2] == (200, kind)
    assert get(served, "/none.js")[0] == 404
    for path in ("/..%2Fpage.py", "/%2E%2E/page.py", "/..%5Cpage.py", "/%2Fetc%2Fpasswd"):
        assert get(served, path)[0] == 403, path


def test_the_gallery_lists_saved_images_with_their_settings(served):
    body = {"prompt": "a yellow star", "seed": 21, "steps": 2, "width": 32, "height": 32, "batch_size": 2,
            "sampler_name": "Euler", "save_images": True}
    status, answer = served.call("/sdapi/v1/txt2img", body)
    assert status == 200
    served.call("/sdapi/v1/txt2img", {**body, "save_images": False})
    status, gallery = served.call("/nijimi/v1/gallery")
    first, second = gallery[-2:]
    names = [e["file"] for e in (first, second)]
    assert names == json.loads(answer["info"])["files"]
    for entry, seed, b64 in zip((first, second), (21, 22), answer["images"], strict=True):
        assert entry["url"] == f"/outputs/{entry['file']}" and entry["mode"] == "txt2img"
        assert entry["model"] == "embedded" and f"Seed: {seed}, " in entry["infotext"]
        one = parse_call({**body, "seed": seed, "batch_size": 1}, TXT2IMG, Limits()).request
        assert entry["fields"] == request_fields(served.pipe.with_model_defaults(one))  # the guidance it ran with
        assert get(served, entry["url"])[2] == base64.b64decode(b64)
    assert [e["id"] for e in gallery] == list(range(len(gallery)))


def recipe(served, path) -> tuple[int, dict]:
    return served.call("/nijimi/v1/recipe", {"image": base64.b64encode(path.read_bytes()).decode()})


def test_recipe_reads_a1111_and_comfyui_images(served, tmp_path):
    text = ("a green star <lora:pink:0.8>\nNegative prompt: blurry\nSteps: 13, Sampler: DPM++ 2M Karras, CFG scale: "
            "6.5, Seed: 1234, Size: 64x48, Model: sd15, RNG: CPU, Version: v1.10.0")
    want = {"prompt": "a green star <lora:pink:0.8>", "negative_prompt": "blurry", "steps": 13, "cfg_scale": 6.5,
            "seed": 1234, "width": 64, "height": 48, "sampler_name": "DPM++ 2M", "scheduler": "karras"}
    for path in (a1111_png(tmp_path / "a.png", text), a1111_jpeg(tmp_path / "a.jpg", text)):
        status, answer = recipe(served, path)
        assert status == 200 and (answer["source"], answer["model"], answer["warnings"]) == ("A1111", "sd15", [])
        assert {k: answer["fields"][k] for k in want} == want and answer["infotext"] == text
    status, answer = recipe(served, comfyui_png(tmp_path / "c.png", comfyui_graph()))
    assert status == 200 and (answer["source"], answer["model"]) == ("ComfyUI", "sd15/model.safetensors")
    assert {k: answer["fields"][k] for k in want} == {**want, "prompt": "a red circle <lora:pink:0.6:0.8>",
                                                      "steps": 3}
    assert answer["warnings"] == []


def test_recipe_of_a_nijimi_image_asks_for_the_same_request(served):
    body = {"prompt": "a purple circle <lora:pink:0.7>", "negative_prompt": "red", "seed": 8, "steps": 2,
            "width": 32, "height": 32, "sampler_name": "DPM++ 2M", "scheduler": "karras", "cfg_scale": 4}
    status, made = served.call("/sdapi/v1/txt2img", body)
    status, answer = served.call("/nijimi/v1/recipe", {"image": made["images"][0]})
    assert status == 200 and answer["source"] == "nijimi" and answer["warnings"] == []
    assert parse_call(answer["fields"], TXT2IMG, Limits()).request == parse_call(body, TXT2IMG, Limits()).request


def test_recipe_refuses_what_is_not_an_image_with_metadata(served):
    status, answer = served.call("/nijimi/v1/recipe", {"picture": "x"})
    assert (status, answer["detail"]) == (422, 'the body must be a JSON object with a base64 "image"')
    status, answer = served.call("/nijimi/v1/recipe", {"image": "bm90IGFuIGltYWdl"})
    assert status == 422 and answer["detail"].startswith("image: not an image nijimi can read")
    status, answer = served.call("/nijimi/v1/recipe", {"image": served.b64png(Image.new("RGB", (8, 8)))})
    assert (status, answer["detail"]) == (422, "image: no generation metadata (a nijimi recipe, A1111 parameters or "
                                               "a ComfyUI graph)")
