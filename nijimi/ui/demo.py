"""``nijimi demo`` (what ``make demo`` runs): the embedded model draws a prompt and a 4×4 grid of others."""

from __future__ import annotations

from pathlib import Path

from nijimi.pipelines.pipeline import load
from nijimi.pipelines.request import GenerationRequest
from nijimi.train.report import write_grid
from nijimi.ui.generate import run_generation

DEMO_PROMPT = "a red circle on the left and a blue square on the right"
GRID_PROMPTS = (
    "a large red circle in the center", "a small blue star at the top", "a green square on the left",
    "a yellow triangle on the right", "a purple star at the bottom", "an orange circle at the top",
    "a large blue triangle in the center", "a small red square on the right",
    "a green star on the left and a yellow circle on the right", "a purple square above an orange triangle",
    "a blue circle below a red star", "a yellow square on the left and a green triangle on the right",
    "a small orange star in the center", "a large purple circle on the left", "a red triangle at the top",
    "a blue square at the bottom",
)


def run_demo(out: str | Path, seed: int = 0) -> list[Path]:
    """Write ``demo.png`` (with its generation metadata) and ``grid.png`` to ``out``; returns both paths."""
    out = Path(out)
    pipe = load()
    first = run_generation(pipe, GenerationRequest(DEMO_PROMPT, seed=seed), str(out / "demo.png"), overwrite=True,
                           quiet=True)
    images = [pipe.generate(p, seed=seed + i, steps=20).images[0] for i, p in enumerate(GRID_PROMPTS)]
    return [*first, write_grid(images, out / "grid.png", cols=4)]
