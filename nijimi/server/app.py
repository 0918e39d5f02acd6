"""The server's state and its endpoints, without HTTP: :class:`Studio` holds the one resident model, the job queue
and the event hub; :data:`ROUTES` maps ``(method, path)`` to an endpoint ``(studio, ApiRequest) → JSON value`` and
:attr:`Studio.mounts` maps URL prefixes to the folders whose files may be served (the output folder, and at ``/`` the
page of :mod:`nijimi.server.page`). :mod:`nijimi.server.http` puts them on the wire; a new endpoint is one more route.

The resident model changes only inside a job (a model switch is queued like a generation), so a generation always
runs start to end on one model. A switch loads the new model before dropping the old one, so a model that fails to
load leaves the old one in place.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nijimi.embedded import EMBEDDED, embedded_path
from nijimi.errors import CheckpointError, ConfigError
from nijimi.io import safetensors
from nijimi.pipelines.pipeline import Pipeline, load
from nijimi.server import a1111, controlnet, page
from nijimi.server.a1111 import Limits, Outcome
from nijimi.server.errors import ApiError, Cancelled
from nijimi.server.explain import ROUTES as EXPLAIN_ROUTES
from nijimi.server.folders import Folders, ModelEntry, check_lora_tags, list_loras, list_models
from nijimi.server.jobs import EventHub, Job, JobQueue, Progress
from nijimi.server.work import run_call


@dataclass(frozen=True)
class ServeOptions:
    """How a server runs: the first ``model`` (a name from the models folder, ``"embedded"``, or a path the
    operator gives), its folders and limits, and where and in which dtype the model runs."""

    model: str = EMBEDDED
    folders: Folders = field(default_factory=Folders)
    limits: Limits = field(default_factory=Limits)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class ApiRequest:
    """What an endpoint sees of an HTTP request: the JSON body (None when empty) and the query parameters."""

    body: Any = None
    query: dict[str, str] = field(default_factory=dict)


class ModelSlot:
    """The one resident model, the checkpoint chosen for calls that name none (``selected``), and the models a
    client may choose: the listing of the models folder, plus ``--model`` when it is a path outside it."""

    def __init__(self, options: ServeOptions, loader: Callable[..., Pipeline]) -> None:
        self.options, self.loader = options, loader
        self.extra: list[ModelEntry] = []
        self.pipe: Pipeline | None = None
        self.entry: ModelEntry | None = None
        try:
            self.selected = self.find(options.model)
        except ApiError:
            path = Path(options.model)
            if not path.exists():
                raise ConfigError(f"--model {options.model}: no such file, folder or model in the models folder") \
                    from None
            self.selected = ModelEntry(path.name, str(path.resolve()))
            self.extra.append(self.selected)

    def entries(self) -> list[ModelEntry]:
        return list_models(self.options.folders.models) + self.extra

    def find(self, text: str) -> ModelEntry:
        """The model A1111's checkpoint ``text`` names (title, name or model name); ApiError 422 for none."""
        entries = self.entries()
        for entry in entries:
            if entry.matches(text):
                return entry
        known = ", ".join(e.name for e in entries[:20])
        raise ApiError(422, "ValidationError", f"no model {text!r}; the models here: {known}")

    def hash(self, entry: ModelEntry) -> str | None:
        """A1111's short hash of ``entry``, known while it is resident (hashing every listed file would read them
        all)."""
        return self.pipe.model_hash if self.pipe is not None and entry == self.entry else None

    def title(self, entry: ModelEntry) -> str:
        """A1111's title: ``name [hash]``, or the name while the hash is unknown."""
        digest = self.hash(entry)
        return f"{entry.name} [{digest}]" if digest else entry.name

    def ensure(self, entry: ModelEntry) -> Pipeline:
        """The pipeline of ``entry``, loaded now unless it is resident (worker thread only). Its preview map is
        fitted here, so rendering a preview elsewhere only reads it."""
        if self.pipe is None or entry != self.entry:
            pipe = self.loader(entry.source, device=self.options.device, dtype=self.options.dtype)
            pipe.preview(torch.zeros(1, pipe.model.config.vae.z_channels, 1, 1))
            self.pipe, self.entry = pipe, entry
        return self.pipe


