"""A1111's API against a running server with the embedded model, through a real HTTP client: every endpoint, images
equal to the pipeline's own for the same request, 8 clients at once queued in order without loss or mix-up,
progress with previews, interrupts, and server-sent events."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time

import numpy as np
from PIL import Image, ImageDraw

from nijimi.diffusion.choice import SAMPLER_SPECS
from nijimi.io.pngmeta import parse_parameters
from nijimi.pipelines.request import GenerationRequest

SMALL = {"width": 32, "height": 32, "steps": 3}


def direct(served, **fields) -> list[np.ndarray]:
    """The pipeline's own images for a request (run while the server is idle)."""
    return [np.asarray(im) for im in served.pipe.generate(GenerationRequest(**fields)).images]


def test_txt2img_matches_the_pipeline_and_answers_as_a1111(served):
    body = {"prompt": "a red circle on the left", "negative_prompt": "blue", "seed": 11, "cfg_scale": 5,
            "batch_size": 2, "n_iter": 2, "sampler_name": "Euler a", "scheduler": "karras", **SMALL}
    status, answer = served.call("/sdapi/v1/txt2img", body)
    assert status == 200 and answer["warnings"] == []
    assert answer["parameters"] == body
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11 and info["sampler_name"] == "Euler a"
    assert info["extra_generation_params"] == {"Schedule type": "Karras"}
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (32, 32, 3, 5)
    assert info["sd_model_name"] == "embedded" and info["sd_model_hash"] == served.pipe.model_hash
    fields = {"prompt": body["prompt"], "negative_prompt": "blue", "guidance": 5, "sampler": "euler-a",
              "schedule": "karras", "batch": 2, **SMALL}
    expected = direct(served, seed=11, **fields) + direct(served, seed=13, **fields)  # n_iter: seed + k × batch
    for b64, want, text in zip(answer["images"], expected, info["infotexts"], strict=True):
        png = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert png.info["parameters"] == text
        assert json.loads(png.info["nijimi"])["request"]["seed"] == parse_parameters(text)["settings"]["Seed"]
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), want)


def test_seed_minus_one_is_random_and_recorded(served):
    """Also: without a cfg_scale the model's own guidance scale is used and reported."""
    status, answer = served.call("/sdapi/v1/txt2img", {"prompt": "a star", "seed": -1, **SMALL})
    seed = json.loads(answer["info"])["seed"]
    assert status == 200 and seed != -1
    assert json.loads(answer["info"])["cfg_scale"] == served.pipe.model.config.guidance
    np.testing.assert_array_equal(served.pixels(answer["images"][0]), direct(served, prompt="a star", seed=seed,
                                                                              **SMALL)[0])


def _picture() -> tuple[Image.Image, Image.Image]:
    init = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(init).ellipse((4, 4, 20, 20), fill="red")
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((16, 0, 31, 31), fill=255)
    return init, mask


def test_img2img_with_mask_matches_the_pipeline_and_saves_a_reproducible_recipe(served):
    init, mask = _picture()
    body = {"prompt": "a blue square", "seed": 3, "denoising_strength": 0.6, "init_images": [served.b64png(init)],
            "mask": served.b64png(mask), "save_images": True, "inpainting_mask_invert": 1, **SMALL}
    status, answer = served.call("/sdapi/v1/img2img", body)
    assert status == 200 and answer["warnings"] == []
    assert answer["parameters"]["init_images"] is None and answer["parameters"]["mask"] is None
    inverted = Image.eval(mask, lambda v: 255 - v)
    want = direct(served, prompt="a blue square", seed=3, strength=0.6, init_image=init, mask=inverted, **SMALL)
    np.testing.assert_array_equal(served.pixels(answer["images"][0]), want[0])
    info = json.loads(answer["info"])
    assert info["denoising_strength"] == 0.6 and "Denoising strength: 0.6" in info["infotexts"][0]
    saved = served.root / "outputs" / info["files"][0]
    assert saved.read_bytes() == base64.b64decode(answer["images"][0])
    recipe = GenerationRequest.from_dict(json.loads(Image.open(saved).info["nijimi"])["request"])
    np.testing.assert_array_equal(direct(served, **{f: getattr(recipe, f) for f in (
        "prompt", "seed", "strength", "init_image", "mask", "width", "height", "steps")})[0], want[0])
    status, again = served.call("/sdapi/v1/img2img", {**body, "include_init_images": True, "save_images": False})
    assert again["parameters"]["init_images"] == body["init_images"]
    assert served.pixels(again["images"][0]).tolist() == want[0].tolist()
    assert "nijimi" not in Image.open(io.BytesIO(base64.b64decode(again["images"][0]))).info  # init only in memory


