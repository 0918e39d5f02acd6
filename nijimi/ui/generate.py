"""``nijimi generate``, ``reproduce`` and ``info``: settings in, PNG files with A1111-compatible metadata out."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import re
from pathlib import Path

import torch

from nijimi import __version__
from nijimi.diffusion.samplers import StepInfo
from nijimi.errors import ConfigError, NijimiError
from nijimi.io.pngmeta import format_info, format_parameters, generation_settings, read_png_metadata, save_png
from nijimi.pipelines.pipeline import EMBEDDED, Pipeline, load
from nijimi.pipelines.preview import save_preview
from nijimi.pipelines.request import GenerationRequest
from nijimi.pipelines.runtime import WEIGHT_DTYPES, dtype_name
from nijimi.ui.adapters import report_unmatched
from nijimi.ui.control import control_infotext
from nijimi.ui.progress import ProgressBar


def output_paths(out: str | None, request: GenerationRequest, overwrite: bool) -> list[Path]:
    """Where the request's images go: ``X.png`` (numbered ``X-00.png``… for a batch) or, for a folder, A1111-style
    ``NNNNN-SEED.png`` with the next free number. Existing files are an error unless ``overwrite``."""
    target = Path(out or "out")
    count = request.batch
    if target.suffix.lower() == ".png":
        paths = [target] if count == 1 else [target.with_name(f"{target.stem}-{i:02d}.png") for i in range(count)]
    else:
        taken = [int(m.group(1)) for p in target.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
        first = max(taken, default=-1) + 1
        paths = [target / f"{first + i:05d}-{request.seed + i}.png" for i in range(count)]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} exists; use --overwrite to replace it")
    return paths


def _recipe(pipe: Pipeline, request: GenerationRequest) -> dict:
    """Every knob of one image (``reproduce`` reads ``request`` back) and what it ran on."""
    return {"request": request.to_dict(), "model": {"name": pipe.name, "source": pipe.source, "hash": pipe.model_hash},
            "dtype": dtype_name(pipe.dtype), "device": str(pipe.device),
            "schedule": pipe.model.config.schedule.to_diffusers_config(),
            "versions": {"nijimi": __version__, "torch": torch.__version__, "python": platform.python_version()}}


def _a1111_text(pipe: Pipeline, r: GenerationRequest) -> str:
    extra = {"Denoising strength": r.strength if r.init_image is not None else None, "Clip skip": r.clip_skip,
             "Eta": r.eta, **control_infotext([dataclasses.asdict(c) for c in r.control])}
    fields = generation_settings(steps=r.steps, sampler=r.sampler.display, cfg_scale=r.guidance, seed=r.seed,
                                 width=r.width, height=r.height, model_hash=pipe.model_hash, model=pipe.name,
                                 extra=extra)
    return format_parameters(r.prompt, r.negative_prompt, fields)


def run_generation(pipe: Pipeline, request: GenerationRequest, out: str | None, overwrite: bool,
                   quiet: bool, preview: str | None = None) -> list[Path]:
    """Generate ``request`` and write its PNGs, image i as the request of batch 1 with seed ``seed + i``. The output
    files are checked before the work; nothing is written when generation fails. ``preview``: a PNG rewritten after
    every step with a quick picture of x̂₀ (the tiny decoder's when the request decodes with one)."""
    paths = output_paths(out, request, overwrite)
    bars: list[ProgressBar] = []

    def callback(info: StepInfo) -> None:
        if preview is not None:
            save_preview(pipe.preview(info.denoised, "rgb" if request.decoder == "vae" else request.decoder), preview)
        if quiet:
            return
        if not bars:
            bars.append(ProgressBar(info.steps, label="generate"))
        bars[0].update(info.i + 1)

    try:
        gen = pipe.generate(request, callback=None if quiet and preview is None else callback)
    finally:
        for bar in bars:
            bar.close()
    report_unmatched(gen.lora_unmatched)
    for image, path, seed in zip(gen.images, paths, gen.seeds, strict=True):
        one = gen.request.replace(seed=seed, batch=1)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image, path, _a1111_text(pipe, one), _recipe(pipe, one))
    return paths


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    """The request the flags of :func:`add_request_arguments` describe."""
    values = {}
    for field in dataclasses.fields(GenerationRequest):
        cli, value = field.metadata.get("cli"), getattr(args, field.name, None)
        if cli is None or value is None:
            continue
        values.update(cli.expand(value) if cli.expand else {field.name: tuple(value) if cli.repeat else value})
    return GenerationRequest(**values)


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`GenerationRequest` field that has ``cli`` metadata (the prompt is positional)."""
    for field in dataclasses.fields(GenerationRequest):
        cli = field.metadata.get("cli")
        if cli is None:
            continue
        shown = "" if field.default in (None, (), False, "") else f" (default {field.default})"
        if not cli.flags:
            p.add_argument(field.name, help=cli.help)
        elif cli.switch:
            p.add_argument(*cli.flags, dest=field.name, action="store_true", help=cli.help)
        else:
            p.add_argument(*cli.flags, dest=field.name, type=None if cli.expand else cli.parse, metavar=cli.metavar,
                           action="append" if cli.repeat else "store", help=cli.help + shown)


def cmd_generate(args: argparse.Namespace) -> int:
    request = request_from_args(args)
    pipe = load(args.model or EMBEDDED, config=args.model_config, device=args.device, dtype=WEIGHT_DTYPES[args.dtype])
    for path in run_generation(pipe, request, args.out, args.overwrite, args.quiet, args.preview):
        print(path)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    recipe = read_png_metadata(args.image).get("recipe")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), dict) or "request" not in recipe:
        raise NijimiError(f"{args.image}: no nijimi recipe in this PNG; only images made by nijimi can be reproduced")
    request = GenerationRequest.from_dict(recipe["request"], f"{args.image}: recipe")
    dtype = recipe.get("dtype", "fp32")
    if dtype not in WEIGHT_DTYPES:
        raise NijimiError(f"{args.image}: recipe dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    model = args.model or recipe["model"].get("source")
    if not isinstance(model, str) or not model:
        raise NijimiError(f"{args.image}: the recipe names no model; give one with --model")
    pipe = load(model, device=args.device, dtype=WEIGHT_DTYPES[dtype])
    recorded = recipe["model"].get("hash")
    if recorded and pipe.model_hash and pipe.model_hash != recorded:
        raise NijimiError(f"{model}: model hash {pipe.model_hash} differs from the image's {recorded}")
    for path in run_generation(pipe, request, args.out, args.overwrite, args.quiet, args.preview):
        print(path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(format_info(read_png_metadata(args.image)))
    return 0


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_request_arguments(p)
    p.add_argument("--model", help="checkpoint file or diffusers folder (default: the embedded model)")
    p.add_argument("--model-config", help="override detection: preset (sd15, sd21_v, …) or an LDM .yaml")
    p.add_argument("--dtype", choices=tuple(WEIGHT_DTYPES), default="fp32",
                   help="U-Net and text-encoder weights (default fp32; bf16 halves their memory, the VAE stays fp32)")
    add_output_arguments(p)


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``generate`` and ``reproduce``: where to write, and where to run."""
    p.add_argument("--out", help="output .png file or folder (default: out/)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--preview", metavar="FILE", help="PNG rewritten after every step with a quick preview")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