class Studio:
    """The server without HTTP: ``start`` loads the first model and starts the worker, ``stop`` ends both."""

    def __init__(self, options: ServeOptions, loader: Callable[..., Pipeline] = load) -> None:
        self.options, self.folders, self.limits = options, options.folders, options.limits
        for flag, folder in (("--models-dir", self.folders.models), ("--lora-dir", self.folders.loras),
                             ("--controlnet-dir", self.folders.controlnets)):
            if folder is not None and not folder.is_dir():
                raise ConfigError(f"{flag} {folder}: no such folder")
        self.hub = EventHub()
        self.queue = JobQueue(self.hub, self.limits.queue)
        self.models = ModelSlot(options, loader)
        self.mounts: dict[str, Path] = {page.OUTPUTS: self.folders.output, "/": page.PAGE}
        self.gallery = page.Gallery()

    def start(self) -> None:
        self.models.ensure(self.models.selected)
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()
        self.hub.close()

    def generate(self, request: ApiRequest, mode: str) -> dict:
        """txt2img / img2img: parse, queue, wait, answer (an interrupted call answers with what it finished)."""
        read_controlnet = lambda *args: controlnet.read_units(*args, self.controlnets())  # noqa: E731
        call = a1111.parse_call(request.body, mode, self.limits, {"lora_dir": self.folders.loras},
                                {"controlnet": read_controlnet})
        entry = self.models.find(call.checkpoint) if call.checkpoint else None
        check_lora_tags(call.request.prompt, self.folders.loras)

        def work(job: Job) -> Outcome:
            pipe = self.models.ensure(entry or self.models.selected)
            if entry is not None and call.keep_checkpoint:
                self.models.selected = entry
            return run_call(pipe, call, job, self.folders.output)

        job = self.queue.submit(Job(work, **({"id": call.task_id} if call.task_id else {})))
        try:
            outcome = job.wait()
        except Cancelled as exc:
            outcome = exc.partial or Outcome(interrupted=True)
        if call.save_images:
            self.gallery.add(outcome, mode)
        return a1111.answer(call, outcome)

    def progress(self, request: ApiRequest) -> dict:
        """A1111's progress of the running job, with its preview unless ``skip_current_image=true``."""
        job = self.queue.current
        p = job.progress if job is not None else Progress(job_count=0)
        state = p.to_dict()
        preview = None if job is None or request.query.get("skip_current_image") == "true" else self.preview(job.id)
        return {"progress": state.pop("progress"), "eta_relative": state.pop("eta_relative"),
                "state": {"skipped": False, "interrupted": bool(job and job.cancelled.is_set()),
                          "job": job.id if job else "", **state},
                "current_image": preview,
                "textinfo": None, "current_task": job.id if job else None, "queued": len(self.queue.waiting)}

    def preview(self, job_id: str) -> str | None:
        """The latest preview of job ``job_id`` as a base64 PNG, None unless it is running and has made a step."""
        job = self.queue.current
        png = job.progress.preview_png() if job is not None and job.id == job_id else None
        return base64.b64encode(png).decode("ascii") if png else None

    def interrupt(self, request: ApiRequest) -> dict:
        self.queue.interrupt()
        return {}

    def sd_models(self, request: ApiRequest) -> list[dict]:
        return [{"title": self.models.title(e), "model_name": e.model_name,
                 "hash": self.models.hash(e), "sha256": None,
                 "filename": str(embedded_path()) if e.source == EMBEDDED else e.source, "config": None}
                for e in self.models.entries()]

    def get_options(self, request: ApiRequest) -> dict:
        entry = self.models.selected
        return {"sd_model_checkpoint": self.models.title(entry), "CLIP_stop_at_last_layers": 1,
                "samples_format": "png", "outdir_samples": str(self.folders.output)}

    def set_options(self, request: ApiRequest) -> dict:
        """``sd_model_checkpoint`` switches the model (queued after the jobs before it; answered once loaded);
        other options are named as ignored."""
        if not isinstance(request.body, dict):
            raise ApiError(422, "ValidationError", "the body must be a JSON object of options")
        warnings = [f"option {k} is not supported by nijimi; ignored" for k in request.body
                    if k != "sd_model_checkpoint"]
        name = request.body.get("sd_model_checkpoint")
        if name is not None:
            entry = self.models.find(a1111.required_text(request.body, "sd_model_checkpoint"))

            def switch(job: Job) -> None:
                self.models.ensure(entry)
                self.models.selected = entry

            self.queue.submit(Job(switch, kind="switch")).wait()
        return {"warnings": warnings}

    def loras(self, request: ApiRequest) -> list[dict]:
        """A1111's Lora extension listing: name, alias (kohya's ``ss_output_name``), path, metadata."""
        answer = []
        for path in list_loras(self.folders.loras):
            try:
                metadata = safetensors.read_metadata(path) if path.suffix == ".safetensors" else {}
            except (CheckpointError, OSError):
                metadata = {}
            answer.append({"name": path.stem, "alias": metadata.get("ss_output_name", path.stem), "path": str(path),
                           "metadata": metadata})
        return answer

    def controlnets(self) -> list[controlnet.ControlNetEntry]:
        """The ControlNets a unit may name: the ControlNet folder's, and the embedded model's while it is resident."""
        entry = self.models.entry
        return controlnet.list_controlnets(self.folders.controlnets, entry is not None and entry.source == EMBEDDED)


