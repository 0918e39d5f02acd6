"""A1111's prompt syntax for adapters, ``<lora:NAME:MULTIPLIER>``, and finding NAME in a LoRA folder.

The tag (A1111's extra networks; ``lyco`` is an alias of ``lora``) is ``<lora:name[:te[:unet]]>`` with colon-separated
items: positional ``te`` (the text-encoder multiplier, default 1) and ``unet`` (default: ``te``), or named
``te=…``/``unet=…`` items, which take precedence. A1111's fourth item, ``dyn`` (rank truncation), is not supported.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import NamedTuple

from nijimi.errors import CheckpointError, ConfigError, PromptError
from nijimi.io import safetensors

_TAG = re.compile(r"<(lora|lyco):([^>]+)>")
ADAPTER_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
"""File endings searched for a named adapter."""


class LoraTag(NamedTuple):
    """One ``<lora:…>`` tag: the adapter ``name`` and its text-encoder and U-Net multipliers."""

    name: str
    te_multiplier: float
    unet_multiplier: float


def _number(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PromptError(f"{tag}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise PromptError(f"{tag}: multiplier {text.strip()!r} is not a finite number")
    return value


def _parse_tag(body: str, tag: str) -> LoraTag:
    positional, named = [], {}
    for item in body.split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1]
        else:
            positional.append(item)
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown or len(positional) > 3:
        raise PromptError(f"{tag}: only <lora:name[:te[:unet]]> with te=/unet= are supported")
    if not positional or not positional[0].strip():
        raise PromptError(f"{tag}: the adapter name is missing")
    te = _number(positional[1], tag) if len(positional) > 1 else 1.0
    te = _number(named["te"], tag) if "te" in named else te
    unet = _number(positional[2], tag) if len(positional) > 2 else te
    unet = _number(named["unet"], tag) if "unet" in named else unet
    return LoraTag(positional[0].strip(), te, unet)


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Remove every ``<lora:…>``/``<lyco:…>`` tag from ``prompt``; return the rest and the tags in order.

    ``"a cat <lora:ink:0.8>"`` → ``("a cat ", [LoraTag("ink", 0.8, 0.8)])``. Other ``<…>`` text is left alone.
    """
    tags: list[LoraTag] = []

    def take(match: re.Match) -> str:
        tags.append(_parse_tag(match[2], match[0]))
        return ""

    return _TAG.sub(take, prompt), tags


def _alias(path: Path) -> str | None:
    """kohya's ``ss_output_name`` of a safetensors file (A1111 accepts it as the name too)."""
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        return safetensors.read_metadata(path).get("ss_output_name")
    except (CheckpointError, OSError):  # an unreadable file is no match; loading it by path reports the problem
        return None


def resolve_lora(name: str, lora_dir: str | os.PathLike) -> Path:
    """The file a tag's ``name`` refers to in ``lora_dir`` (searched recursively): the file whose path relative to
    the folder, without its ending, is ``name`` (``"styles/ink"``), else the file whose stem is ``name``, else the
    safetensors file whose ``ss_output_name`` is ``name``. No match, or several equally good, raise
    :class:`ConfigError` naming them."""
    folder = Path(lora_dir)
    if not folder.is_dir():
        raise ConfigError(f"LoRA folder {folder} does not exist")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in ADAPTER_SUFFIXES and p.is_file())
    rules = (lambda p: p.relative_to(folder).with_suffix("").as_posix() == name,
             lambda p: p.stem == name,
             lambda p: _alias(p) == name)
    for rule in rules:
        hits = [p for p in found if rule(p)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise ConfigError(f"LoRA name {name!r} is ambiguous in {folder}: {[str(p) for p in hits]}")
    known = sorted({p.stem for p in found})
    raise ConfigError(f"no LoRA named {name!r} in {folder}; available: {known[:20]}"
                      + (f" and {len(known) - 20} more" if len(known) > 20 else ""))


def parse_lora_option(text: str) -> tuple[Path, float, float]:
    """The CLI form ``FILE[:WEIGHT[:UNET_WEIGHT]]`` → (path, text-encoder multiplier, U-Net multiplier); a weight
    that is NaN or infinite (``nan``, ``inf``, ``1e309``) raises :class:`ConfigError` naming the option."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        if not math.isfinite(numbers[0]):
            raise ConfigError(f"--lora {text}: weight {parts[-1]!r} is not a finite number")
        parts.pop()
    te = numbers[0] if numbers else 1.0
    return Path(":".join(parts)), te, numbers[1] if len(numbers) > 1 else te
