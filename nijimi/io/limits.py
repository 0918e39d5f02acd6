"""Bounds on what a user's file may ask of this machine, checked where the file enters, before any allocation.

- Memory: :func:`available_memory` (what the OS offers now, for choosing tiles and slices) and :func:`machine_memory`
  (all there is: a model that needs more could never load).
- Model configs: :func:`check_model_fits` refuses a config whose network (:mod:`nijimi.models.size`) would need more
  than the machine's memory, before a module is built (a crafted config asking for 10⁹ layers is one line, not an
  allocation until killed).
- JSON: :func:`parse_json` / :func:`read_json` refuse text over :data:`MAX_JSON_BYTES` or nested deeper than
  :data:`MAX_JSON_DEPTH` before ``json.loads`` sees it, and name the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from nijimi.errors import CheckpointError, NijimiError
from nijimi.io.files import regular_file
from nijimi.models.size import model_size

MAX_JSON_BYTES = 32 << 20
"""Largest JSON file or metadata entry read (CLIP's ``vocab.json``, the largest a model folder holds, is 1.6 MB)."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of JSON arrays and objects read (model configs nest 3 levels)."""
BYTES_PER_PARAMETER = 2
"""The least memory a weight takes (float16 or bfloat16); the estimate is a lower bound of what a load needs."""
BYTES_PER_BLOCK = 64 << 10
"""Memory of one residual or transformer block's Python modules, however narrow (measured: 20–40 KiB)."""

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*+"|[\[\]{}]|"', re.DOTALL)
"""A whole JSON string (possessive: no backtracking), a bracket, or a quote that opens no terminated string."""


def available_memory() -> int:
    """Bytes of memory the OS says are available (MemAvailable), or 8 GiB when it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def machine_memory() -> int:
    """Bytes of physical memory of this machine (``sysconf``), or 8 GiB when it cannot be read."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return 8 << 30


_NOT_SIZES = ("pad_token_id", "sample_size", "clip_skip", "schedule")


def _largest_fields(config: object, prefix: str = "") -> list[tuple[int, str]]:
    """(value, dotted name) of every int size field of ``config`` and its nested config dataclasses."""
    out: list[tuple[int, str]] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in _NOT_SIZES:
            continue
        if dataclasses.is_dataclass(value):
            out += _largest_fields(value, f"{prefix}{field.name}.")
        elif type(value) is int:
            out.append((value, prefix + field.name))
    return out


def check_model_fits(config: object, source: str, memory: int | None = None,
                     error: type[NijimiError] = CheckpointError) -> None:
    """Raise ``error`` naming ``source`` and the config's largest numbers when the network ``config``
    describes would need more than ``memory`` bytes (default :func:`machine_memory`): at least
    :data:`BYTES_PER_PARAMETER` per weight and :data:`BYTES_PER_BLOCK` per block
    (:func:`~nijimi.models.size.model_size`). Call it before building the model."""
    size = model_size(config)
    need = size.parameters * BYTES_PER_PARAMETER + size.blocks * BYTES_PER_BLOCK
    memory = machine_memory() if memory is None else memory
    if need <= memory:
        return
    largest = ", ".join(f"{name}={value}" for value, name in sorted(_largest_fields(config), reverse=True)[:3])
    raise error(f"{source}: the config asks for a network of about {size.parameters:.3g} parameters in "
                f"{size.blocks} blocks ({largest}), needing at least {need / 2**30:.3g} GiB; this machine has "
                f"{memory / 2**30:.3g} GiB")


def _depth(text: str) -> int:
    """Deepest bracket nesting of JSON ``text`` outside strings, in one linear scan that stops as soon as it passes
    the limit or meets an unterminated string (invalid JSON, left for ``json.loads`` to report)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return 0  # too few brackets to nest too deep (every config file)
    depth = deepest = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token == '"':
            break
        if token[0] != '"':
            depth += 1 if token in "[{" else -1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                break
    return deepest


def parse_json(text: str | bytes, source: str, error: type[NijimiError] = CheckpointError) -> object:
    """``json.loads(text)`` once ``text`` is known to be at most :data:`MAX_JSON_BYTES` long and at most
    :data:`MAX_JSON_DEPTH` deep; too big, too deep, not UTF-8 or not JSON raises ``error`` naming ``source``."""
    if len(text) > MAX_JSON_BYTES:
        raise error(f"{source}: JSON of {len(text)} bytes is over the limit of {MAX_JSON_BYTES}")
    try:
        text = text.decode("utf-8") if isinstance(text, bytes) else text
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if _depth(text) > MAX_JSON_DEPTH:
        raise error(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as e:
        raise error(f"{source}: not valid JSON: {e}") from None


def read_json(path: str | os.PathLike, error: type[NijimiError] = CheckpointError,
              missing: str = "no such file") -> object:
    """The JSON file at ``path`` (a regular file, :func:`~nijimi.io.files.regular_file`; its size checked before it
    is read), parsed by :func:`parse_json`; every problem raises ``error`` naming the file."""
    path = regular_file(path, "JSON file", error, missing)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: JSON of {size} bytes is over the limit of {MAX_JSON_BYTES}")
        return parse_json(path.read_bytes(), str(path), error)
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