ROUTES: dict[tuple[str, str], Callable[[Studio, ApiRequest], Any]] = {
    ("POST", "/sdapi/v1/txt2img"): lambda s, r: s.generate(r, a1111.TXT2IMG),
    ("POST", "/sdapi/v1/img2img"): lambda s, r: s.generate(r, a1111.IMG2IMG),
    ("GET", "/sdapi/v1/progress"): Studio.progress,
    ("POST", "/sdapi/v1/interrupt"): Studio.interrupt,
    ("GET", "/sdapi/v1/sd-models"): Studio.sd_models,
    ("GET", "/sdapi/v1/options"): Studio.get_options,
    ("POST", "/sdapi/v1/options"): Studio.set_options,
    ("GET", "/sdapi/v1/samplers"): lambda s, r: a1111.samplers(),
    ("GET", "/sdapi/v1/schedulers"): lambda s, r: a1111.schedulers(),
    ("GET", "/sdapi/v1/loras"): Studio.loras,
    ("POST", "/sdapi/v1/png-info"): lambda s, r: a1111.png_info(r.body, s.limits),
    ("GET", "/controlnet/version"): lambda s, r: {"version": controlnet.API_VERSION},
    ("GET", "/controlnet/model_list"): lambda s, r: {"model_list": [e.title for e in s.controlnets()]},
    ("GET", "/controlnet/module_list"): lambda s, r: controlnet.module_list(r.query.get("alias_names", "").lower()
                                                                            in ("true", "1")),
    ("GET", "/controlnet/settings"): lambda s, r: {"control_net_unit_count": controlnet.MAX_UNITS},
    ("POST", "/controlnet/detect"): lambda s, r: controlnet.detect(r.body, s.limits),
    **EXPLAIN_ROUTES,
    ("GET", "/nijimi/v1/gallery"): lambda s, r: s.gallery.listing(),
    ("POST", "/nijimi/v1/recipe"): lambda s, r: page.recipe(r.body, s.limits, s.folders.loras),
}
"""Every JSON endpoint; server-sent events (:data:`nijimi.server.http.EVENTS`) and files (``Studio.mounts``) are
served by the HTTP layer."""
