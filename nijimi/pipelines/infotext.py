"""What nijimi's A1111 infotext says of a request's LoRAs, as A1111 writes it, so A1111 and ComfyUI apply them too.

A1111 applies a LoRA only from a ``<lora:NAME:TE[:UNET]>`` tag in the prompt and records ``Lora hashes: "NAME: HASH,
…"`` (``extensions-builtin/Lora/extra_networks_lora.py``: the name as the tag wrote it, ``:`` and ``,`` removed, and
12 hex digits of the file's hash, :func:`~nijimi.io.find.lora_hash`). So the infotext's prompt is the request's
prompt with a tag appended for each ``--lora`` (named by the file's stem), and ``Lora hashes`` covers those and the
prompt's own tags. ComfyUI's A1111 importer makes a LoraLoader of each tag.
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
