"""``nijimi reproduce`` and ``nijimi info`` for images made by other tools (A1111, ComfyUI).

``reproduce`` reads an image's ComfyUI API graph (preferred: it is what ran) or its A1111 infotext, finds the
checkpoint, LoRAs, VAE and embeddings in the ``--models-dir``/``--lora-dir``/``--vae-dir``/``--embeddings-dir``
folders (:mod:`nijimi.io.find`) and prints what cannot be reproduced exactly on stderr, one ``warning: …`` line each
(:mod:`nijimi.pipelines.foreign`). ``info`` prints the settings read from a ComfyUI graph.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nijimi.errors import ImageError
from nijimi.io.find import Folders
from nijimi.pipelines.comfyui import from_graph
from nijimi.pipelines.foreign import ForeignSettings, Imported, from_infotext, to_request


def add_folder_arguments(p: argparse.ArgumentParser) -> None:
    """``reproduce``'s folders where the files an A1111 or ComfyUI image names are looked for."""
    p.add_argument("--models-dir", type=Path, metavar="DIR", help="checkpoints of A1111/ComfyUI images, found by "
                   "A1111's model hash or by name")
    p.add_argument("--lora-dir", type=Path, metavar="DIR", help="their LoRAs (default: the embedded model's demo "
                   "adapters)")
    p.add_argument("--vae-dir", type=Path, metavar="DIR", help="their VAEs")
    p.add_argument("--embeddings-dir", type=Path, metavar="DIR", help="their textual-inversion embeddings")


def foreign_settings(meta: dict[str, Any], image: str) -> ForeignSettings:
    """The settings of an image nijimi did not make: its ComfyUI API graph, else its A1111 infotext."""
    if meta.get("comfyui_prompt") is not None:
        return from_graph(meta["comfyui_prompt"])
    if meta.get("parameters") is not None:
        return from_infotext(meta)
    if meta.get("comfyui_workflow") is not None:
        raise ImageError(f"{image}: only ComfyUI's editor graph (workflow) is stored; reproduce needs its API graph "
                         "(prompt)")
    raise ImageError(f"{image}: no generation metadata (a nijimi recipe, A1111 parameters or a ComfyUI graph)")


def import_image(meta: dict[str, Any], args: argparse.Namespace) -> Imported:
    """The request of a foreign image, its warnings printed on stderr."""
    folders = Folders(args.models_dir, args.lora_dir, args.vae_dir, args.embeddings_dir)
    imported = to_request(foreign_settings(meta, str(args.image)), folders, args.model)
    for line in imported.warnings:
        print(f"warning: {line}", file=sys.stderr)
    return imported


def format_settings(settings: ForeignSettings) -> str:
    """The settings read from a ComfyUI graph, for ``nijimi info``, with what cannot be reproduced."""
    lines = [f"{settings.source} settings:", f"  Prompt: {settings.prompt}",
             f"  Negative prompt: {settings.negative_prompt}"]
    for key, value in settings.values.items():
        lines.append(f"  {key}: {f'{value[0]}x{value[1]}' if isinstance(value, tuple) else value}")
    lines += [f"  LoRA: {lora.name} (text encoder {lora.te:g}, U-Net {lora.unet:g})" for lora in settings.loras]
    return "\n".join(lines + [f"  not reproduced: {line}" for line in settings.warnings])
