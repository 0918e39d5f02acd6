"""The embedded default model: a tiny text-to-image LDM trained by nijimi on its shapes world (see MODEL_CARD.md)."""

from __future__ import annotations

from pathlib import Path

from nijimi.errors import CheckpointError

EMBEDDED = "embedded"
"""The name that stands for the embedded model wherever a model file or folder is asked for."""
WEIGHTS = Path(__file__).with_name("model.safetensors")
ADAPTERS = Path(__file__).with_name("adapters")
"""The demo adapters trained on the embedded model: the default folder for ``--lora NAME`` and ``<lora:NAME:W>``."""
CONTROLNET = Path(__file__).with_name("controlnet-mask.safetensors")
"""The demo ControlNet of the embedded model (object silhouettes): ``--control model=embedded,…``."""
CONTROLNET_NAME = "embedded-controlnet-mask"
"""The name the demo ControlNet goes by in A1111's terms (``nijimi serve``'s ControlNet list, the infotext)."""


def embedded_path() -> Path:
    """Path of the shipped weights; a clear error when this build of nijimi does not carry them yet."""
    if not WEIGHTS.is_file():
        raise CheckpointError(f"{WEIGHTS}: the embedded model is not trained yet; `make train-embedded` builds it")
    return WEIGHTS
