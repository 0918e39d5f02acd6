"""Requests from images made by other tools: an A1111 infotext or a ComfyUI graph → a :class:`GenerationRequest`.

Both are first read into one form, :class:`ForeignSettings`: A1111's setting names and values (``Steps``,
``Sampler``, ``Schedule type``, ``CFG scale``, ``Seed``, ``Size``, ``Model``/``Model hash``, ``VAE``/``VAE hash``,
``Clip skip``, ``Variation seed``, ``Eta``, ``RNG`` …) and the LoRAs by name, multipliers and hash
(:func:`from_infotext` here; ComfyUI graphs in :mod:`nijimi.pipelines.comfyui`). :func:`to_request` then maps each
setting to its request field, finds the files the settings name (:func:`~nijimi.io.find.find_file`: by A1111's hash,
else by name) and names, one warning each, what nijimi cannot reproduce exactly: noise A1111 drew on the GPU (its
default ``RNG``), ENSD, an img2img source, hires fix when nijimi has no such setting, a schedule or sampler nijimi
lacks, files not found, ControlNet units (their control images are not in the metadata; the warning gives each as a
``--control`` flag), and every setting of a feature or extension it does not know (ADetailer, …), grouped by its
first word. The rest is done.

How A1111 reads ``Sampler`` and ``Schedule type`` (``get_sampler_and_scheduler`` in ``modules/sd_samplers.py``, 1.9
and later): a schedule named at the end of the sampler ("DPM++ 2M Karras") wins; else ``Schedule type``; "Automatic"
(or none) is the sampler's default schedule in A1111's table (``modules/sd_samplers_kdiffusion.py``), k-diffusion's
``get_sigmas`` (A1111's "Uniform", nijimi's ``normal``) for the others. Infotexts written before 1.9 (``Version`` <
1.9) had no schedule type: a bare name meant Uniform.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nijimi.adapters.tags import parse_lora_tags
from nijimi.diffusion.choice import SamplerChoice, parse_sampler, split_sampler_name
from nijimi.embedded import ADAPTERS, EMBEDDED, embedded_path
from nijimi.errors import ConfigError, SamplerError
from nijimi.io.find import Folders, find_file, hash_matches
from nijimi.io.pngmeta import parse_name_hashes
from nijimi.models.ldm import DEFAULT_GUIDANCE
from nijimi.pipelines import hires
from nijimi.pipelines.adapters import LoraRequest
from nijimi.pipelines.infotext import control_spec_text, control_unit_settings
from nijimi.pipelines.request import GenerationRequest

_A1111_DEFAULT_SCHEDULE = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential",
                           "DPM++ 2M SDE Heun": "Exponential", "DPM++ 2S a": "Karras", "DPM++ 3M SDE": "Exponential",
                           "DPM2": "Karras", "DPM2 a": "Karras"}
"""A1111's "Automatic" schedule of each sampler that has one (``samplers_k_diffusion`` options, 1.9)."""
_FIELDS = {"Steps": "steps", "CFG scale": "guidance", "Seed": "seed", "Variation seed": "variation_seed",
           "Variation seed strength": "variation_strength", "Seed resize from": "seed_resize",
           "Clip skip": "clip_skip"}
"""Settings that are one request field each."""
_HANDLED = {"Sampler", "Schedule type", "Size", "Model", "Model hash", "VAE", "VAE hash", "Lora hashes", "TI hashes",
            "Denoising strength", "Eta", "Eta DDIM", "RNG", "ENSD", "Version", "Hashes"}
_CONTROLNET = re.compile(r"ControlNet \d+")
_DEFAULTS = {"Emphasis": "Original", "Schedule max sigma": "0", "Schedule min sigma": "0", "Schedule rho": "0"}
"""Settings A1111 may write at the value that changes nothing."""


@dataclass
class LoraRef:
    """One LoRA an image names: its name as written, text-encoder and U-Net multipliers, and A1111's short hash."""

    name: str
    te: float
    unet: float
    short_hash: str | None = None


@dataclass
class ForeignSettings:
    """An image's settings in A1111's terms, whichever tool wrote them (see the module docstring)."""

    source: str
    prompt: str
    negative_prompt: str
    values: dict[str, Any]
    loras: list[LoraRef] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Imported:
    """What :func:`to_request` made: the request, the checkpoint to load (a path, or ``"embedded"``) and the
    warnings (one line each, without ``warning:``)."""

    request: GenerationRequest
    model: str
    warnings: tuple[str, ...]


def from_infotext(parsed: dict[str, Any]) -> ForeignSettings:
    """An A1111 infotext read by :func:`~nijimi.io.pngmeta.parse_parameters` as :class:`ForeignSettings`: the
    prompt's ``<lora:…>`` tags become LoRAs (with their ``Lora hashes``), the prompt keeps the rest of its text."""
    prompt, tags = parse_lora_tags(parsed["prompt"])
    values = dict(parsed["settings"])
    hashes = parse_name_hashes(str(values.get("Lora hashes") or ""))
    loras = [LoraRef(t.name, t.te_multiplier, t.unet_multiplier, hashes.get(t.name)) for t in tags]
    return ForeignSettings("A1111", prompt, parsed["negative_prompt"], values, loras)


