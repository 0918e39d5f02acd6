"""Benchmark: nijimi U-Net vs diffusers UNet2DConditionModel, SD1.5 size, same random weights, same process.

Both models share one set of weight tensors (moved over by nijimi's key table). After a warm-up, the two forwards are
timed alternately (the order flips every round, so both see the same machine load) and the medians compared. For
context, the machine's fp32 GEMM rate is measured in the same rounds and the U-Net's FLOPs counted, giving the
fraction of that roof each implementation reaches. Process CPU time is shown too (less sensitive to other load).

    python bench/unet.py [--batch 2] [--size 32] [--runs 7] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from nijimi.io.keys.unet import unet_config_to_diffusers, unet_key_table
from nijimi.models.unet import UNetConfig, UNetModel


def gemm_call(n: int = 2048, k: int = 1280, m: int = 1280, repeats: int = 5) -> tuple[callable, int]:
    """A call doing ``repeats`` fp32 (n×k)·(k×m) matmuls (a typical U-Net GEMM shape) and its FLOP count.

    Timed in the same interleaved rounds as the models, it gives the machine's GEMM rate under the same load.
    """
    a, b = torch.randn(n, k), torch.randn(k, m)

    def call() -> None:
        for _ in range(repeats):
            a @ b

    return call, 2 * n * k * m * repeats


def unet_flops(cfg: UNetConfig, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> int:
    """FLOPs of one nijimi forward (matmuls, convolutions, attention), counted on the meta device."""
    with torch.device("meta"):
        model = UNetModel(cfg)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x.to("meta"), t.to("meta"), context.to("meta"))
    return counter.get_total_flops()


def build_models(cfg: UNetConfig, seed: int = 0) -> tuple[UNetModel, UNet2DConditionModel]:
    """A nijimi U-Net with seeded random weights and a diffusers U-Net sharing the very same tensors."""
    torch.manual_seed(seed)
    ours = UNetModel(cfg).eval()
    theirs = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)).eval()
    theirs.load_state_dict(unet_key_table(cfg).to_foreign(ours.state_dict()), strict=True, assign=True)
    return ours, theirs


def time_interleaved(calls: dict[str, callable], runs: int) -> dict[str, tuple[list[float], list[float]]]:
    """Warm each call up once, then ``runs`` rounds of all calls, flipping their order every round.

    Returns per call (wall-clock seconds, process CPU seconds) of each round.
    """
    names = list(calls)
    for name in names:
        calls[name]()
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    for round_ in range(runs):
        for name in names if round_ % 2 == 0 else reversed(names):
            wall, cpu = time.perf_counter(), time.process_time()
            calls[name]()
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.process_time() - cpu)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="latent side (32 = 256×256 pixels)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = UNetConfig.sd15()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, cfg.in_channels, args.size, args.size, generator=gen)
    context = torch.randn(args.batch, 77, cfg.context_dim, generator=gen)
    t = torch.full((args.batch,), 500.0)
    ours, theirs = build_models(cfg)
    gemm, gemm_flops = gemm_call()
    with torch.inference_mode():
        error = (ours(x, t, context) - theirs(x, t, encoder_hidden_states=context).sample).abs().max().item()
        times = time_interleaved({
            "nijimi": lambda: ours(x, t, context),
            "diffusers": lambda: theirs(x, t, encoder_hidden_states=context),
            "gemm": gemm,
        }, args.runs)
    flops = unet_flops(cfg, x, t, context)
    median = {name: statistics.median(wall) for name, (wall, _) in times.items()}
    roof = gemm_flops / median.pop("gemm") / 1e9
    print(f"SD1.5 U-Net fp32, batch {args.batch}, latent {args.size}×{args.size}, {args.threads} threads, "
          f"{flops / 1e9:.1f} GFLOP/forward, GEMM roof {roof:.1f} GFLOP/s (same rounds), max |Δ| {error:.2e}")
    print(f"{'model':<10} {'median s':>9} {'min s':>8} {'max s':>8} {'CPU s':>8} {'GFLOP/s':>8} {'of roof':>8}")
    for name in ("nijimi", "diffusers"):
        wall, cpu = times[name]
        rate = flops / median[name] / 1e9
        print(f"{name:<10} {median[name]:>9.3f} {min(wall):>8.3f} {max(wall):>8.3f} {statistics.median(cpu):>8.3f} "
              f"{rate:>8.1f} {rate / roof:>8.0%}")
    print(f"summary: nijimi/diffusers U-Net time ratio {median['nijimi'] / median['diffusers']:.3f} "
          f"(median wall time of {args.runs} interleaved runs; < 1 means nijimi is faster)")


if __name__ == "__main__":
    main()
