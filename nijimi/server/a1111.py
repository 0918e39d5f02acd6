"""AUTOMATIC1111's web API (``/sdapi/v1/…``) in nijimi's terms: its JSON fields mapped onto
:class:`~nijimi.pipelines.request.GenerationRequest` in one table (:data:`FIELDS`), and its answers.

A txt2img/img2img body becomes a :class:`Call` (:func:`parse_call`): the request, checked by the request's own
validation, plus what belongs to the job (``n_iter`` batches, a checkpoint override, saving, a task id). A field
that is absent or null takes the request's default (so a missing ``steps`` means nijimi's 20, not A1111's 50). Fields
nijimi does not implement are ignored and named in the response's ``warnings`` when their value would have mattered
(:data:`IGNORED`); unknown fields are named too. To map a new request knob, add a :class:`Field` to the table (and
drop it from :data:`IGNORED`).

Answers follow A1111: ``{"images": [base64 PNG], "parameters": the body, "info": JSON text}`` whose ``info`` holds the
seeds and each image's infotext (the PNG's own ``parameters`` chunk).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from nijimi import __version__
from nijimi.diffusion.choice import SAMPLER_SPECS, SCHEDULE_LABELS, SamplerChoice, parse_sampler, parse_schedule
from nijimi.errors import ConfigError, ImageError
from nijimi.io.pngmeta import parse_parameters
from nijimi.pipelines.request import GenerationRequest
from nijimi.server.errors import ApiError

TXT2IMG, IMG2IMG = "txt2img", "img2img"
BOTH = (TXT2IMG, IMG2IMG)


@dataclass(frozen=True)
class Limits:
    """What one request may ask: ``body`` bytes, ``pixels`` per image (generated or sent), ``images`` per call
    (``batch_size × n_iter``), and the jobs that may wait in the queue."""

    body: int = 64 << 20
    pixels: int = 4096 * 4096
    images: int = 256
    queue: int = 64


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")


def _text(key: str, value: Any, limits: Limits) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, not {_kind(value)}")
    return value


def _integer(key: str, value: Any, limits: Limits | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, not {_kind(value)} ({value!r})")
    return value


def _number(key: str, value: Any, limits: Limits) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number, not {_kind(value)} ({value!r})")
    return value


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {_kind(value)} ({value!r})")
    return value


def _seed(key: str, value: Any, limits: Limits) -> int | None:
    value = _integer(key, value)
    return None if value == -1 else value  # A1111: -1 draws a random seed


def decode_image(key: str, value: Any, limits: Limits) -> Image.Image:
    """A base64 image (a ``data:`` URL prefix allowed), read whole; ImageError for anything else and for images of
    more than ``limits.pixels`` pixels (checked from the header, before decoding)."""
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a base64 image string, not {_kind(value)}")
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{key}: not base64 data") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.size[0] * image.size[1] > limits.pixels:
            raise ImageError(f"{key}: {image.size[0]}x{image.size[1]} is more than the {limits.pixels} pixels this "
                             "server takes")
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{key}: not an image nijimi can read ({exc})") from None
    return image


def encode_image(image: Image.Image) -> str:
    """``image`` as a base64 PNG, the form every image in an answer takes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _first_image(key: str, value: Any, limits: Limits) -> Image.Image:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} must be a non-empty list of base64 images, not {_kind(value)}")
    return decode_image(f"{key}[0]", value[0], limits)


@dataclass(frozen=True)
class Field:
    """One A1111 JSON ``key`` that sets the request field ``target`` through ``convert(key, value, limits)`` (which
    checks the JSON type and names ``key`` in its error), in the endpoints of ``modes``."""

    key: str
    target: str
    convert: Callable[[str, Any, Limits], Any]
    modes: tuple[str, ...] = BOTH