def _before_19(version: object) -> bool:
    match = re.match(r"v?(\d+)\.(\d+)", str(version or ""))
    return bool(match) and (int(match[1]), int(match[2])) < (1, 9)


def a1111_schedule(sampler: str, schedule: str | None, version: object = None) -> str:
    """The schedule A1111 ran ``sampler`` with for this ``Schedule type`` (None: not written) and ``Version``."""
    if schedule in (None, "") and _before_19(version):
        return "Uniform"
    if schedule in (None, "", "Automatic"):
        return _A1111_DEFAULT_SCHEDULE.get(sampler, "Uniform")
    return str(schedule)


def _sampler(values: dict[str, Any], warnings: list[str]) -> SamplerChoice | None:
    name = str(values.get("Sampler") or "").strip()
    if not name:
        return None
    try:
        base, carried = split_sampler_name(name)
    except SamplerError:
        warnings.append(f"Sampler {name!r} is not one nijimi has; the model's default sampler is used")
        return None
    if carried:
        return SamplerChoice(base, carried)  # a combined name ("DPM++ 2M Karras") names its schedule itself
    schedule = a1111_schedule(name, values.get("Schedule type"), values.get("Version"))
    try:
        return parse_sampler(base, schedule)
    except SamplerError:
        warnings.append(f"Schedule type {schedule!r} is not one nijimi has; {name} runs on its automatic schedule")
        return parse_sampler(base)


def _eta(values: dict[str, Any], sampler: SamplerChoice | None, fields: dict, warnings: list[str]) -> None:
    key = "Eta DDIM" if sampler is not None and sampler.base == "ddim" else "Eta"
    other = "Eta" if key == "Eta DDIM" else "Eta DDIM"
    if other in values:
        warnings.append(f"{other} {values[other]} is not used by {sampler.display if sampler else 'this sampler'}")
    if key not in values:
        return
    if sampler is None or not sampler.takes_eta:
        warnings.append(f"{key} {values[key]}: nijimi's {sampler.name if sampler else 'default'} sampler has no eta")
        return
    fields["eta"] = values[key]  # a value that is no number is refused by the request, naming it


def _unknown(values: dict[str, Any], known: set[str]) -> list[str]:
    """One warning per feature: unknown settings grouped by their first word."""
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for key, value in values.items():
        if key in known or _DEFAULTS.get(key) == str(value):
            continue
        groups.setdefault(key.split()[0], []).append(key)
    return [f"{', '.join(keys)}: not reproduced (a setting nijimi does not have)" for keys in groups.values()]


def _controlnets(values: dict[str, Any]) -> list[str]:
    """One warning per ControlNet unit (A1111's ``ControlNet N``): its control image is not in the metadata, so it
    is left out; the warning gives the unit as a ``--control`` flag for the user who has the image."""
    warnings = []
    for key, value in values.items():
        if _CONTROLNET.fullmatch(key):
            settings = control_unit_settings(str(value))
            spec = control_spec_text(settings)
            how = f"with the image, add --control {spec}" if spec else \
                f"its preprocessor {settings.get('Module')!r} is not one nijimi has"
            warnings.append(f"{key}: not reproduced, the metadata does not hold its control image; {how}")
    return warnings


def _settings_fields(s: ForeignSettings, warnings: list[str]) -> dict[str, Any]:
    values = s.values
    fields: dict[str, Any] = {"prompt": s.prompt, "negative_prompt": s.negative_prompt}
    fields.update({name: values[key] for key, name in _FIELDS.items() if key in values})
    fields.setdefault("guidance", DEFAULT_GUIDANCE)  # A1111's own default, not the one the model may name
    if isinstance(values.get("Size"), tuple):
        fields["width"], fields["height"] = values["Size"]
    fields["sampler"] = _sampler(values, warnings)
    _eta(values, fields["sampler"], fields, warnings)
    hires_fields = hires.request_fields(values)
    fields.update(hires_fields)
    if not hires_fields and "Denoising strength" in values:
        warnings.append(f"Denoising strength {values['Denoising strength']}: the image was made from another "
                        "image (img2img), which its metadata does not hold; generating from noise")
    if s.source == "A1111" and values.get("RNG", "GPU") != "CPU":
        warnings.append(f"RNG {values.get('RNG', 'GPU')}: A1111 drew the noise on the GPU; nijimi draws it on the "
                        "CPU (as A1111 with RNG: CPU), so the picture differs")
    if str(values.get("ENSD", "0")) != "0":
        warnings.append(f"ENSD {values['ENSD']}: A1111's eta noise seed delta is not reproduced")
    warnings.extend(_controlnets(values))
    known = _HANDLED | set(_FIELDS) | (set(hires.INFOTEXT_FIELDS) if hires_fields else set()) \
        | {key for key in values if _CONTROLNET.fullmatch(key)}
    warnings.extend(_unknown(values, known))
    return {k: v for k, v in fields.items() if v is not None}


