"""The PNG recipe's files by name and hash: what ``generate`` records of the model and the LoRAs (A1111's way, no
path of this machine unless asked) and how ``reproduce`` finds them again (:func:`~nijimi.io.find.find_by_name_and_hash`
in ``--models-dir`` / ``--lora-dir``, the image's folder and the working directory)."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from nijimi import __version__
from nijimi.adapters.tags import parse_lora_tags, resolve_lora
from nijimi.embedded import ADAPTERS, EMBEDDED
from nijimi.errors import NijimiError
from nijimi.io.find import find_by_name_and_hash
from nijimi.io.pngmeta import model_hash
from nijimi.pipelines.pipeline import Pipeline
from nijimi.pipelines.request import GenerationRequest
from nijimi.pipelines.runtime import dtype_name


def png_recipe(pipe: Pipeline, request: GenerationRequest, record_paths: bool = False) -> dict:
    """Every knob of one image (``reproduce`` reads ``request`` back) and what it ran on. The model and the LoRAs
    (files and prompt tags) are recorded by name and hash, as A1111 records them; ``record_paths`` adds the model's
    path and keeps the LoRAs' paths and LoRA folder (for private use: they tell where files are on this machine)."""
    data = request.to_dict()
    loras = [{"name": Path(path).name, "hash": model_hash(path)} for path, _, _ in data["loras"]]
    model = {"name": pipe.name, "hash": pipe.model_hash, **({"source": pipe.source} if record_paths else {})}
    if not record_paths:
        data["loras"] = [[entry["name"], te, unet] for entry, (_, te, unet) in zip(loras, data["loras"], strict=True)]
        data["lora_dir"] = None
    return {"request": data, "model": model, "loras": loras, "lora_tags": tag_hashes(request),
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