FIELDS = (
    Field("prompt", "prompt", _text),
    Field("negative_prompt", "negative_prompt", _text),
    Field("steps", "steps", _integer),
    Field("cfg_scale", "guidance", _number),
    Field("seed", "seed", _seed),
    Field("subseed", "variation_seed", _seed),
    Field("subseed_strength", "variation_strength", _number),
    Field("width", "width", _integer),
    Field("height", "height", _integer),
    Field("batch_size", "batch", _integer),
    Field("eta", "eta", _number),
    Field("denoising_strength", "strength", _number, (IMG2IMG,)),
    Field("init_images", "init_image", _first_image, (IMG2IMG,)),
    Field("mask", "mask", decode_image, (IMG2IMG,)),
)
"""A1111 field → request field. Combined fields are read by :func:`parse_call` itself: ``sampler_name`` (or the old
``sampler_index``) with ``scheduler`` → ``sampler``; ``seed_resize_from_w``/``_h`` → ``seed_resize``;
``override_settings.CLIP_stop_at_last_layers`` → ``clip_skip``; ``inpainting_mask_invert`` inverts ``mask``."""

JOB_FIELDS = ("sampler_name", "sampler_index", "scheduler", "seed_resize_from_w", "seed_resize_from_h", "n_iter",
              "override_settings", "override_settings_restore_afterwards", "send_images", "save_images",
              "force_task_id", "inpainting_mask_invert", "include_init_images", "alwayson_scripts")
"""Fields read by :func:`parse_call` besides :data:`FIELDS`."""

IGNORED = {"restore_faces": False, "tiling": False, "styles": [], "script_name": "",
           "script_args": [], "s_churn": 0, "s_tmin": 0, "s_noise": 1, "mask_blur": 4,
           "mask_blur_x": 4, "mask_blur_y": 4, "inpainting_fill": 1, "inpaint_full_res": False,
           "inpaint_full_res_padding": 0, "resize_mode": 0, "image_cfg_scale": 1.5, "initial_noise_multiplier": 1,
           "refiner_checkpoint": "", "refiner_switch_at": 0, "latent_mask": "", "disable_extra_networks": False,
           "comments": {}}
"""A1111 fields nijimi does not implement, with the value that leaves the image as nijimi makes it (a mask is
thresholded, not blurred: ``mask_blur`` 4 is A1111's default and changes little; the masked area starts from the
init image, A1111's ``inpainting_fill`` 1; images are resized to ``width``×``height``, ``resize_mode`` 0). Another
value is ignored with a warning."""

Script = Callable[[Any, Mapping[str, Any], str, Limits], tuple[dict[str, Any], list[str]]]
"""The reader of one ``alwayson_scripts`` entry: ``(its value, the body, the mode, limits) → (request fields,
warnings)``; :func:`parse_call` names the scripts it has no reader for as ignored."""

SILENT = re.compile(r"(enable_hr$|hr_|firstphase_|s_tmax$|sampler_index$|denoising_strength$|do_not_save_)")
"""Fields accepted quietly: the hires fix's (read when ``enable_hr`` is true), and A1111's own saving switches (here
``save_images`` decides)."""



@dataclass(frozen=True)
class Call:
    """A parsed txt2img/img2img body: the request, its ``iterations`` batches (A1111's ``n_iter``; batch k starts
    at seed ``seed + k × batch``), the checkpoint it names (``override_settings.sd_model_checkpoint``) and whether it
    stays chosen afterwards, whether images are sent and saved, the client's task id, warnings, and the
    ``parameters`` echoed back."""

    request: GenerationRequest
    iterations: int = 1
    checkpoint: str | None = None
    keep_checkpoint: bool = False
    send_images: bool = True
    save_images: bool = False
    task_id: str | None = None
    warnings: tuple[str, ...] = ()
    parameters: dict = field(default_factory=dict)


