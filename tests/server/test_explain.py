"""The explain views over HTTP against the running server (embedded model, real urllib client): the listing, each
view's answer equal to the library's (the trajectory's last x_t equal to txt2img's image for the same body), bad
bodies and an unknown view refused with JSON errors, and an interrupt of a running trajectory."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from nijimi.explain.attention import attention_maps
from nijimi.explain.forward import forward_process
from nijimi.pipelines.request import GenerationRequest

SMALL = {"width": 64, "height": 64, "steps": 2}


def _picture() -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((10, 30, 50, 60), fill="blue")
    return image


def test_the_views_are_listed(served):
    status, views = served.call("/nijimi/v1/explain")
    assert status == 200
    assert [(v["name"], v["input"]) for v in views] == [("forward", "image"), ("trajectory", "prompt"),
                                                        ("attention", "prompt"), ("adapters", "prompt")]
    assert views[0]["title"] == "The forward process on your image"


def test_forward_answers_the_library_view(served):
    status, answer = served.call("/nijimi/v1/explain/forward", {"image": served.b64png(_picture()),
                                                               "timesteps": [0, 500]})
    assert status == 200 and answer["view"] == "forward"
    assert [p["name"] for p in answer["panels"]] == ["model-t0000", "model-t0500", "linear-t0000", "linear-t0500",
                                                     "cosine-t0000", "cosine-t0500", "alpha_bar", "snr"]
    assert answer["info"]["timesteps"] == [0, 500]
    direct = forward_process(served.pipe, _picture(), [0, 500])
    for got, want in zip(answer["panels"], direct.panels[:6], strict=False):
        assert got["label"] == want.label
        np.testing.assert_array_equal(served.pixels(got["image"]), np.asarray(want.image))


def test_trajectory_ends_on_the_txt2img_image(served):
    body = {"prompt": "a red circle on the left", "seed": 4, "cfg_scale": 5, "sampler_name": "Euler a", **SMALL}
    status, answer = served.call("/nijimi/v1/explain/trajectory", body)
    assert status == 200 and answer["view"] == "trajectory"
    assert [p["name"] for p in answer["panels"]] == ["x_t-001", "x_t-002", "x0_hat-001", "x0_hat-002"]
    assert answer["info"]["sampler"] == "euler-a" and answer["info"]["seed"] == 4
    status, made = served.call("/sdapi/v1/txt2img", body)
    np.testing.assert_array_equal(served.pixels(answer["panels"][1]["image"]), served.pixels(made["images"][0]))


def test_adapters_of_a_lora_tag(served):
    status, answer = served.call("/nijimi/v1/explain/adapters", {"prompt": "a pink star <lora:pink:1>", **SMALL})
    assert status == 200 and [p["name"] for p in answer["panels"]] == ["blocks"]
    info = answer["info"]
    assert info["adapters"][0]["file"] == "pink.safetensors" and info["steps"] == [1, 2]
    assert info["weight_change"]["text_encoder"] > 0 and info["activation_change"]["step 2"]["out"] > 0


def test_attention_answers_the_library_view(served):
    body = {"prompt": "a red circle on the left and a blue square on the right", "seed": 2, "words": ["red", "blue"],
            **SMALL}
    status, answer = served.call("/nijimi/v1/explain/attention", body)
    assert status == 200 and answer["view"] == "attention"
    assert [p["name"] for p in answer["panels"]] == ["image", "word-0-red", "word-1-blue"]
    request = GenerationRequest(body["prompt"], seed=2, width=64, height=64, steps=2)
    direct = attention_maps(served.pipe, request, ["red", "blue"])
    assert answer["info"]["words"] == direct.info["words"]
    np.testing.assert_array_equal(served.pixels(answer["panels"][0]["image"]), np.asarray(direct.panels[0].image))


@pytest.mark.parametrize("view, body, status, detail", [
    ("forward", {"timesteps": [0]}, 422, 'the body must have a base64 "image"'),
    ("forward", {"image": "not base64!"}, 422, "image: not base64 data"),
    ("forward", {"image": "PIC", "timesteps": "0,500"}, 422, "timesteps must be a list of integers"),
    ("forward", {"image": "PIC", "timesteps": [5000]}, 422, "timestep 5000 must be an integer from 0 to 999"),
    ("forward", [1, 2], 422, "the body of the forward view must be a JSON object"),
    ("trajectory", {"prompt": "a star", "steps": "two"}, 422, "steps must be an integer"),
    ("trajectory", {"prompt": "a star", "batch_size": 2, **SMALL}, 422, "batch 2 must be 1"),
    ("adapters", {"prompt": "a star", **SMALL}, 422, "the request loads no adapter"),
    ("attention", {"prompt": "a star", "words": "star", **SMALL}, 422, "words must be a non-empty list"),
    ("attention", {"prompt": "a star", "words": ["moon"], **SMALL}, 422, "word 'moon' is not in the prompt"),
    ("adapters", {"prompt": "a star <lora:nothing:1>", **SMALL}, 422, "nothing"),
])
def test_bad_bodies_get_json_errors(served, view, body, status, detail):
    if isinstance(body, dict) and body.get("image") == "PIC":
        body = {**body, "image": served.b64png(_picture())}
    got, answer = served.call(f"/nijimi/v1/explain/{view}", body)
    assert got == status and detail in answer["detail"] and answer["error"]


def test_an_unknown_view_is_404(served):
    status, answer = served.call("/nijimi/v1/explain/everything", {"prompt": "a star"})
    assert status == 404 and answer["error"] == "Not Found" and "/nijimi/v1/explain/everything" in answer["detail"]


def test_interrupting_a_running_trajectory(served):
    answers = []
    body = {"prompt": "a green star", "seed": 5, "steps": 1000, "width": 64, "height": 64}
    worker = threading.Thread(target=lambda: answers.append(served.call("/nijimi/v1/explain/trajectory", body)))
    worker.start()
    end = time.monotonic() + 60
    while served.call("/sdapi/v1/progress")[1]["state"]["sampling_step"] < 2:
        assert time.monotonic() < end, "the trajectory never started"
        time.sleep(0.02)
    assert served.call("/sdapi/v1/interrupt", method="POST") == (200, {})
    worker.join(60)
    status, answer = answers[0]
    assert status == 409 and answer["error"] == "Interrupted" and "trajectory" in answer["detail"]
    status, answer = served.call("/nijimi/v1/explain/trajectory", {"prompt": "a star", **SMALL})
    assert status == 200 and len(answer["panels"]) == 4  # the server goes on
