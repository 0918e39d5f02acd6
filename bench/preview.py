"""Benchmark: what a preview costs next to a sampling step of the embedded model (``--preview`` runs one per step).

One generation per preview kind, previewing x̂₀ in the step callback: the preview's time is measured around the call,
the step's as the time between callbacks minus the preview. Kinds: the fitted linear latent → RGB map (alone and
with writing the PNG), random-weight tiny decoders of the embedded model's factor 4 (TAESD's 64 channels and the
narrow ``TAESDConfig.tiny``), and the VAE itself for scale.

    python bench/preview.py [--steps 20] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from nijimi.models.taesd import TAESD, TAESDConfig
from nijimi.pipelines.pipeline import Pipeline, load
from nijimi.pipelines.preview import save_preview

PROMPT = "a green square on the left and a yellow star on the right"


def tiny_decoder(folder: Path, cfg: TAESDConfig) -> str:
    """A random TAESD decoder of ``cfg`` saved in ``folder``; its ``--decoder`` value."""
    path = folder / f"taesd-{cfg.channels}.safetensors"
    save_file(TAESD(cfg, encoder=False).decoder.state_dict(), path)
    return f"tiny:{path}"


def timed_steps(pipe: Pipeline, steps: int, preview) -> tuple[float, float]:
    """Median seconds of a step (without the preview) and of ``preview(x̂₀)``, over one generation."""
    stamps, costs = [time.perf_counter()], []

    def callback(info) -> None:
        start = time.perf_counter()
        preview(info.denoised)
        costs.append(time.perf_counter() - start)
        stamps.append(time.perf_counter())

    pipe.generate(PROMPT, steps=steps, seed=0, callback=callback)
    intervals = [b - a - cost for a, b, cost in zip(stamps[:-1], stamps[1:], costs, strict=True)]
    return statistics.median(intervals[1:]), statistics.median(costs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load("embedded")
    with tempfile.TemporaryDirectory() as tmp:
        tiny64 = tiny_decoder(Path(tmp), TAESDConfig(blocks=(1, 3, 3)))
        tiny32 = tiny_decoder(Path(tmp), TAESDConfig.tiny())
        kinds = {
            "rgb map": lambda x: pipe.preview(x),
            "rgb map + PNG": lambda x: save_preview(pipe.preview(x), Path(tmp) / "preview.png"),
            "tiny 64ch": lambda x: pipe.preview(x, tiny64),
            "tiny 32ch": lambda x: pipe.preview(x, tiny32),
            "vae": lambda x: pipe.preview(x, "vae"),
        }
        for preview in kinds.values():
            preview(torch.zeros(1, 4, 16, 16))  # fit the map, load the decoders, warm up
        results = {name: timed_steps(pipe, args.steps, preview) for name, preview in kinds.items()}
    print(f"embedded model, 64×64, {args.steps} steps, guidance {pipe.model.config.guidance:g} (batch 2 per U-Net "
          f"call), {args.threads} threads")
    print(f"{'preview':<15} {'step ms':>8} {'preview ms':>11} {'of a step':>10}")
    for name, (step, cost) in results.items():
        print(f"{name:<15} {step * 1e3:>8.2f} {cost * 1e3:>11.3f} {cost / step:>10.1%}")
    ratios = ", ".join(f"{name} {cost / step:.3f}" for name, (step, cost) in results.items())
    print(f"summary: preview / step time ratio: {ratios} (medians over one generation each)")


if __name__ == "__main__":
    main()
