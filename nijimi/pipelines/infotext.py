"""What nijimi's A1111 infotext says of a request's LoRAs and ControlNets, as A1111 writes it, so A1111 and ComfyUI
apply them too.

A1111 applies a LoRA only from a ``<lora:NAME:TE[:UNET]>`` tag in the prompt and records ``Lora hashes: "NAME: HASH,
…"`` (``extensions-builtin/Lora/extra_networks_lora.py``: the name as the tag wrote it, ``:`` and ``,`` removed, and
12 hex digits of the file's hash, :func:`~nijimi.io.find.lora_hash`). So the infotext's prompt is the request's
prompt with a tag appended for each ``--lora`` (named by the file's stem), and ``Lora hashes`` covers those and the
prompt's own tags. ComfyUI's A1111 importer makes a LoraLoader of each tag.

ControlNet units are the sd-webui-controlnet extension's: ``ControlNet 0: "Module: canny, Model: NAME [HASH],
Weight: 1, …"`` (its ``scripts/infotext.py``), with its names for nijimi's preprocessors (:data:`CONTROL_MODULES`),
resize modes (:data:`CONTROL_RESIZE_MODES`) and control modes (:data:`CONTROL_MODES`); the HTTP API takes the same
names, and :func:`control_unit_settings` reads a unit back.
"""

from __future__ import annotations

from nijimi.adapters.tags import parse_lora_tags, resolve_lora
from nijimi.embedded import ADAPTERS
from nijimi.io.find import lora_hash
from nijimi.pipelines.adapters import LoraRequest
from nijimi.pipelines.request import GenerationRequest

_SYMBOLS = str.maketrans("", "", ":,")


def _tag(request: LoraRequest) -> str:
    te, unet = request.te_multiplier, request.unet_multiplier
    weights = f"{te:.15g}" if te == unet else f"{te:.15g}:{unet:.15g}"
    return f"<lora:{request.path.stem}:{weights}>"


def lora_infotext(request: GenerationRequest) -> tuple[str, dict[str, str | None]]:
    """The infotext's prompt (the request's, with a tag for each of ``request.loras``) and its ``Lora hashes``
    setting (None without LoRAs)."""
    _, tags = parse_lora_tags(request.prompt)
    folder = ADAPTERS if request.lora_dir is None else request.lora_dir
    named = [(t.name, resolve_lora(t.name, folder)) for t in tags]  # as apply_loras finds them
    named += [(r.path.stem, r.path) for r in request.loras]
    prompt = " ".join([request.prompt, *map(_tag, request.loras)]) if request.loras else request.prompt
    hashes = {name.translate(_SYMBOLS): lora_hash(path)[:12] for name, path in named}
    return prompt, {"Lora hashes": ", ".join(f"{n}: {h}" for n, h in hashes.items()) or None}


CONTROL_MODULES = {"none": "map", "canny": "canny", "invert": "invert"}
"""The extension's preprocessor ("module") name → nijimi's (``--control pre=…``)."""
CONTROL_MODULE_ALIASES = {"invert (from white bg & black line)": "invert"}
"""The extension's other names of its modules (its ``preprocessor_aliases``)."""
CONTROL_RESIZE_MODES = {"Just Resize": "resize", "Crop and Resize": "crop", "Resize and Fill": "fill"}
"""The extension's resize modes (in its numbering 0, 1, 2) → nijimi's (``--control resize=…``)."""
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
"""The extension's control modes (numbered 0, 1, 2). nijimi has Balanced and, as guess mode, "ControlNet is more
important" (residuals on the conditional half only, scaled up from the shallowest skip to the middle block)."""


def control_unit_settings(text: str) -> dict[str, str]:
    """A ``ControlNet N`` infotext value, ``"Module: canny, Model: x [hash], Weight: 1, …"``, as its settings
    (``{"Module": "canny", …}``); a part without ``: `` is left out."""
    pairs = (part.strip().split(": ", 1) for part in text.split(","))
    return {pair[0]: pair[1].strip() for pair in pairs if len(pair) == 2}


def control_spec_text(settings: dict[str, str]) -> str | None:
    """The ``--control`` flag of a unit's infotext settings (:func:`control_unit_settings`): the model by its name
    (``FILE`` when none is written; give its path), ``IMAGE`` for the picture the infotext cannot hold, and the
    settings that differ from the flag's defaults; None for a preprocessor nijimi does not have."""
    name = settings.get("Module", "none").strip().lower()
    pre = CONTROL_MODULES.get(CONTROL_MODULE_ALIASES.get(name, name))
    if pre is None:
        return None
    resize = {**CONTROL_RESIZE_MODES, "None": "none"}.get(settings.get("Resize Mode", "Crop and Resize"), "crop")
    keys = {"pre": pre, "scale": settings.get("Weight", "1"), "start": settings.get("Guidance Start", "0"),
            "end": settings.get("Guidance End", "1"), "resize": resize,
            "guess": "true" if settings.get("Control Mode") == CONTROL_MODES[2] else "false"}
    if pre == "canny":
        keys |= {"low": settings.get("Threshold A", "-1"), "high": settings.get("Threshold B", "-1")}
    defaults = {"pre": "map", "scale": "1", "start": "0", "end": "1", "resize": "resize", "guess": "false",
                "low": "-1", "high": "-1"}
    shown = [f"{k}={_plain(v)}" for k, v in keys.items() if _plain(v) != defaults[k]]
    model = settings.get("Model", "FILE").rsplit(" [", 1)[0].strip() or "FILE"
    return ",".join([f"model={model}", "image=IMAGE", *shown])


def _plain(value: str) -> str:
    """A number as ``%g`` writes it (``1.0`` → ``1``), other text as it is."""
    try:
        return f"{float(value):g}"
    except ValueError:
        return value
