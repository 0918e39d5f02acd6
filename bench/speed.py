"""Benchmark: time to one image, diffusers' default pipeline against nijimi's modes, one table from one run.

An SD1.5-size model (the real configs, seeded random weights, fp32) is written once as a diffusers folder; then each
mode generates one image in a child process of its own (so each has its own peak RSS), at each size, in turns:

- ``diffusers``: ``StableDiffusionPipeline(prompt)`` as SD1.5 ships it: PNDM (skip_prk_steps), 50 steps, CFG 7.5,
  full VAE decode;
- ``nijimi``: ``nijimi generate`` defaults: DPM++ 2M Karras, 20 steps, CFG 7;
- ``fast``: ``--fast`` (:data:`nijimi.pipelines.shortcuts.FAST`);
- ``lcm``: an LCM-LoRA in its published diffusers layout (random values, rank 64) with ``--sampler lcm --steps 4
  --guidance 1 --decoder tiny:…`` (a TAESD decoder in its published layout, random values).

Seconds exclude loading (the first image is timed: no warm-up, as a user sees it); U-Net rows count each latent row
through the U-Net (a guided step is 2 rows), cached DeepCache rows separately. The ratio is to diffusers' time. Peak
RSS is the child's ``ru_maxrss``: loading and the whole generation, decode included; it too is given as a ratio to
diffusers' at the same size, and the last line names the largest of those.

``--steps N`` runs every mode (diffusers too) with N sampling steps instead of its own, for a quick peak-RSS check:
the peak is set by the weights, one step's activations and the decode, not by the number of steps, but it settles
over the first few steps (allocator reuse; measured at 256²: 2 steps 0.07 GiB under 20, 8 steps 0.01), so use N ≥ 4. Its
seconds and U-Net rows describe that shortened run, not the benchmark, and the table says so.

    python bench/speed.py [--sizes 256,512] [--modes diffusers,nijimi,fast,lcm] [--threads N] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("diffusers", "nijimi", "fast", "lcm")
PROMPT = "a photograph of an astronaut riding a horse"


def build(folder: Path) -> None:
    """The SD1.5-size model with seeded random weights as a diffusers folder, an LCM-LoRA file and a TAESD decoder
    file beside it."""
    from nijimi.io.diffusers_folder import write
    from nijimi.io.safetensors import save_file
    from nijimi.models.ldm import LatentDiffusion, ModelConfig
    from nijimi.models.taesd import TAESDConfig, TinyDecoder

    torch.manual_seed(0)
    model = LatentDiffusion(ModelConfig.sd15()).eval()
    write(model, folder / "sd15", half=False)
    decoder = TinyDecoder(TAESDConfig.sd()).state_dict()
    save_file({k: v.contiguous() for k, v in decoder.items()}, folder / "taesd_decoder.safetensors")
    save_file(lcm_lora(model), folder / "lcm-lora.safetensors")


def lcm_lora(model: torch.nn.Module, rank: int = 64) -> dict[str, torch.Tensor]:
    """Random LoRA pairs, rank ``rank``, on every attention projection of the U-Net, named as the published
    LCM-LoRA for SD1.5 names them (diffusers/peft: ``unet.<module>.lora_A.weight`` / ``lora_B``)."""
    from nijimi.io.keys.unet import unet_key_table

    unet = model.unet
    foreign = unet_key_table(unet.config).to_foreign(unet.state_dict())
    names = {k: v for k, v in foreign.items()
             if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))}
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for key, weight in names.items():
        stem = "unet." + key.removesuffix(".weight")
        tensors[f"{stem}.lora_A.weight"] = torch.randn(rank, weight.shape[1], generator=gen) * 0.01
        tensors[f"{stem}.lora_B.weight"] = torch.randn(weight.shape[0], rank, generator=gen) * 0.01
    return tensors


class Counter:
    """Counts latent rows through a U-Net: full calls, and DeepCache's cached (shallow) calls."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.full = self.cached = 0
        unet.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache")
        rows = (args[0] if args else kwargs["sample"]).shape[0]
        if cache is not None and cache.feature is not None:
            self.cached += rows
        else:
            self.full += rows


