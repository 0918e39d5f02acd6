"""Benchmark: a DeepCache cached step (arXiv:2312.00858) against a full step of the SD1.5-size U-Net.

Random weights of ``UNetConfig.sd15()``, fp32, one batch of latents (2 rows: a guided batch of one image); the full
step is the plain U-Net call, a cached step ``unet(..., cache=FeatureCache(depth))`` with the cache filled by one
full call first (``--deepcache`` uses depth 1). Median of ``--repeats`` timed calls after one warm-up each.

    python bench/deepcache.py [--size 32] [--batch 2] [--depths 1,3] [--repeats 3] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from nijimi.models.unet import FeatureCache, UNetConfig, UNetModel


def median_seconds(call: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> float:
    """Median wall time of ``call`` over ``repeats`` runs, after one warm-up (synchronising a GPU)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="latent side (64 = 512-pixel images)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--depths", default="1,3", help="cache depths to time, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig.sd15()).eval().requires_grad_(False).to(device)
    x = torch.randn(args.batch, 4, args.size, args.size, device=device)
    t = torch.full((args.batch,), 500.0, device=device)
    context = torch.randn(args.batch, 77, 768, device=device)
    with torch.inference_mode():
        full = median_seconds(lambda: unet(x, t, context), args.repeats, device)
        rows = [("full step", full)]
        for depth in (int(d) for d in args.depths.split(",")):
            cache = FeatureCache(depth)
            unet(x, t, context, cache=cache)
            rows.append((f"cached step, depth {depth}", median_seconds(lambda c=cache: unet(x, t, context, cache=c),
                                                                       args.repeats, device)))
    print(f"SD1.5 U-Net, fp32, {args.device}, {args.threads} threads, latents {args.batch}×4×{args.size}×{args.size}")
    print(f"{'call':<24} {'ms':>10} {'/ full':>8}")
    for name, seconds in rows:
        print(f"{name:<24} {seconds * 1e3:>10.1f} {seconds / full:>8.3f}")
    ratio = rows[1][1] / full
    print(f"cached / full step = {ratio:.3f} (depth {args.depths.split(',')[0]}); --deepcache 3 runs the U-Net "
          f"{3 / (1 + 2 * ratio):.2f}× faster")


if __name__ == "__main__":
    main()
