"""Generation metadata in PNG text chunks: AUTOMATIC1111's ``parameters``, nijimi's recipe, ComfyUI's graphs.

``parameters`` is A1111's infotext, so A1111 ("PNG Info"), civitai and other readers show nijimi images' settings::

    a cat, (masterpiece:1.2)
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x512, Model: sd15

Values holding ``,``, ``:`` or a newline are written as JSON strings, as A1111 quotes them. Reading follows A1111's
``parse_generation_parameters``: the last line is the settings line only if it holds at least three ``Key: value``
pairs; the lines before it are the prompt until one starts with ``Negative prompt:``; prompts may span lines. The
reader takes time linear in the text (no backtracking) and refuses texts over ``MAX_INFOTEXT``.

``nijimi`` holds the full recipe as JSON (every knob the pipeline used). ComfyUI writes its API graph as ``prompt``
and its editor graph as ``workflow``, both JSON. Only Pillow is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from PIL import Image, PngImagePlugin

from nijimi.errors import CheckpointError, ImageError, NijimiError
from nijimi.io.files import atomic_write, regular_file
from nijimi.io.limits import parse_json

PARAMETERS_KEY = "parameters"
RECIPE_KEY = "nijimi"
COMFYUI_KEYS = ("prompt", "workflow")
HASH_BLOCK = 1 << 20
"""Bytes read at a time by ``model_hash``."""
_HASH_CACHE = "model_hashes.json"

MAX_INFOTEXT = 1 << 22
"""Longest infotext ``parse_parameters`` reads, in characters (A1111's own are a few thousand)."""

_PAIR = re.compile(r'(?<![\w \-/])[ \-/]*+(\w[\w \-/]++):\s*+("(?:\\.|[^\\"])++"(?=,|$)|[^,]*+)(?:,|$)')
"""A settings line's ``Key: value`` pairs, the ones A1111's pattern finds, in linear time: a key (a word character,
then word characters, spaces, ``-`` or ``/``) is tried only where a run of such characters starts, and possessively
(A1111's pattern retries a run without ``:`` from each of its characters, quadratic in the run's length)."""
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"
_INT_KEYS = ("Steps", "Seed", "Clip skip", "Variation seed", "ENSD", "Hires steps")
_FLOAT_KEYS = ("CFG scale", "Denoising strength", "Variation seed strength", "Eta", "Hires upscale")


# ---- A1111 infotext --------------------------------------------------------------------------------------------------


def _format_value(value: object) -> str:
    """A value as A1111 writes it: whole floats without ``.0``, JSON-quoted when it holds ``,`` ``:`` or a newline."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, tuple) and len(value) == 2:
        value = f"{value[0]}x{value[1]}"
    text = str(value)
    if any(c in text for c in ",:\n"):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_parameters(prompt: str, negative_prompt: str, settings: Mapping[str, object]) -> str:
    """A1111's infotext: prompt, ``Negative prompt:`` line, then ``Key: value, ...``.

    The ``Negative prompt:`` line is written even when empty (A1111 leaves it out then, but ComfyUI's A1111 importer
    reads nothing without it), and an empty prompt leaves the text's first line empty (the importer looks for
    ``"\\nNegative prompt:"``). ``settings`` keeps its order; ``None`` values are left out; a ``(w, h)`` tuple is
    written ``WxH``. A key whose value equals the key itself is written alone, as A1111 does.
    """
    pairs = [k if k == v else f"{k}: {_format_value(v)}" for k, v in settings.items() if v is not None]
    return f"{prompt}\n{_NEGATIVE} {negative_prompt}\n{', '.join(pairs)}".rstrip()


def generation_settings(*, steps: int, sampler: str, cfg_scale: float, seed: int, size: tuple[int, int],
                        extra: Mapping[str, object] | None = None, schedule: str | None = None) -> dict[str, object]:
    """The settings line in A1111's order: Steps, Sampler, Schedule type, CFG scale, Seed, Size (width, height),
    then ``extra`` in its order (A1111 writes ``Model hash`` and ``Model`` first).

    ``sampler`` is A1111's name ("DPM++ 2M", "Euler a"), ``schedule`` A1111's label of the schedule ("Karras";
    None: left out, as before A1111 1.9); ``extra`` adds e.g. ``{"Model hash": "…", "Clip skip": 2}``.
    """
    settings: dict[str, object] = {"Steps": steps, "Sampler": sampler, "Schedule type": schedule,
                                   "CFG scale": cfg_scale, "Seed": seed, "Size": tuple(size)}
    settings.update(extra or {})
    return settings


def _typed(key: str, value: str) -> object:
    size = _SIZE.match(value)
    try:
        if size:
            return int(size.group(1)), int(size.group(2))
        if key in _INT_KEYS:
            return int(value)
        if key in _FLOAT_KEYS:
            return float(value)
    except ValueError:
        return value
    return value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def parse_parameters(text: str) -> dict[str, object]:
    """Read an A1111 infotext into ``{"prompt", "negative_prompt", "settings"}`` by A1111's own rules.

    ``settings`` maps each key to its value: ``WxH`` values become ``(w, h)``; Steps, Seed, Clip skip and other
    counts ``int``; CFG scale, Denoising strength and other factors ``float``; everything else ``str``. Texts longer
    than ``MAX_INFOTEXT`` characters raise ``ImageError``.
    """
    if len(text) > MAX_INFOTEXT:
        raise ImageError(f"infotext of {len(text)} characters is longer than the {MAX_INFOTEXT} nijimi reads")
    *lines, last = text.strip().split("\n")
    pairs = _PAIR.findall(last)
    if len(pairs) < 3:
        lines.append(last)
        pairs = []
    parts: tuple[list[str], list[str]] = ([], [])  # prompt lines, negative prompt lines
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE) :].strip()
        parts[in_negative].append(line)
    prompt, negative = ("\n".join(part).lstrip("\n") for part in parts)  # A1111 drops leading empty lines
    return {"prompt": prompt, "negative_prompt": negative,
            "settings": {key: _typed(key, _unquote(value)) for key, value in pairs if value}}


def format_name_hashes(hashes: Mapping[str, str]) -> str:
    """A1111's list of names and short hashes (``TI hashes``): ``"name: 0123456789, other: 9876543210"``, with ``:``
    and ``,`` taken out of names as A1111 does."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in hashes.items())


