"""Fixtures of the bad-input suite: a tiny random model and a LoRA for it, made once per session outside the
folder each case checks, and the case's own folder as the working directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TOY_F8, random_model
from PIL import Image

from nijimi.adapters.formats import save_adapter
from nijimi.adapters.inject import get_adapter, inject
from nijimi.adapters.targets import AdapterSpec
from nijimi.io.checkpoint import save_single
from nijimi.io.pngmeta import save_png


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> dict[str, Path]:
    """``model``: a TOY_F8 single file (64×64 images); ``lora``: a kohya LoRA for it; ``png``: a PNG with an
    infotext."""
    folder = tmp_path_factory.mktemp("bad-input-shared")
    model = random_model(TOY_F8, 0)
    save_single(model, folder / "tiny.safetensors")
    inject(model, AdapterSpec(rank=2, alpha=1.0), "x", torch.Generator().manual_seed(0))
    save_adapter(get_adapter(model, "x"), folder / "ink.safetensors", model.config, "kohya")
    save_png(Image.new("RGB", (64, 64), "red"), folder / "made.png", "a cube\nSteps: 2, Seed: 1, Size: 64x64")
    return {"model": folder / "tiny.safetensors", "lora": folder / "ink.safetensors", "png": folder / "made.png"}


@pytest.fixture
def case_dir(tmp_path, monkeypatch) -> Path:
    """The case's folder, also the working directory (so a default output like ``out/`` would land in it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
