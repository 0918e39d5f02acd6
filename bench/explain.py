"""Benchmark: what DAAM's attention maps (``nijimi explain attention``, arXiv:2210.04885) add to a generation.

1. The embedded model: ``pipe.generate`` against :func:`nijimi.explain.attention.word_maps` (the same generation with
   every cross-attention probability of the conditional pass recorded, then upsampled to word maps), same request,
   and the time spent inside the probes of one recorded generation.
2. One guided step (2 rows: unconditional and conditional) of the SD1.5-size U-Net with random weights at
   ``--sd-size`` pixels: the plain U-Net call against the call with the recorder attached, the time spent inside
   its probes, and the recorder's one-off ``maps()`` (upsampling to the image) at that size.

Plain and recorded calls alternate, so both see the same machine load; median of ``--repeats`` each after one
warm-up. The probes' own time is what collection adds, measured inside the recorded calls: steadier than the
difference of two timings on a busy machine. The issue's bound: maps add ≤ 25 % to a generation's time.

    python bench/explain.py [--steps 20] [--repeats 5] [--sd-size 256] [--no-sd] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

from nijimi.explain.attention import word_maps
from nijimi.explain.daam import AttentionRecorder
from nijimi.models.unet import UNetConfig, UNetModel
from nijimi.pipelines.pipeline import load
from nijimi.pipelines.request import GenerationRequest

PROMPT = "a red circle on the left and a blue square on the right"


class TimedRecorder(AttentionRecorder):
    """An :class:`AttentionRecorder` that adds up the seconds its probes take."""

    seconds = 0.0
    probed = 0

    def _probe(self, q: torch.Tensor, k: torch.Tensor) -> None:
        start = time.perf_counter()
        super()._probe(q, k)
        if q.device.type == "cuda":
            torch.cuda.synchronize(q.device)
        self.seconds += time.perf_counter() - start
        self.probed += 1


def seconds(call: Callable[[], object], device: torch.device) -> float:
    """Wall time of one ``call`` (synchronising a GPU)."""
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def alternating_medians(plain: Callable[[], object], recorded: Callable[[], object], repeats: int,
                        device: torch.device) -> tuple[float, float]:
    """Median seconds of ``plain`` and of ``recorded``, run in turn ``repeats`` times after one warm-up each."""
    pairs = [(seconds(plain, device), seconds(recorded, device)) for _ in range(repeats + 1)][1:]
    return statistics.median(p for p, _ in pairs), statistics.median(r for _, r in pairs)


def embedded_rows(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    pipe = load("embedded", device=args.device)
    request = GenerationRequest(PROMPT, seed=0, steps=args.steps)
    plain, recorded = alternating_medians(lambda: pipe.generate(request), lambda: word_maps(pipe, request),
                                          args.repeats, torch.device(args.device))
    timed = TimedRecorder(pipe.model.unet)
    with timed.attached(pipe):
        pipe.generate(request)
    return [(f"embedded, 64², {args.steps} steps", plain, recorded),
            ("  + its probes' own time", plain, plain + timed.seconds)]


def sd_rows(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig.sd15()).eval().requires_grad_(False).to(device)
    side = args.sd_size // 8
    x = torch.randn(2, 4, side, side, device=device)
    t = torch.full((2,), 500.0, device=device)
    context = torch.randn(2, 77, 768, device=device)
    is_cond = torch.tensor([False, True], device=device)
    recorder, pipe = TimedRecorder(unet), SimpleNamespace(probe_layer=None)

    def plain() -> torch.Tensor:
        return unet(x, t, context)

    def recorded() -> torch.Tensor:
        with recorder.attached(pipe):
            return pipe.probe_layer(lambda x, t, context, **kw: unet(x, t, context))(x, t, context, step=0,
                                                                                     is_cond=is_cond)

    with torch.inference_mode():
        step_plain, step_recorded = alternating_medians(plain, recorded, args.repeats, device)
        start = time.perf_counter()
        recorder.maps((args.sd_size, args.sd_size))
        finish = time.perf_counter() - start
    probes = recorder.seconds * len(recorder.layers) / recorder.probed  # per recorded call
    label = f"SD1.5 U-Net, {args.sd_size}², 1 guided step"
    return [(label, step_plain, step_recorded), ("  + its probes' own time", step_plain, step_plain + probes),
            (f"  + maps() once per image, {args.sd_size}²", step_plain, step_plain + finish)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sd-size", type=int, default=256, help="image side of the SD1.5 step (default 256)")
    parser.add_argument("--no-sd", action="store_true", help="skip the SD1.5-size U-Net")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = embedded_rows(args) + ([] if args.no_sd else sd_rows(args))
    print(f"DAAM attention maps, fp32, {args.device}, {args.threads} threads, median of {args.repeats}")
    print(f"{'run':<40} {'plain ms':>10} {'with maps ms':>13} {'ratio':>7}")
    for name, plain, recorded in rows:
        print(f"{name:<40} {plain * 1e3:>10.1f} {recorded * 1e3:>13.1f} {recorded / plain:>7.3f}")
    print(f"with maps / plain generation = {rows[0][2] / rows[0][1]:.3f} (embedded model; the issue allows 1.25)")


if __name__ == "__main__":
    main()
