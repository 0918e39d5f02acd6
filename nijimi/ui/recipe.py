"""What a PNG records of how it was made: A1111's ``parameters`` text (:func:`a1111_text`) and nijimi's recipe, whose
files are named by name and hash: what ``generate`` records of the model and the LoRAs (A1111's way, no
path of this machine unless asked) and how ``reproduce`` finds them again (:func:`~nijimi.io.find.find_by_name_and_hash`
in ``--models-dir`` / ``--lora-dir``, the image's folder and the working directory)."""

from __future__ import annotations

import argparse
import dataclasses
import platform
from collections.abc import Mapping
from pathlib import Path

import torch

from nijimi import __version__
from nijimi.adapters.tags import parse_lora_tags, resolve_lora
from nijimi.embedded import ADAPTERS, EMBEDDED
from nijimi.errors import NijimiError
from nijimi.io.embeddings import embedding_hash
from nijimi.io.find import find_by_name_and_hash
from nijimi.io.pngmeta import format_name_hashes, format_parameters, generation_settings, model_hash
from nijimi.pipelines import hires
from nijimi.pipelines.infotext import lora_infotext
from nijimi.pipelines.pipeline import Pipeline
from nijimi.pipelines.request import GenerationRequest
from nijimi.pipelines.runtime import dtype_name
from nijimi.ui.control import control_infotext


def a1111_text(pipe: Pipeline, r: GenerationRequest, embeddings: Mapping[str, str] | None = None) -> str:
    """A1111's ``parameters`` text of one image made by ``pipe`` for ``r`` (batch 1), with the ``TI hashes`` of the
    textual-inversion ``embeddings`` (name → hash) its prompts used."""
    eta = "Eta DDIM" if r.sampler.base == "ddim" else "Eta"  # A1111's two settings
    varied = r.variation_strength > 0
    vae = r.vae and Path(r.vae)
    extra = {"VAE hash": model_hash(vae) if vae and vae.is_file() else None, "VAE": vae and vae.name,
             "Variation seed": r.variation_seed if varied else None,
             "Variation seed strength": r.variation_strength if varied else None, "Seed resize from": r.seed_resize,
             "Denoising strength": r.strength if r.init_image is not None else
             r.hires_denoise if hires.enabled(r) else None, "Clip skip": r.clip_skip, **hires.infotext(r),
             "RNG": "CPU", eta: r.eta, **control_infotext([dataclasses.asdict(c) for c in r.control]),
             "TI hashes": format_name_hashes(embeddings or {}) or None}
    prompt, loras = lora_infotext(r)
    fields = generation_settings(steps=r.steps, sampler=r.sampler.infotext_name, schedule=r.sampler.schedule_label,
                                 cfg_scale=r.guidance, seed=r.seed, size=(r.width, r.height),
                                 extra={"Model hash": pipe.model_hash, "Model": pipe.name, **extra, **loras})
    return format_parameters(prompt, r.negative_prompt, fields)


def embedding_hashes(embeddings: Mapping[str, Path]) -> dict[str, str]:
    """Name → A1111's hash of the textual-inversion embeddings a generation used (``Generation.embeddings``)."""
    return {name: embedding_hash(path) for name, path in embeddings.items()}


def png_recipe(pipe: Pipeline, request: GenerationRequest, record_paths: bool = False,
               embeddings: Mapping[str, str] | None = None) -> dict:
    """Every knob of one image (``reproduce`` reads ``request`` back) and what it ran on. The model and the LoRAs
    (files and prompt tags) are recorded by name and hash, as A1111 records them; ``record_paths`` adds the model's
    path and keeps the LoRAs' paths and LoRA folder (for private use: they tell where files are on this machine).
    ``embeddings``: name → hash of the textual-inversion embeddings the prompts used (``reproduce`` checks them)."""
    data = request.to_dict()
    loras = [{"name": Path(path).name, "hash": model_hash(path)} for path, _, _ in data["loras"]]
    model = {"name": pipe.name, "hash": pipe.model_hash, **({"source": pipe.source} if record_paths else {})}
    if not record_paths:
        data["loras"] = [[entry["name"], te, unet] for entry, (_, te, unet) in zip(loras, data["loras"], strict=True)]
        data["lora_dir"] = None
    return {"request": data, "model": model, "loras": loras, "lora_tags": tag_hashes(request),
            "embeddings": dict(embeddings or {}),
            "dtype": dtype_name(pipe.dtype), "device": str(pipe.device),
            "schedule": pipe.model.config.schedule.to_diffusers_config(),
            "versions": {"nijimi": __version__, "torch": torch.__version__, "python": platform.python_version()}}