def parse_call(body: Any, mode: str, limits: Limits, fixed: Mapping[str, Any] | None = None,
               scripts: Mapping[str, Script] | None = None) -> Call:
    """The :class:`Call` of a txt2img (``mode`` TXT2IMG) or img2img body; ConfigError (and the request's own
    errors) name the first bad field. ``fixed``: request fields the server sets (its LoRA folder), which no
    client field can change; ``scripts``: the readers of ``alwayson_scripts`` entries by lower-case name."""
    if not isinstance(body, dict):
        raise ConfigError(f"the body must be a JSON object, not {_kind(body)}")
    values, warnings = {}, []
    for f in FIELDS:
        if body.get(f.key) is not None:
            if mode in f.modes:
                values[f.target] = f.convert(f.key, body[f.key], limits)
            elif not SILENT.match(f.key):
                warnings.append(f"{f.key} applies to {' and '.join(f.modes)} only; ignored")
    if isinstance(body.get("init_images"), list) and len(body["init_images"]) > 1 and mode == IMG2IMG:
        warnings.append(f"init_images: only the first of {len(body['init_images'])} is used")
    if body.get("inpainting_mask_invert") and values.get("mask") is not None:
        values["mask"] = ImageOps.invert(values["mask"].convert("L"))
    if mode == TXT2IMG and _boolean("enable_hr", body.get("enable_hr", False)):
        values.update(_hires(body, limits))
    sampler = _sampler(body)
    resize = [_integer(k, body.get(k) or -1) for k in ("seed_resize_from_w", "seed_resize_from_h")]
    overrides = {} if body.get("override_settings") is None else body["override_settings"]
    if not isinstance(overrides, dict):
        raise ConfigError(f"override_settings must be an object, not {_kind(overrides)}")
    if overrides.get("CLIP_stop_at_last_layers") is not None:
        values["clip_skip"] = _integer("CLIP_stop_at_last_layers", overrides["CLIP_stop_at_last_layers"])
    checkpoint = overrides.get("sd_model_checkpoint")
    if checkpoint is not None:
        _text("override_settings.sd_model_checkpoint", checkpoint, limits)
    warnings += [f"override_settings.{k} is not supported by nijimi; ignored" for k in overrides
                 if k not in ("sd_model_checkpoint", "CLIP_stop_at_last_layers")]
    warnings += _ignored(body)
    values.update(_scripts(body, mode, limits, scripts or {}, warnings))
    request = GenerationRequest(**{**values, **(fixed or {})}, sampler=sampler,
                                seed_resize=tuple(resize) if min(resize) > 0 else None)
    iterations = _integer("n_iter", body.get("n_iter") or 1)
    _check_size(request, iterations, limits)
    flag = lambda key, default: _boolean(key, body.get(key, default))  # noqa: E731
    return Call(request, iterations, checkpoint, not flag("override_settings_restore_afterwards", True),
                flag("send_images", True), flag("save_images", False), _task_id(body.get("force_task_id")),
                tuple(warnings), _echo(body, flag("include_init_images", False)))


def request_fields(request: GenerationRequest) -> dict[str, Any]:
    """The txt2img body that asks for ``request``: :data:`FIELDS` read backwards (images left out), a random seed as
    -1, the sampler as ``sampler_name`` + ``scheduler`` and the request's LoRAs as ``<lora:NAME:W>`` tags (``NAME:TE:
    UNET`` when the two multipliers differ) after the prompt."""
    body = {f.key: getattr(request, f.target) for f in FIELDS if TXT2IMG in f.modes}
    body["seed"], body["subseed"] = _or(request.seed, -1), _or(request.variation_seed, -1)
    tags = [f"<lora:{Path(lora.path).stem}:{lora.te_multiplier:g}"
            + (f":{lora.unet_multiplier:g}>" if lora.unet_multiplier != lora.te_multiplier else ">")
            for lora in request.loras]
    body["prompt"] = " ".join([request.prompt.rstrip(), *tags]) if tags else request.prompt
    if isinstance(request.sampler, SamplerChoice):
        body["sampler_name"], body["scheduler"] = request.sampler.display, request.sampler.schedule
    return body


def _sampler(body: Mapping[str, Any]) -> SamplerChoice | None:
    """``sampler_name`` (or the old ``sampler_index``) and ``scheduler`` as one choice (A1111's names and labels);
    None: the model's default sampler on its automatic schedule."""
    name = body.get("sampler_name") or body.get("sampler_index")
    scheduler = body.get("scheduler") or "automatic"
    if name is not None and not isinstance(name, str) or not isinstance(scheduler, str):
        raise ConfigError("sampler_name and scheduler must be strings")
    if name is None:
        return None if parse_schedule(scheduler) == "automatic" else parse_sampler("DPM++ 2M", scheduler)
    return parse_sampler(name, scheduler)


