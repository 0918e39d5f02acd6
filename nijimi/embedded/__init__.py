"""The embedded default model: a tiny text-to-image LDM trained by nijimi on its shapes world (see MODEL_CARD.md)."""

from __future__ import annotations

from pathlib import Path

from nijimi.errors import CheckpointError

WEIGHTS = Path(__file__).with_name("model.safetensors")


def embedded_path() -> Path:
    """Path of the shipped weights; a clear error when this build of nijimi does not carry them yet."""
    if not WEIGHTS.is_file():
        raise CheckpointError(f"{WEIGHTS}: the embedded model is not trained yet; `make train-embedded` builds it")
    return WEIGHTS
