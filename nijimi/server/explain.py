"""The explain views over HTTP: ``GET /nijimi/v1/explain`` lists them, ``POST /nijimi/v1/explain/<name>`` runs one
as a job on the server's queue (after the jobs queued before it; ``/sdapi/v1/interrupt`` cancels it at its next
sampling step, answered 409) and answers ``{"view", "panels": [{"label", "name", "image": base64 PNG}], "info"}``.

An ``image`` view's body is ``{"image": base64 PNG, "timesteps": [int, …]}`` (timesteps optional); a ``prompt``
view's body is a txt2img body (A1111's fields, read by :func:`~nijimi.server.a1111.parse_call` with the server's
LoRA folder) plus the view's own fields, which its entry reads from the body. Adding a view is one :class:`View` in
:data:`VIEWS`; its route follows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from nijimi.diffusion.samplers import StepInfo
from nijimi.errors import ConfigError
from nijimi.explain.adapter_effects import adapter_effects
from nijimi.explain.attention import attention_maps
from nijimi.explain.forward import forward_process
from nijimi.explain.panels import Explanation
from nijimi.explain.trajectory import trajectory
from nijimi.pipelines.pipeline import Pipeline
from nijimi.pipelines.request import GenerationRequest
from nijimi.server import a1111
from nijimi.server.errors import ApiError, Cancelled
from nijimi.server.folders import check_lora_tags
from nijimi.server.jobs import Job

if TYPE_CHECKING:
    from nijimi.server.app import ApiRequest, Studio

IMAGE, PROMPT = "image", "prompt"
PREFIX = "/nijimi/v1/explain"


@dataclass(frozen=True)
class Inputs:
    """What a view gets from a request body: the raw ``body`` (for a view's own fields), and — per its input kind —
    the decoded ``image`` and ``timesteps``, or the generation ``request``, the ``checkpoint`` it names and the
    prompt ``words`` to map (attention; None: every word)."""

    body: dict
    image: Image.Image | None = None
    timesteps: list[int] | None = None
    request: GenerationRequest | None = None
    checkpoint: str | None = None
    words: list[str] | None = None


Run = Callable[[Pipeline, Inputs, Callable[[StepInfo], None]], Explanation]


@dataclass(frozen=True)
class View:
    """One explain view: its ``name`` (the route's last part), a ``title`` for the page, its ``input`` kind
    (:data:`IMAGE` or :data:`PROMPT`) and ``run(pipe, inputs, callback)`` (``callback``: the job's step callback)."""

    name: str
    title: str
    input: str
    run: Run


VIEWS = {view.name: view for view in (
    View("forward", "The forward process on your image", IMAGE,
         lambda pipe, given, step: forward_process(pipe, given.image, given.timesteps)),
    View("trajectory", "The denoising trajectory: x_t and x̂₀ at each step", PROMPT,
         lambda pipe, given, step: trajectory(pipe, given.request, callback=step)),
    View("attention", "Where each word went: cross-attention maps (DAAM)", PROMPT,
         lambda pipe, given, step: attention_maps(pipe, given.request, given.words, callback=step)),
    View("adapters", "Where the LoRAs act, per U-Net block", PROMPT,
         lambda pipe, given, step: adapter_effects(pipe, given.request, callback=step)),
)}
"""Every explain view the server offers, in the order the page lists them."""


def _timesteps(value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ConfigError("timesteps must be a list of integers")
    return value


def _words(value: Any) -> list[str] | None:
    """The attention view's ``words``: absent or null means every word of the prompt."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(w, str) and w.strip() for w in value):
        raise ConfigError("words must be a non-empty list of non-empty strings")
    return [w.strip() for w in value]


def parse_inputs(view: View, body: Any, studio: Studio) -> Inputs:
    """The :class:`Inputs` of ``body`` for ``view``; ConfigError / ImageError name the first bad field."""
    if not isinstance(body, dict):
        raise ConfigError(f"the body of the {view.name} view must be a JSON object")
    if view.input == IMAGE:
        if "image" not in body:
            raise ConfigError('the body must have a base64 "image"')
        image = a1111.decode_image("image", body["image"], studio.limits)
        return Inputs(body, image, _timesteps(body.get("timesteps")))
    call = a1111.parse_call(body, a1111.TXT2IMG, studio.limits, {"lora_dir": studio.folders.loras})
    check_lora_tags(call.request.prompt, studio.folders.loras)
    return Inputs(body, request=call.request, checkpoint=call.checkpoint, words=_words(body.get("words")))


def answer(explanation: Explanation) -> dict:
    """The JSON answer of a view: its name, each panel with its image as a base64 PNG, and its info."""
    return {"view": explanation.view,
            "panels": [{"label": p.label, "name": p.name, "image": a1111.encode_image(p.image)}
                       for p in explanation.panels],
            "info": explanation.info}


def run_view(studio: Studio, request: ApiRequest, name: str) -> dict:
    """Parse the body for view ``name``, run the view as a job on the queue, wait and answer."""
    view = VIEWS[name]
    given = parse_inputs(view, request.body, studio)
    entry = studio.models.find(given.checkpoint) if given.checkpoint else None

    def work(job: Job) -> Explanation:
        pipe = studio.models.ensure(entry or studio.models.selected)
        job.begin(1, pipe.latent_rgb)
        return view.run(pipe, given, lambda info: job.step(0, info))

    try:
        explanation = studio.queue.submit(Job(work, kind=f"explain {name}")).wait()
    except Cancelled as exc:
        raise ApiError(409, "Interrupted", f"the {name} view was interrupted ({exc})") from None
    return answer(explanation)


def list_views(studio: Studio, request: ApiRequest) -> list[dict]:
    """``GET /nijimi/v1/explain``: each view's name, title and input kind."""
    return [{"name": v.name, "title": v.title, "input": v.input} for v in VIEWS.values()]


ROUTES: dict[tuple[str, str], Callable[[Studio, ApiRequest], Any]] = {
    ("GET", PREFIX): list_views,
    **{("POST", f"{PREFIX}/{name}"): (lambda s, r, name=name: run_view(s, r, name)) for name in VIEWS},
}
"""The explain endpoints, merged into :data:`nijimi.server.app.ROUTES`."""
