"""``nijimi generate``, ``reproduce`` and ``info``: settings in, PNG files with A1111-compatible metadata out."""

from __future__ import annotations

import argparse
import platform
import re
import secrets
from pathlib import Path

import torch

from nijimi import __version__
from nijimi.diffusion.samplers import StepInfo, canonical_name, display_name
from nijimi.errors import ConfigError, NijimiError
from nijimi.io.pngmeta import format_info, format_parameters, generation_settings, read_png_metadata, save_png
from nijimi.pipelines.adapters import lora_requests
from nijimi.pipelines.pipeline import EMBEDDED, Generation, Pipeline, load
from nijimi.pipelines.runtime import DTYPES
from nijimi.ui.adapters import add_lora_arguments, report_unmatched
from nijimi.ui.control import add_control_argument, control_infotext, control_specs, specs_from_recipe
from nijimi.ui.progress import ProgressBar


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """``"512x768"`` → (512, 768); ``"512"`` → (512, 512); None → (None, None)."""
    if text is None:
        return None, None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", text)
    if not m:
        raise ConfigError(f"--size {text!r} is not WIDTHxHEIGHT (e.g. 512x512)")
    return int(m.group(1)), int(m.group(2) or m.group(1))


def output_paths(out: str | None, count: int, seeds: list[int], overwrite: bool) -> list[Path]:
    """Where the images go: ``X.png`` (numbered ``X-00.png``… for a batch) or, for a folder, A1111-style
    ``NNNNN-SEED.png`` with the next free number. Existing files are an error unless ``overwrite``."""
    target = Path(out or "out")
    if target.suffix.lower() == ".png":
        paths = [target] if count == 1 else [target.with_name(f"{target.stem}-{i:02d}.png") for i in range(count)]
    else:
        taken = [int(m.group(1)) for p in target.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
        first = max(taken, default=-1) + 1
        paths = [target / f"{first + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} exists; use --overwrite to replace it")
    return paths


def _recipe(pipe: Pipeline, gen: Generation, seed: int) -> dict:
    """Every knob of one image, for the JSON chunk (``reproduce`` reads it back)."""
    s = gen.settings
    return {**s, "seed": seed, "batch": 1, "sampler": canonical_name(s["sampler"]),
            "model": {"name": pipe.name, "source": pipe.source, "hash": pipe.model_hash},
            "schedule": pipe.model.config.schedule.to_diffusers_config(), "device": str(pipe.device),
            "versions": {"nijimi": __version__, "torch": torch.__version__, "python": platform.python_version()}}


def _a1111_text(pipe: Pipeline, gen: Generation, seed: int) -> str:
    s = gen.settings
    extra = {"Denoising strength": s.get("strength"), "Clip skip": s.get("clip_skip"),
             **control_infotext(s.get("control"))}
    fields = generation_settings(steps=s["steps"], sampler=display_name(s["sampler"]), cfg_scale=s["cfg"], seed=seed,
                                 width=s["width"], height=s["height"], model_hash=pipe.model_hash, model=pipe.name,
                                 extra=extra)
    return format_parameters(s["prompt"], s["negative_prompt"], fields)


def run_generation(pipe: Pipeline, settings: dict, out: str | None, overwrite: bool, quiet: bool) -> list[Path]:
    """Generate with ``settings`` (keyword arguments of :meth:`Pipeline.generate`) and write the PNGs.

    The seed is fixed first (a random one when ``settings`` has none) so that the output files are checked before
    the work; nothing is written when generation fails.
    """
    settings = dict(settings)
    if settings.get("seed") is None:
        settings["seed"] = secrets.randbelow(2**32)
    seed, batch = settings["seed"], settings.get("batch", 1)
    output_paths(out, batch, [seed + i for i in range(batch)], overwrite)
    bars: list[ProgressBar] = []

    def callback(info: StepInfo) -> None:
        if not bars:
            bars.append(ProgressBar(info.steps, label="generate"))
        bars[0].update(info.i + 1)

    try:
        gen = pipe.generate(**settings, callback=None if quiet else callback)
    finally:
        for bar in bars:
            bar.close()
    report_unmatched(gen.lora_unmatched)
    paths = output_paths(out, len(gen.images), gen.seeds, overwrite)
    for image, path, seed in zip(gen.images, paths, gen.seeds, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image, path, _a1111_text(pipe, gen, seed), _recipe(pipe, gen, seed))
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    width, height = parse_size(args.size)
    pipe = load(args.model or EMBEDDED, config=args.config, device=args.device, dtype=DTYPES[args.dtype])
    settings = {"prompt": args.prompt, "negative_prompt": args.negative, "steps": args.steps, "sampler": args.sampler,
                "cfg": args.cfg, "seed": args.seed, "width": width, "height": height, "batch": args.batch,
                "init_image": args.init, "strength": args.strength, "mask": args.mask, "clip_skip": args.clip_skip,
                "vae_tile": args.vae_tile, "attention_slice": args.attention_slice,
                "control": control_specs(args.control), "loras": lora_requests(args.lora, args.lora_dir),
                "lora_dir": args.lora_dir, "strict_loras": args.strict}
    for path in run_generation(pipe, settings, args.out, args.overwrite, args.quiet):
        print(path)
    return 0


_REPLAYED = ("prompt", "negative_prompt", "steps", "sampler", "cfg", "seed", "width", "height", "strength",
             "clip_skip", "guidance_rescale", "vae_tile", "attention_slice", "loras", "lora_dir")


def cmd_reproduce(args: argparse.Namespace) -> int:
    meta = read_png_metadata(args.image)
    recipe = meta.get("recipe")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), dict):
        raise NijimiError(f"{args.image}: no nijimi recipe in this PNG; only images made by nijimi can be reproduced")
    for key in ("init_image", "mask"):
        if recipe.get(key):
            raise NijimiError(f"{args.image}: reproducing img2img/inpainting needs the original {key}, not stored")
    dtype = recipe.get("dtype", "fp32")
    if dtype not in DTYPES:
        raise NijimiError(f"{args.image}: recipe dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    model = args.model or recipe["model"]["source"]
    pipe = load(model, device=args.device, dtype=DTYPES[dtype])
    if recipe["model"]["hash"] and pipe.model_hash and pipe.model_hash != recipe["model"]["hash"]:
        raise NijimiError(f"{model}: model hash {pipe.model_hash} differs from the image's {recipe['model']['hash']}")
    settings = {k: recipe[k] for k in _REPLAYED if k in recipe}
    settings["control"] = specs_from_recipe(recipe.get("control"), str(args.image))
    for path in run_generation(pipe, settings, args.out, args.overwrite, args.quiet):
        print(path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(format_info(read_png_metadata(args.image)))
    return 0


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (A1111 syntax: (word:1.2), [from:to:when], BREAK, <lora:NAME:W> …)")
    add_lora_arguments(p)
    p.add_argument("-n", "--negative", default="", help="negative prompt")
    p.add_argument("--model", help="checkpoint file or diffusers folder (default: the embedded model)")
    p.add_argument("--config", help="override detection: preset (sd15, sd21_v, …) or an LDM .yaml")
    p.add_argument("--sampler", help="sampler name (`nijimi samplers` lists them; default dpm++2m-karras, or "
                   "dpm++2m on the model's own timesteps for a zero-terminal-SNR model)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    p.add_argument("--seed", type=int, help="seed (default: random); image i of a batch uses seed+i")
    p.add_argument("--size", help="WIDTHxHEIGHT, multiples of 8 (default: the model's native size)")
    p.add_argument("--batch", type=int, default=1, help="images to generate (default 1)")
    p.add_argument("--init", help="init image for img2img / inpainting")
    p.add_argument("--strength", type=float, default=0.75, help="img2img denoising strength in [0, 1]")
    p.add_argument("--mask", help="inpainting mask (white = repaint), same size as --init")
    p.add_argument("--clip-skip", type=int, help="text-encoder layer, A1111 numbering (1 = last)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="U-Net and text-encoder weights (default fp32; bf16 halves their memory, the VAE stays fp32)")
    p.add_argument("--vae-tile", type=int, metavar="N",
                   help="decode (and encode) in N-pixel tiles; 0 = never (default: when memory is short)")
    p.add_argument("--attention-slice", type=int, metavar="N",
                   help="compute attention N query rows at a time; 0 = never (default: when memory is short)")
    add_control_argument(p)
    add_output_arguments(p)


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``generate`` and ``reproduce``: where to write, and where to run."""
    p.add_argument("--out", help="output .png file or folder (default: out/)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