def parse_name_hashes(text: str) -> dict[str, str]:
    """Names and hashes of :func:`format_name_hashes`' text, ``TI hashes`` and ``Lora hashes`` (A1111's reading:
    split at ``,``, then at the last ``:``; pieces without a name or a hash are skipped)."""
    pairs = (item.rpartition(":") for item in text.split(","))
    return {name.strip(): digest.strip() for name, _, digest in pairs if name.strip() and digest.strip()}


# ---- PNG files -------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The user's cache folder: ``$NIJIMI_CACHE_DIR``, else ``$XDG_CACHE_HOME/nijimi``, else ``~/.cache/nijimi``."""
    if os.environ.get("NIJIMI_CACHE_DIR"):
        return Path(os.environ["NIJIMI_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nijimi"


def cached_digest(path: str | os.PathLike, cache_name: str, digest: Callable[[BinaryIO], str]) -> str:
    """``digest(file)``, a SHA-256 hex digest of the file at ``path`` (or of a part of it), cached per (absolute
    path, size, mtime) in ``cache_name`` (a JSON file of :func:`cache_dir`), written atomically (files that are gone
    are dropped from it), so a file is read once until it changes; a cache that cannot be read or written is
    ignored. An unreadable file raises CheckpointError."""
    path = Path(path).absolute()
    cache_file = cache_dir() / cache_name
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}  # no cache yet, or a corrupt one: start afresh
    cache = cache if isinstance(cache, dict) else {}
    try:
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = cache.get(str(path))
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp and isinstance(entry[2], str) \
                and len(entry[2]) == 64:
            return entry[2]
        with open(regular_file(path, "model file"), "rb") as f:
            value = digest(f)
    except OSError as e:
        raise CheckpointError(f"cannot hash file {os.fspath(path)!r}: {e.strerror or e}") from e
    cache = {p: entry for p, entry in cache.items() if os.path.exists(p)}  # forget files that are gone
    cache[str(path)] = [*stamp, value]
    with contextlib.suppress(OSError, NijimiError):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache_file, "w") as out:
            json.dump(cache, out, indent=0, sort_keys=True)
    return value