def _hires(body: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """``enable_hr``'s fields as the hires request fields, with A1111's defaults (scale 2, the Latent upscaler, the
    first pass's steps and sampler); ``hr_resize_x``/``_y`` win over ``hr_scale`` as in A1111."""
    get = lambda key, default: default if body.get(key) is None else body[key]  # noqa: E731
    width, height = (_integer(key, get(key, 0)) for key in ("hr_resize_x", "hr_resize_y"))
    sampler = get("hr_sampler_name", "Use same sampler")
    return {"hires_scale": _number("hr_scale", get("hr_scale", 2.0), limits),
            "hires_size": (width, height) if width or height else None,
            "hires_steps": _integer("hr_second_pass_steps", get("hr_second_pass_steps", 0)),
            "hires_upscaler": _text("hr_upscaler", get("hr_upscaler", "Latent"), limits),
            "hires_denoise": _number("denoising_strength", get("denoising_strength", 0.7), limits),
            "hires_sampler": None if sampler == "Use same sampler" else _text("hr_sampler_name", sampler, limits),
            "hires_prompt": _text("hr_prompt", get("hr_prompt", ""), limits),
            "hires_negative_prompt": _text("hr_negative_prompt", get("hr_negative_prompt", ""), limits)}


def _ignored(body: Mapping[str, Any]) -> list[str]:
    known = {f.key for f in FIELDS} | set(JOB_FIELDS)
    warnings = []
    for key, value in body.items():
        if key in IGNORED:
            if value is not None and value != IGNORED[key]:
                warnings.append(f"{key} is not supported by nijimi; ignored")
        elif key not in known and not SILENT.match(key):
            warnings.append(f"{key} is not an A1111 field nijimi knows; ignored")
    return warnings


def _scripts(body: Mapping[str, Any], mode: str, limits: Limits, scripts: Mapping[str, Script],
             warnings: list[str]) -> dict[str, Any]:
    """The request fields of the ``alwayson_scripts`` nijimi has readers for (A1111 finds a script by its name in
    any case); the others are named in ``warnings``."""
    entries = body.get("alwayson_scripts") or {}
    if not isinstance(entries, dict):
        raise ConfigError(f"alwayson_scripts must be an object of scripts, not {_kind(entries)}")
    values: dict[str, Any] = {}
    for name, value in entries.items():
        reader = scripts.get(name.lower())
        if reader is None:
            warnings.append(f"alwayson_scripts.{name} is not supported by nijimi; ignored")
            continue
        found, notes = reader(value, body, mode, limits)
        values.update(found)
        warnings += notes
    return values


def _check_size(request: GenerationRequest, iterations: int, limits: Limits) -> None:
    if iterations < 1 or request.batch * iterations > limits.images:
        raise ConfigError(f"batch_size {request.batch} × n_iter {iterations} must be from 1 to {limits.images} "
                          "images")
    if request.width and request.height and request.width * request.height > limits.pixels:
        raise ConfigError(f"{request.width}x{request.height} is more than the {limits.pixels} pixels this server "
                          "makes per image")


def _task_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[\w()\-.]{1,80}", value):
        raise ConfigError("force_task_id must be 1 to 80 letters, digits or _ - . ( )")
    return value


def _echo(body: Mapping[str, Any], include_images: bool) -> dict:
    """The ``parameters`` A1111 answers with: the body, without the images unless ``include_init_images``."""
    if include_images:
        return dict(body)
    return {**body, **{k: None for k in ("init_images", "mask") if k in body}}


@dataclass
class Outcome:
    """What a call made: each image's PNG bytes, its own request (batch 1, its seed) and infotext, the files saved,
    the model it ran on, warnings from the run, and whether an interrupt cut it short (then only the images of the
    batches that finished are here)."""

    pngs: list[bytes] = field(default_factory=list)
    requests: list[GenerationRequest] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    model: str = ""
    model_hash: str | None = None
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    timestamp: str = field(default_factory=lambda: datetime.now().strftime("%Y%m%d%H%M%S"))


def answer(call: Call, outcome: Outcome) -> dict:
    """A1111's txt2img/img2img response (plus ``warnings``)."""
    images = [base64.b64encode(png).decode("ascii") for png in outcome.pngs] if call.send_images else []
    return {"images": images, "parameters": call.parameters, "info": json.dumps(info(call, outcome)),
            "warnings": [*call.warnings, *outcome.warnings]}


def info(call: Call, outcome: Outcome) -> dict:
    """A1111's ``info`` object: the settings, every image's seed and infotext, the model; nijimi adds
    ``interrupted`` and the saved ``files`` (relative to the output folder)."""
    r, ran = call.request, outcome.requests or [call.request]
    resize = r.seed_resize or (-1, -1)
    return {"prompt": r.prompt, "all_prompts": [q.prompt for q in ran], "negative_prompt": r.negative_prompt,
            "all_negative_prompts": [q.negative_prompt for q in ran], "seed": ran[0].seed,
            "all_seeds": [q.seed for q in ran], "subseed": _or(ran[0].variation_seed, -1),
            "all_subseeds": [_or(q.variation_seed, -1) for q in ran], "subseed_strength": r.variation_strength,
            "width": ran[0].width, "height": ran[0].height,
            "sampler_name": ran[0].sampler.display if ran[0].sampler else None, "cfg_scale": ran[0].guidance,
            "steps": r.steps, "batch_size": r.batch, "restore_faces": False, "sd_model_name": outcome.model,
            "sd_model_hash": outcome.model_hash, "seed_resize_from_w": resize[0], "seed_resize_from_h": resize[1],
            "denoising_strength": r.strength if r.init_image is not None else None,
            "extra_generation_params": {"Schedule type": ran[0].sampler.schedule_label} if ran[0].sampler else {},
            "index_of_first_image": 0, "infotexts": outcome.infotexts, "styles": [],
            "job_timestamp": outcome.timestamp, "clip_skip": r.clip_skip or 1, "version": f"nijimi {__version__}",
            "interrupted": outcome.interrupted, "files": outcome.files}


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def png_info(body: Any, limits: Limits) -> dict:
    """``/sdapi/v1/png-info``: the image's infotext (``info``), its other text chunks (``items``) and the infotext
    read into A1111's flat ``parameters`` (``Prompt``, ``Negative prompt``, ``Steps`` …; sizes as ``Size-1``,
    ``Size-2``)."""
    if not isinstance(body, dict) or "image" not in body:
        raise ConfigError("the body must be a JSON object with a base64 \"image\"")
    image = decode_image("image", body["image"], limits)
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    raw = items.pop("parameters", None)
    parameters: dict[str, Any] = {}
    if raw:
        parsed = parse_parameters(raw)
        parameters = {"Prompt": parsed["prompt"], "Negative prompt": parsed["negative_prompt"]}
        for key, value in parsed["settings"].items():
            parameters.update({f"{key}-1": value[0], f"{key}-2": value[1]} if isinstance(value, tuple)
                              else {key: value})
    return {"info": raw or "", "items": items, "parameters": parameters}


def samplers() -> list[dict]:
    """``/sdapi/v1/samplers``: A1111's display names, nijimi's names as aliases; ``scheduler`` is the automatic
    schedule (:func:`schedulers`)."""
    return [{"name": spec.display, "aliases": [name, *spec.aliases], "options": {"scheduler": spec.automatic}}
            for name, spec in SAMPLER_SPECS.items()]


def schedulers() -> list[dict]:
    """``/sdapi/v1/schedulers``: each schedule by name and A1111 label."""
    return [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if name == "karras" else -1,
             "need_inner_model": False} for name, label in SCHEDULE_LABELS.items()]


def required_text(body: Any, key: str) -> str:
    """``body[key]`` of a JSON object body, a string; ApiError 422 otherwise."""
    if not isinstance(body, dict) or not isinstance(body.get(key), str):
        raise ApiError(422, "ValidationError", f"the body must be a JSON object with a string {key!r}")
    return body[key]
