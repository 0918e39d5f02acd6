"""What a running server refuses, each with a 4xx JSON ``{"error", "detail"}`` and no traceback, after which it still
serves: malformed JSON, wrong types, huge bodies and images, other content types, paths out of its folders (``../``,
absolute paths, symlinks), other hosts and origins; and a job that raises fails alone."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json

import pytest
from PIL import Image

from nijimi.server.a1111 import Limits


def refused(answer: tuple[int, object], status: int, detail: str) -> None:
    code, body = answer
    assert code == status and set(body) == {"error", "detail"}, answer
    assert detail in body["detail"] and "Traceback" not in body["detail"], body


def raw(served, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
    """One request with a path and headers exactly as given (no client-side normalisation)."""
    connection = http.client.HTTPConnection("127.0.0.1", served.server.server_address[1], timeout=60)
    connection.putrequest(method, path, skip_host="Host" in (headers or {}))
    for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
        connection.putheader(key, value)
    connection.endheaders()
    connection.send(body)
    response = connection.getresponse()
    answer = response.status, json.loads(response.read())
    connection.close()
    return answer


def test_malformed_json_and_bodies_that_are_no_object(served):
    refused(raw(served, "POST", "/sdapi/v1/txt2img", b'{"prompt": "a cat",'), 400, "the body is not valid JSON")
    refused(raw(served, "POST", "/sdapi/v1/txt2img", b"\xff\xfe"), 400, "the body is not valid JSON")
    refused(served.call("/sdapi/v1/txt2img", [1, 2]), 422, "the body must be a JSON object, not a list")
    refused(raw(served, "POST", "/sdapi/v1/txt2img"), 422, "the body must be a JSON object, not null")
    refused(served.call("/sdapi/v1/png-info", {"picture": 1}), 422, 'a base64 "image"')


@pytest.mark.parametrize("field, value, detail", [
    ("steps", "20", "steps must be an integer, not a string ('20')"),
    ("seed", 1.5, "seed must be an integer, not a number (1.5)"),
    ("cfg_scale", "7", "cfg_scale must be a number, not a string"),
    ("prompt", 5, "prompt must be a string, not a number"),
    ("batch_size", True, "batch_size must be an integer, not true/false"),
    ("send_images", "yes", "send_images must be true or false"),
    ("override_settings", [], "override_settings must be an object, not a list"),
    ("force_task_id", "../x", "force_task_id must be 1 to 80 letters"),
    ("width", 12, "width 12 must be a positive multiple of 8 pixels"),
    ("steps", 5000, "steps 5000 must be an integer from 1 to 1000"),
    ("sampler_name", "Euler z", "unknown sampler 'Euler z'"),
    ("scheduler", "gamma", "unknown schedule 'gamma'; known: automatic, uniform, karras"),
    ("batch_size", 300, "batch_size 300 × n_iter 1 must be from 1 to 256 images"),
    ("height", 1 << 19, "64x524288 is more than the 16777216 pixels"),
])
def test_wrong_types_and_values_name_the_field(served, field, value, detail):
    body = {"prompt": "a circle", "steps": 2, "width": 64, "height": 64, field: value}
    refused(served.call("/sdapi/v1/txt2img", body), 422, detail)


def test_bad_images(served, monkeypatch):
    call = lambda images: served.call("/sdapi/v1/img2img", {"prompt": "a circle", "init_images": images})  # noqa
    refused(call("abc"), 422, "init_images must be a non-empty list of base64 images, not a string")
    refused(call(["not base64!"]), 422, "init_images[0]: not base64 data")
    refused(call([base64.b64encode(b"GIF89a but not really").decode()]), 422, "init_images[0]: not an image")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    truncated = base64.b64encode(buffer.getvalue()[:60]).decode()
    refused(call([truncated]), 422, "init_images[0]: not an image nijimi can read")
    monkeypatch.setattr(served.studio, "limits", Limits(pixels=1000))
    refused(call([base64.b64encode(buffer.getvalue()).decode()]), 422, "64x64 is more than the 1000 pixels")


def test_huge_bodies_are_refused_before_they_are_read(served, monkeypatch):
    claim = {"Content-Type": "application/json", "Content-Length": str(10**12)}
    refused(raw(served, "POST", "/sdapi/v1/txt2img", b"{", claim), 413, "this server takes 67108864 at most")
    monkeypatch.setattr(served.studio, "limits", dataclasses.replace(served.studio.limits, body=1000))
    body = json.dumps({"prompt": "x" * 5000}).encode()
    refused(raw(served, "POST", "/sdapi/v1/txt2img", body), 413, "the body is 5014 bytes")
    refused(raw(served, "POST", "/sdapi/v1/txt2img", b"{}", {"Transfer-Encoding": "chunked"}), 411, "Content-Length")


def test_other_content_types_hosts_and_origins(served):
    refused(raw(served, "POST", "/sdapi/v1/interrupt", b"x", {"Content-Type": "text/plain"}), 415, "not text/plain")
    refused(raw(served, "GET", "/sdapi/v1/options", headers={"Host": "attacker.example:7860"}), 403,
            "Host 'attacker.example:7860' is not this machine")
    refused(served.call("/sdapi/v1/interrupt", method="POST", headers={"Origin": "https://attacker.example"}), 403,
            "requests from pages of 'https://attacker.example' are refused")
    port = served.server.server_address[1]
    assert served.call("/sdapi/v1/interrupt", method="POST", headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200
    refused(served.call("/sdapi/v1/nothing"), 404, "GET /sdapi/v1/nothing is not an endpoint")
    refused(served.call("/sdapi/v1/txt2img"), 405, "GET /sdapi/v1/txt2img is not an endpoint")
    refused(raw(served, "PATCH", "/sdapi/v1/options"), 501, "Unsupported method ('PATCH')")


@pytest.mark.parametrize("path, status", [
    ("/outputs/../secret.txt", 403), ("/outputs/..%2Fsecret.txt", 403), ("/outputs/%2E%2E/secret.txt", 403),
    ("/outputs//etc/passwd", 403), ("/outputs/%2Fetc%2Fpasswd", 403), ("/outputs/..%5Csecret.txt", 403),
    ("/outputs/secret.txt", 403),  # a symlink out of the folder
    ("/outputs/sub/../../secret.txt", 403), ("/outputs/none.png", 404), ("/outputs/", 403),
])
def test_files_outside_the_output_folder_are_refused(served, path, status):
    refused(raw(served, "GET", path), status, "")


def test_a_saved_file_is_served(served):
    (served.root / "outputs" / "sub").mkdir(exist_ok=True)
    (served.root / "outputs" / "sub" / "x.png").write_bytes(b"\x89PNG data")
    connection = http.client.HTTPConnection("127.0.0.1", served.server.server_address[1], timeout=60)
    connection.request("GET", "/outputs/sub/x.png")
    response = connection.getresponse()
    assert (response.status, response.getheader("Content-Type"), response.read()) == (200, "image/png",
                                                                                     b"\x89PNG data")


def test_models_and_loras_outside_their_folders_are_refused(served):
    for name in ("../secret.txt", str(served.root / "secret.txt"), "outside.safetensors", "outside"):
        refused(served.call("/sdapi/v1/options", {"sd_model_checkpoint": name}), 422, f"no model {name!r}")
        refused(served.call("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": name}}),
                422, f"no model {name!r}")
    refused(served.call("/sdapi/v1/txt2img", {"prompt": "a <lora:outside:1>", "steps": 1}), 403,
            "LoRA 'outside' leads outside the LoRA folder")
    refused(served.call("/sdapi/v1/txt2img", {"prompt": "a <lora:../secret:1>", "steps": 1, "width": 32}), 422,
            "no LoRA named '../secret'")


def test_a_failing_job_fails_alone(served, monkeypatch):
    def broken(source, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(served.studio.models, "loader", broken)
    refused(served.call("/sdapi/v1/options", {"sd_model_checkpoint": "copy"}), 500,
            "the job failed: RuntimeError: boom")
    bad = served.root / "models" / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    monkeypatch.undo()
    try:
        refused(served.call("/sdapi/v1/options", {"sd_model_checkpoint": "broken"}), 422, "broken.safetensors")
    finally:
        bad.unlink()
    assert served.studio.models.entry.name == "embedded"
    monkeypatch.setattr(served.studio.queue, "limit", 0)
    refused(served.call("/sdapi/v1/txt2img", {"prompt": "x"}), 503, "the queue is full")
    monkeypatch.undo()
    status, answer = served.call("/sdapi/v1/txt2img", {"prompt": "a circle", "steps": 2, "width": 32, "height": 32})
    assert status == 200 and len(answer["images"]) == 1