def sha256_rest(f: BinaryIO) -> str:
    """The SHA-256 (hex) of an open file's bytes from its position to its end, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    while block := f.read(HASH_BLOCK):
        digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of the whole file (64 hex digits), read in 1 MiB blocks and cached (:func:`cached_digest`)."""
    return cached_digest(path, _HASH_CACHE, sha256_rest)


def model_hash(path: str | os.PathLike) -> str:
    """A1111's model hash: the first 10 hex digits of the file's SHA-256 (:func:`file_sha256`, cached)."""
    return file_sha256(path)[:10]


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str,
             recipe: Mapping[str, object] | None = None, overwrite: bool = False) -> None:
    """Write ``image`` as a PNG with A1111 ``parameters`` and the JSON ``recipe`` (key ``nijimi``), atomically.

    The file appears complete or not at all (temp file in the same folder, then link or rename). An existing ``path``
    is replaced only if ``overwrite``, else ``OutputExistsError``, also when another process creates it meanwhile
    (``atomic_write``). Recipe values JSON cannot hold (a dtype, a path) are written as their ``str``.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    if recipe is not None:
        info.add_text(RECIPE_KEY, json.dumps(dict(recipe), ensure_ascii=False, default=str))
    try:
        with atomic_write(path, "wb", overwrite) as f:
            image.save(f, format="PNG", pnginfo=info)
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot write PNG {os.fspath(path)!r} from a {image.mode} image: {e}") from e


def _json_or_text(text: str | None) -> object:
    """A text chunk's JSON (bounded in size and depth, :func:`~nijimi.io.limits.parse_json`), else the text."""
    if text is None:
        return None
    try:
        return parse_json(text, "PNG text")
    except NijimiError:
        return text


def metadata_from_text(text: Mapping[str, str]) -> dict[str, object]:
    """Generation metadata of an image's text entries (``parameters``, ``nijimi``, ``prompt``, ``workflow``, …),
    wherever they were stored (:func:`nijimi.io.imagemeta.read_image_metadata` reads them from a file).

    Returns ``{"parameters": raw A1111 text or None, "prompt", "negative_prompt", "settings"`` (see
    ``parse_parameters``; empty when there is no ``parameters`` chunk)``, "recipe": nijimi recipe dict or None,
    "comfyui_prompt", "comfyui_workflow": ComfyUI's JSON graphs or None, "text": every text entry}``.
    """
    text = dict(text)
    raw = text.get(PARAMETERS_KEY)
    parsed = parse_parameters(raw) if raw is not None else {"prompt": "", "negative_prompt": "", "settings": {}}
    recipe = _json_or_text(text.get(RECIPE_KEY))
    return {
        "parameters": raw,
        **parsed,
        "recipe": recipe,
        "comfyui_prompt": _json_or_text(text.get("prompt")),
        "comfyui_workflow": _json_or_text(text.get("workflow")),
        "text": text,
    }


def _graph_summary(name: str, graph: object) -> str:
    if isinstance(graph, dict):
        nodes = graph.get("nodes") if isinstance(graph.get("nodes"), list) else graph
        return f"ComfyUI {name}: {len(nodes)} nodes"
    return f"ComfyUI {name}: {str(graph)[:200]}"


def format_info(meta: Mapping[str, object]) -> str:
    """Human-readable text of :func:`metadata_from_text`'s result, for ``nijimi info IMG.png``."""
    lines = []
    if meta.get("parameters") is not None:
        lines.append(f"Prompt: {meta['prompt']}")
        if meta.get("negative_prompt"):
            lines.append(f"Negative prompt: {meta['negative_prompt']}")
        for key, value in dict(meta.get("settings") or {}).items():
            shown = f"{value[0]}x{value[1]}" if isinstance(value, tuple) else value
            lines.append(f"{key}: {shown}")
    recipe = meta.get("recipe")
    if isinstance(recipe, dict):
        lines.append("nijimi recipe:")
        lines += [f"  {key}: {json.dumps(value, ensure_ascii=False)}" for key, value in recipe.items()]
    elif recipe is not None:
        lines.append(f"nijimi recipe (unreadable JSON): {str(recipe)[:200]}")
    for name in COMFYUI_KEYS:
        graph = meta.get(f"comfyui_{name}")
        if graph is not None:
            lines.append(_graph_summary(name, graph))
    return "\n".join(lines) if lines else "no generation metadata"