def _describe(name: object, short_hash: object) -> str:
    return " ".join(part for part in (repr(name) if name else "", f"[{short_hash}]" if short_hash else "") if part)


def _model(s: ForeignSettings, folders: Folders, model: str | None, warnings: list[str]) -> str:
    name, short = s.values.get("Model"), s.values.get("Model hash")
    described = _describe(name, short) or "(unnamed)"
    if model is not None:
        path = embedded_path() if model == EMBEDDED else Path(model)
        if short and path.is_file() and not hash_matches(path, "model", str(short)):
            warnings.append(f"model {model} is not the image's model {described}")
        return model if model == EMBEDDED else str(path.absolute())
    if folders.model is None:
        raise ConfigError(f"{s.source} image made with model {described}: give --model FILE or --models-dir DIR")
    found = find_file(folders.model, "model", str(name or ""), str(short or "") or None)
    if found is None:
        raise ConfigError(f"model {described} is not in {folders.model} (give --model FILE)")
    if not found.exact:
        warnings.append(f"model {found.path.name} has the image's model name {name!r} but not its hash {short}")
    return str(found.path.absolute())


def _vae(s: ForeignSettings, folders: Folders, warnings: list[str]) -> str | None:
    name, short = s.values.get("VAE"), s.values.get("VAE hash")
    if not (name or short):
        return None
    found = find_file(folders.vae, "vae", str(name or ""), str(short or "") or None) if folders.vae else None
    if found is None:
        warnings.append(f"VAE {_describe(name, short)} not found{f' in {folders.vae}' if folders.vae else ''} "
                        "(--vae-dir DIR); decoding with the model's own VAE")
        return None
    if not found.exact:
        warnings.append(f"VAE {found.path.name} has the image's VAE name but not its hash {short}")
    return str(found.path.absolute())


def _loras(s: ForeignSettings, folders: Folders, warnings: list[str]) -> tuple[LoraRequest, ...]:
    folder = folders.lora or ADAPTERS
    found_all = []
    for lora in s.loras:
        found = find_file(folder, "lora", lora.name, lora.short_hash)
        if found is None:
            warnings.append(f"LoRA {_describe(lora.name, lora.short_hash)} not found in {folder} (--lora-dir DIR); "
                            "left out")
            continue
        if not found.exact:
            warnings.append(f"LoRA {found.path.name} has the name {lora.name!r} but not the hash {lora.short_hash}")
        found_all.append(LoraRequest(found.path.resolve(), lora.te, lora.unet))
    return tuple(found_all)


def _embeddings(s: ForeignSettings, folders: Folders, warnings: list[str]) -> tuple[str, ...]:
    """``TI hashes``: the files of the embeddings the image used, found in ``Folders.embedding`` by hash or name (a
    prompt names an embedding by its file's stem, so a file found under another stem is named, not used); those not
    found, or all without a folder, are named in a warning (their names are read as words)."""
    hashes = parse_name_hashes(str(s.values.get("TI hashes") or ""))
    if folders.embedding is None:
        if hashes:
            warnings.append(f"TI hashes: the embeddings {', '.join(hashes)} are not applied without --embeddings-dir "
                            "(their names are read as words)")
        return ()
    files, missing = [], []
    for name, short in hashes.items():
        found = find_file(folders.embedding, "embedding", name, short)
        if found is not None and found.path.stem == name:
            files.append(str(found.path))
        else:
            missing.append(name if found is None else f"{name} (found as {found.path.name})")
    if missing:
        warnings.append(f"TI hashes: not in {folders.embedding}: {', '.join(missing)} (their names are read as words)")
    return tuple(files)


def to_request(settings: ForeignSettings, folders: Folders, model: str | None = None) -> Imported:
    """The request ``settings`` describe, with the files they name found in ``folders``; ``model`` (a file, a
    folder or ``"embedded"``) replaces the image's checkpoint. A checkpoint that cannot be found, and settings the
    request refuses, raise ConfigError; everything else that cannot be reproduced exactly is a warning."""
    warnings = list(settings.warnings)
    fields = _settings_fields(settings, warnings)
    checkpoint = _model(settings, folders, model, warnings)
    fields["vae"] = _vae(settings, folders, warnings)
    fields["loras"] = _loras(settings, folders, warnings)
    if folders.lora is not None:
        fields["lora_dir"] = str(folders.lora)
    fields["embeddings"] = _embeddings(settings, folders, warnings)
    try:
        request = GenerationRequest(**{k: v for k, v in fields.items() if v is not None})
    except (TypeError, ValueError, ConfigError) as e:
        raise ConfigError(f"{settings.source} settings: {e}") from None
    return Imported(request, checkpoint, tuple(warnings))