def test_ignored_and_unknown_fields_are_named(served):
    status, answer = served.call("/sdapi/v1/txt2img", {
        "prompt": "a circle", "seed": 1, "restore_faces": False, "mask_blur": 4, "tiling": True,
        "alwayson_scripts": {"ADetailer": {"args": []}}, "hr_scale": 2, "colour": "red",
        "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "x"}, "send_images": False, **SMALL})
    assert status == 200 and answer["images"] == []
    assert answer["warnings"] == ["override_settings.sd_vae is not supported by nijimi; ignored",
                                  "tiling is not supported by nijimi; ignored",
                                  "colour is not an A1111 field nijimi knows; ignored",
                                  "alwayson_scripts.ADetailer is not supported by nijimi; ignored"]


def test_eight_concurrent_clients_are_queued_in_order_without_loss_or_mixup(served):
    seeds = list(range(100, 108))
    expected = {s: direct(served, prompt=f"shape number {s}", seed=s, steps=2, width=32, height=32)[0] for s in seeds}
    events = served.studio.hub.subscribe()
    answers: dict[int, tuple] = {}

    def client(seed: int) -> None:
        answers[seed] = served.call("/sdapi/v1/txt2img", {"prompt": f"shape number {seed}", "seed": seed,
                                                          "steps": 2, "width": 32, "height": 32,
                                                          "force_task_id": f"task({seed})"})

    threads = [threading.Thread(target=client, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    served.studio.hub.unsubscribe(events)
    for seed in seeds:
        status, answer = answers[seed]
        assert status == 200 and json.loads(answer["info"])["all_seeds"] == [seed]
        np.testing.assert_array_equal(served.pixels(answer["images"][0]), expected[seed])
    seen = [events.get_nowait() for _ in range(events.qsize())]
    order = {kind: [e["job"] for e in seen if e["type"] == kind] for kind in ("queued", "started", "done")}
    assert sorted(order["queued"]) == sorted(f"task({s})" for s in seeds)
    assert order["started"] == order["queued"] == order["done"]  # first in, first out, one at a time


def _wait_for(served, test, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status, progress = served.call("/sdapi/v1/progress")
        if test(progress):
            return progress
        time.sleep(0.02)
    raise AssertionError(f"progress never reached the state wanted: {progress}")


def test_progress_preview_and_interrupt_mid_run(served):
    before = set((served.root / "outputs").iterdir())
    answers = []
    body = {"prompt": "a green star", "seed": 5, "steps": 1000, "width": 64, "height": 32, "save_images": True}
    worker = threading.Thread(target=lambda: answers.append(served.call("/sdapi/v1/txt2img", body)))
    worker.start()
    progress = _wait_for(served, lambda p: p["current_image"] is not None)
    assert progress["state"]["sampling_steps"] == 1000 and 0 < progress["progress"] < 1
    assert progress["state"]["job_count"] == 1 and progress["eta_relative"] > 0
    assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (64, 32)
    assert served.call("/sdapi/v1/interrupt", method="POST") == (200, {})
    worker.join(60)
    status, answer = answers[0]
    info = json.loads(answer["info"])
    assert status == 200 and answer["images"] == [] and info["interrupted"] is True and info["files"] == []
    assert set((served.root / "outputs").iterdir()) == before  # nothing half-written
    assert served.call("/sdapi/v1/progress")[1]["state"]["job"] == ""
    status, answer = served.call("/sdapi/v1/txt2img", {"prompt": "a green star", "seed": 5, **SMALL})
    assert status == 200 and len(answer["images"]) == 1  # the server goes on


def test_interrupt_keeps_the_batches_that_finished(served):
    answers = []
    body = {"prompt": "a square", "seed": 8, "n_iter": 3, "steps": 30, "width": 32, "height": 32}
    worker = threading.Thread(target=lambda: answers.append(served.call("/sdapi/v1/txt2img", body)))
    worker.start()
    _wait_for(served, lambda p: p["state"]["job_no"] == 1 and p["state"]["sampling_step"] > 0)
    served.call("/sdapi/v1/interrupt", method="POST")
    worker.join(60)
    info = json.loads(answers[0][1]["info"])
    finished = len(answers[0][1]["images"])
    assert info["interrupted"] and finished in (1, 2)  # batch 1 is cut short (unless it ended before the interrupt)
    assert info["all_seeds"] == [8, 9][:finished]


def test_server_sent_events_carry_progress_and_previews(served):
    port = served.server.server_address[1]
    stream = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    stream.request("GET", "/nijimi/v1/events?preview=1&job=task(sse)")
    response = stream.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    done = threading.Thread(target=served.call, args=("/sdapi/v1/txt2img", {
        "prompt": "a circle", "seed": 2, "force_task_id": "task(sse)", **SMALL}))
    done.start()
    events = []
    while not events or events[-1]["type"] != "done":
        line = response.readline().decode()
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
    done.join(60)
    stream.close()
    assert [e["type"] for e in events] == ["queued", "started", "progress", "progress", "progress", "done"]
    steps = [e for e in events if e["type"] == "progress"]
    assert [e["sampling_step"] for e in steps] == [1, 2, 3] and steps[-1]["progress"] == 1.0
    assert all(Image.open(io.BytesIO(base64.b64decode(e["current_image"]))).size == (32, 32) for e in steps)


def test_models_options_and_switching(served):
    status, models = served.call("/sdapi/v1/sd-models")
    assert [m["model_name"] for m in models] == ["embedded", "copy"]  # the symlink out of the folder is not listed
    assert models[0]["title"] == f"embedded [{served.pipe.model_hash}]" and models[1]["hash"] is None
    assert served.call("/sdapi/v1/options")[1]["sd_model_checkpoint"] == models[0]["title"]
    assert served.call("/sdapi/v1/options", {"sd_model_checkpoint": "copy.safetensors", "x": 1}) == (
        200, {"warnings": ["option x is not supported by nijimi; ignored"]})
    try:
        options = served.call("/sdapi/v1/options")[1]
        assert options["sd_model_checkpoint"] == f"copy.safetensors [{served.pipe.model_hash}]"
        status, answer = served.call("/sdapi/v1/txt2img", {"prompt": "a circle", "seed": 1, **SMALL})
        assert json.loads(answer["info"])["sd_model_name"] == "copy"
        status, answer = served.call("/sdapi/v1/txt2img", {"prompt": "a circle", "seed": 1, **SMALL,
                                                           "override_settings": {"sd_model_checkpoint": "embedded"}})
        assert json.loads(answer["info"])["sd_model_name"] == "embedded"
        assert served.call("/sdapi/v1/options")[1]["sd_model_checkpoint"].startswith("copy.safetensors")
    finally:
        served.call("/sdapi/v1/options", {"sd_model_checkpoint": "embedded"})
    assert served.studio.models.entry.name == "embedded"


def test_samplers_schedulers_loras_and_png_info(served):
    samplers = served.call("/sdapi/v1/samplers")[1]
    assert {"name": "DPM++ 2M", "aliases": ["dpm++2m"], "options": {"scheduler": "karras"}} in samplers
    assert len(samplers) == len(SAMPLER_SPECS) == 17
    names = [s["name"] for s in served.call("/sdapi/v1/schedulers")[1]]
    assert names[:4] == ["automatic", "uniform", "karras", "exponential"] and "align_your_steps" in names
    loras = served.call("/sdapi/v1/loras")[1]
    assert [(lora["name"], lora["path"]) for lora in loras] == [
        ("pink", str((served.root / "loras" / "pink.safetensors").resolve()))]
    assert loras[0]["metadata"]["ss_network_module"] == "networks.lora"
    status, answer = served.call("/sdapi/v1/txt2img", {"prompt": "a pink star <lora:pink:1>", "seed": 4,
                                                       "cfg_scale": 4, **SMALL})
    want = direct(served, prompt="a pink star <lora:pink:1>", seed=4, guidance=4, lora_dir=served.root / "loras",
                  **SMALL)
    assert status == 200 and served.pixels(answer["images"][0]).tolist() == want[0].tolist()
    status, info = served.call("/sdapi/v1/png-info", {"image": "data:image/png;base64," + answer["images"][0]})
    assert info["info"] == json.loads(answer["info"])["infotexts"][0]
    assert info["parameters"]["Prompt"] == "a pink star <lora:pink:1>"
    assert (info["parameters"]["Seed"], info["parameters"]["Size-1"], info["parameters"]["Steps"]) == (4, 32, 3)
    assert json.loads(info["items"]["nijimi"])["request"]["loras"] == []  # tags stay in the prompt