def run_diffusers(folder: Path, size: int, steps: int | None = None) -> tuple[float, Counter]:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder / "sd15", safety_checker=None)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.set_progress_bar_config(disable=True)
    counter = Counter(pipe.unet)
    start = time.perf_counter()
    with torch.inference_mode():
        pipe(PROMPT, height=size, width=size, num_inference_steps=steps or 50, guidance_scale=7.5,
             generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - start, counter


def run_nijimi(folder: Path, size: int, mode: str, steps: int | None = None) -> tuple[float, Counter]:
    from nijimi.pipelines.adapters import LoraRequest
    from nijimi.pipelines.pipeline import load
    from nijimi.pipelines.request import GenerationRequest
    from nijimi.pipelines.shortcuts import FAST

    pipe = load(folder / "sd15")
    counter = Counter(pipe.model.unet)
    settings = {"fast": FAST, "nijimi": {},
                "lcm": {"sampler": "lcm", "steps": 4, "guidance": 1.0,
                        "loras": (LoraRequest(folder / "lcm-lora.safetensors"),),
                        "decoder": f"tiny:{folder / 'taesd_decoder.safetensors'}"}}[mode]
    settings = {**settings, "steps": steps} if steps else settings
    request = GenerationRequest(PROMPT, width=size, height=size, seed=0, **settings)
    start = time.perf_counter()
    pipe.generate(request)
    return time.perf_counter() - start, counter


def child(folder: Path, mode: str, size: int, steps: int | None = None) -> None:
    """Run one mode once (with ``steps`` sampling steps, None: its own) and print its measurements as one JSON
    line."""
    seconds, counter = (run_diffusers(folder, size, steps) if mode == "diffusers"
                        else run_nijimi(folder, size, mode, steps))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "full": counter.full, "cached": counter.cached, "rss_gib": rss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, help="every mode runs this many steps (a quick peak-RSS check)")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(Path(args.child[0]), args.child[1], int(args.child[2]), args.steps)
        return
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder)
        print(f"SD1.5-size model, random weights, fp32, {args.threads} threads, one image, prompt {PROMPT!r}")
        if args.steps:
            print(f"every mode ran {args.steps} steps (--steps): seconds and U-Net rows are not the benchmark's")
        print(f"{'size':>5} {'mode':<10} {'seconds':>8} {'U-Net rows':>12} {'cached':>7} {'peak RSS GiB':>13} "
              f"{'/ diffusers':>12} {'RSS / diffusers':>16}")
        rss_ratios = {}
        for size in (int(s) for s in args.sizes.split(",")):
            base = base_rss = None
            for mode in modes:
                steps = ["--steps", str(args.steps)] if args.steps else []
                out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), *steps, "--child",
                                      tmp, mode, str(size)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{mode} at {size}: {out.stderr.strip().splitlines()[-1]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                base = row["seconds"] if mode == "diffusers" else base
                base_rss = row["rss_gib"] if mode == "diffusers" else base_rss
                ratio = f"{row['seconds'] / base:.3f}" if base else "-"
                if base_rss and mode != "diffusers":
                    rss_ratios[f"{mode} {size}"] = row["rss_gib"] / base_rss
                rss = f"{row['rss_gib'] / base_rss:.3f}" if base_rss else "-"
                print(f"{size:>5} {mode:<10} {row['seconds']:>8.1f} {row['full']:>12} {row['cached']:>7} "
                      f"{row['rss_gib']:>13.2f} {ratio:>12} {rss:>16}", flush=True)
        if rss_ratios:
            worst = max(rss_ratios, key=rss_ratios.get)
            print(f"peak RSS / diffusers' (same run): at most {rss_ratios[worst]:.3f} ({worst})")


if __name__ == "__main__":
    main()