def tag_hashes(request: GenerationRequest) -> dict[str, str]:
    """Name → hash of the files the prompt's ``<lora:NAME:…>`` tags name (in the request's LoRA folder)."""
    folder = request.lora_dir or ADAPTERS
    return {tag.name: model_hash(resolve_lora(tag.name, folder)) for tag in parse_lora_tags(request.prompt)[1]}


def _search_dirs(given: str | None, image: str, *more: Path) -> list[Path]:
    """Where ``reproduce`` looks for a file a recipe names: the folder given, the image's folder, the working
    directory, then ``more``."""
    return [*([Path(given)] if given else []), Path(image).absolute().parent, Path.cwd(), *more]


def recorded_model(recipe: dict, args: argparse.Namespace) -> str:
    """The model a recipe names: its recorded path when that exists (``--record-paths``), the embedded model, or
    the file of its name and hash in ``--models-dir``, the image's folder or the working directory."""
    entry = recipe["model"]
    source, name, digest = entry.get("source"), entry.get("name"), entry.get("hash")
    if isinstance(source, str) and source and Path(source).exists():
        return source
    if name == EMBEDDED:
        return EMBEDDED
    if not isinstance(name, str) or not name:
        raise NijimiError(f"{args.image}: the recipe names no model; give one with --model")
    digest = digest if isinstance(digest, str) else None
    return str(find_by_name_and_hash(name, digest, _search_dirs(args.models_dir, args.image), "model"))


def recorded_loras(recipe: dict, args: argparse.Namespace) -> dict:
    """The recipe's request with each LoRA file recorded by name (and hash, in ``recipe["loras"]``) replaced by the
    file found in ``--lora-dir``, the image's folder, the working directory or the embedded adapters, and
    ``--lora-dir`` as the folder of its prompt tags."""
    data = dict(recipe["request"])
    hashes = recipe.get("loras") if isinstance(recipe.get("loras"), list) else []
    dirs = _search_dirs(args.lora_dir, args.image, ADAPTERS)
    if isinstance(data.get("loras"), list):
        data["loras"] = [_found_lora(entry, hashes[i] if i < len(hashes) else None, dirs)
                         for i, entry in enumerate(data["loras"])]
    if args.lora_dir:
        data["lora_dir"] = args.lora_dir
    return data


def _found_lora(entry: object, recorded: object, dirs: list[Path]) -> object:
    """A recipe's ``[name, te, unet]`` LoRA entry with the name replaced by the file of that name and hash."""
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)) or Path(entry[0]).is_absolute():
        return entry
    digest = recorded.get("hash") if isinstance(recorded, dict) else None
    return [str(find_by_name_and_hash(entry[0], digest if isinstance(digest, str) else None, dirs, "LoRA")),
            *entry[1:]]


def check_tags(recipe: dict, request: GenerationRequest) -> None:
    """The files the prompt's LoRA tags name now must be the ones the image was made with (same hash)."""
    recorded = recipe.get("lora_tags") if isinstance(recipe.get("lora_tags"), dict) else {}
    for name, found in tag_hashes(request).items():
        if recorded.get(name) not in (None, found):
            raise NijimiError(f"LoRA tag {name!r}: the file in {request.lora_dir or ADAPTERS} has hash {found}, the "
                              f"image's has {recorded[name]}; give its folder with --lora-dir")
