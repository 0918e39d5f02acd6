"""The ``nijimi`` command: argument parsing, progress and error printing; the work lives in the library.

``generate`` makes a :class:`~nijimi.pipelines.request.GenerationRequest` from its flags (one per request field,
:func:`add_request_arguments`), runs it and writes PNGs whose recipe is the request (``reproduce`` reads it back),
with the model and LoRAs named by name and hash (``reproduce`` finds them again, :mod:`nijimi.io.find`). No output
replaces a file without ``--overwrite``; outputs are checked before any work (:func:`~nijimi.io.files.check_output`).
Errors (the library's and the command line's) are one ``error: …`` line, exit 2; ``torchrun`` ranks end here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import torch
from PIL import Image

from nijimi import __version__
from nijimi.diffusion.choice import SAMPLER_SPECS, SCHEDULE_LABELS
from nijimi.diffusion.samplers import StepInfo
from nijimi.errors import NijimiError, OutputExistsError
from nijimi.explain.schedules import EXPLAIN_FILES, explain_schedules
from nijimi.io.checkpoint import convert
from nijimi.io.files import check_output
from nijimi.io.imagemeta import read_image_metadata
from nijimi.io.pngmeta import (
    format_info,
    save_png,
)
from nijimi.pipelines.adapters import few_step_adapters, few_step_notes
from nijimi.pipelines.comfyui import from_graph
from nijimi.pipelines.pipeline import EMBEDDED, Pipeline, load
from nijimi.pipelines.preview import save_preview
from nijimi.pipelines.request import GenerationRequest
from nijimi.pipelines.runtime import WEIGHT_DTYPES, apply_default_threads
from nijimi.pipelines.shortcuts import FAST, fast_settings
from nijimi.train.report import write_grid
from nijimi.ui.adapters import add_adapter_parsers, report_unmatched
from nijimi.ui.control import add_control_parsers
from nijimi.ui.doctor import add_doctor_parser
from nijimi.ui.eval import add_eval_parsers
from nijimi.ui.explain import add_explain_parsers
from nijimi.ui.foreign import add_folder_arguments, format_settings, import_image
from nijimi.ui.progress import ProgressBar
from nijimi.ui.recipe import a1111_text, check_tags, embedding_hashes, png_recipe, recorded_loras, recorded_model
from nijimi.ui.serve import add_serve_parser
from nijimi.ui.train import add_train_parsers

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


def run_demo(out: str | Path, seed: int = 0, overwrite: bool = False) -> list[Path]:
    """Write ``demo.png`` (with its generation metadata) and ``grid.png`` to ``out``; returns both paths. Existing
    files of those names are refused before any work unless ``overwrite``."""
    out = check_output(out, folder=True)
    grid = check_output(out / "grid.png", overwrite)
    check_output(out / "demo.png", overwrite)
    pipe = load()
    first = run_generation(pipe, GenerationRequest(DEMO_PROMPT, seed=seed), str(out / "demo.png"), overwrite=overwrite,
                           quiet=True)
    images = [pipe.generate(p, seed=seed + i, steps=20).images[0] for i, p in enumerate(GRID_PROMPTS)]
    return [*first, write_grid(images, grid, cols=4, overwrite=overwrite)]


def _next_number(folder: Path) -> int:
    """A1111's next output number in ``folder``: one past the highest ``NNNNN-`` PNG there."""
    taken = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"(\d{5,})-", p.name))]
    return max(taken, default=-1) + 1


def output_paths(out: str | None, request: GenerationRequest, overwrite: bool) -> list[Path]:
    """Where the request's images go: ``X.png`` (numbered ``X-00.png``… for a batch) or, for a folder, A1111-style
    ``NNNNN-SEED.png`` with the next free number. Existing files are an error unless ``overwrite``."""
    target = Path(out or "out")
    count = request.batch
    if target.suffix.lower() == ".png":
        paths = [target] if count == 1 else [target.with_name(f"{target.stem}-{i:02d}.png") for i in range(count)]
    else:
        first = _next_number(check_output(target, folder=True))
        paths = [target / f"{first + i:05d}-{request.seed + i}.png" for i in range(count)]
    return [check_output(p, overwrite) for p in paths]


def write_png(image: Image.Image, path: Path, numbered: bool, overwrite: bool, parameters: str,
              recipe: dict) -> Path:
    """Write one output PNG where it goes, never replacing a file unless ``overwrite``; returns its path. A numbered
    name (``NNNNN-SEED.png``) another process took meanwhile moves on to the next free number; any other existing
    name raises ``OutputExistsError``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            save_png(image, path, parameters, recipe, overwrite)
            return path
        except OutputExistsError:
            if not numbered:
                raise
            path = path.parent / f"{_next_number(path.parent):05d}-{path.name.split('-', 1)[1]}"


def run_generation(pipe: Pipeline, request: GenerationRequest, out: str | None, overwrite: bool,
                   quiet: bool, preview: str | None = None, record_paths: bool = False,
                   embeddings: Mapping[str, str] | None = None) -> list[Path]:
    """Generate ``request`` and write its PNGs, image i as the request of batch 1 with seed ``seed + i``. The output
    files are checked before the work and written by :func:`write_png`; nothing is written when generation fails or
    a name was taken meanwhile (a batch is rolled back). ``preview``: a PNG rewritten after every step with a quick
    picture of x̂₀ (the tiny decoder's when the request decodes with one). ``record_paths``: see
    :func:`~nijimi.ui.recipe.png_recipe`. ``embeddings``: the textual-inversion embeddings (name → A1111 hash) the
    prompts must have used (``reproduce``); others are an error, before any file is written. Returns the paths
    written."""
    paths = output_paths(out, request, overwrite)
    if preview is not None:
        check_output(preview, overwrite)
    bars: list[ProgressBar] = []

    def callback(info: StepInfo) -> None:
        if preview is not None:
            save_preview(pipe.preview(info.denoised, "rgb" if request.decoder == "vae" else request.decoder), preview)
        if quiet:
            return
        if info.i == 0:  # a pass begins (the hires fix has two)
            if bars:
                bars[-1].close()
            bars.append(ProgressBar(info.steps, label="hires" if bars else "generate"))
        bars[-1].update(info.i + 1)

    try:
        gen = pipe.generate(request, callback=None if quiet and preview is None else callback)
    finally:
        if bars:
            bars[-1].close()
    report_unmatched(gen.lora_unmatched)
    hashes = embedding_hashes(gen.embeddings)
    if embeddings is not None and hashes != dict(embeddings):
        raise NijimiError(f"the prompts used the embeddings {hashes or 'none'} (name: hash), the image's recipe "
                          f"{dict(embeddings) or 'none'}; the embedding files have changed")
    written: list[Path] = []
    numbered = Path(out or "out").suffix.lower() != ".png"
    try:
        for i, (image, path) in enumerate(zip(gen.images, paths, strict=True)):
            one = gen.request.single(i)
            written.append(write_png(image, path, numbered, overwrite, a1111_text(pipe, one, hashes),
                                     png_recipe(pipe, one, record_paths, hashes)))
    except OutputExistsError:
        for path in written:  # a batch is written whole or not at all
            path.unlink(missing_ok=True)
        raise
    return written


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
    adapters = few_step_adapters(request.loras, request.prompt, request.lora_dir)
    if args.fast:
        given = {name for name, value in vars(args).items() if value not in (None, False)}
        fast = fast_settings(adapters)
        if "sampler" in given:  # a recipe's η belongs to its sampler
            fast.pop("eta", None)
        request = request.replace(**{name: value for name, value in fast.items() if name not in given})
    for note in few_step_notes(adapters, request.sampler):
        print(f"note: {note}", file=sys.stderr)
    pipe = load(args.model or EMBEDDED, config=args.model_config, device=args.device, dtype=WEIGHT_DTYPES[args.dtype])
    for path in run_generation(pipe, request, args.out, args.overwrite, args.quiet, args.preview, args.record_paths):
        print(path)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    meta = read_image_metadata(args.image)
    recipe = meta.get("recipe")
    if recipe is None:
        imported = import_image(meta, args)  # an A1111 or ComfyUI image
        pipe = load(imported.model, device=args.device)
        for path in run_generation(pipe, imported.request, args.out, args.overwrite, args.quiet, args.preview,
                                   args.record_paths):
            print(path)
        return 0
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), dict) or "request" not in recipe:
        raise NijimiError(f"{args.image}: no nijimi recipe that can be replayed (its 'nijimi' text lacks the request "
                          "or the model)")
    data = recorded_loras(recipe, args) if isinstance(recipe["request"], dict) else recipe["request"]
    request = GenerationRequest.from_dict(data, f"{args.image}: recipe")
    check_tags(recipe, request)
    dtype = recipe.get("dtype", "fp32")
    if dtype not in WEIGHT_DTYPES:
        raise NijimiError(f"{args.image}: recipe dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    model = args.model or recorded_model(recipe, args)
    pipe = load(model, device=args.device, dtype=WEIGHT_DTYPES[dtype])
    recorded = recipe["model"].get("hash")
    if recorded and pipe.model_hash and pipe.model_hash != recorded:
        raise NijimiError(f"{model}: model hash {pipe.model_hash} differs from the image's {recorded}")
    embeddings = recipe.get("embeddings")  # recipes before textual inversion have none
    for path in run_generation(pipe, request, args.out, args.overwrite, args.quiet, args.preview, args.record_paths,
                               embeddings if isinstance(embeddings, dict) else None):
        print(path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    meta = read_image_metadata(args.image)
    graph = meta.get("comfyui_prompt")
    comfyui = [] if graph is None else [format_settings(from_graph(graph))]  # fails before anything is printed
    print("\n".join([format_info(meta), *comfyui]))
    return 0


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``generate`` and ``reproduce``: where to write, and where to run."""
    p.add_argument("--out", help="output .png file or folder (default: out/)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--preview", metavar="FILE", help="PNG rewritten after every step with a quick preview")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--record-paths", action="store_true",
                   help="record the model's and LoRAs' absolute paths in the PNG recipe too (private use; by default "
                        "they are recorded by name and hash, as A1111 does)")


def _cmd_samplers(args: argparse.Namespace) -> int:
    for name, spec in SAMPLER_SPECS.items():
        print(f"{name:12s} {spec.display!r:15s} automatic={spec.automatic:12s} "
              f"{(spec.fn.__doc__ or '').strip().splitlines()[0]}")
    print("schedules (--schedule): " + ", ".join(f"{name} ({label!r})" for name, label in SCHEDULE_LABELS.items()))
    print("uniform is the model's own timesteps; A1111's 'Uniform' (its Automatic for Euler, Euler a, Heun, LMS) is "
          "normal; karras, exponential and polyexponential span the model's whole σ range, as in A1111")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    for name in EXPLAIN_FILES:
        check_output(check_output(args.out, folder=True) / name, args.overwrite)
    for path in explain_schedules(args.out, image=args.image):
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    for path in run_demo(args.out, overwrite=args.overwrite):
        print(path)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    check_output(Path(args.dst).parent, folder=True)
    report = convert(args.src, args.dst, to=args.to, half=args.half, config=args.model_config,
                     overwrite=args.overwrite)
    print(report.summary())
    print(args.dst)
    return 0


def _add_generation_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="text to image (img2img with --init, inpainting with --mask)")
    add_request_arguments(p)
    p.add_argument("--fast", action="store_true",
                   help="fewer U-Net passes at about the same adherence: a loaded few-step adapter's recipe (LCM, "
                        "TCD, Hyper-SD), else " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in FAST.items())
                        + "; flags you give win")
    p.add_argument("--model", help="checkpoint file or diffusers folder (default: the embedded model)")
    p.add_argument("--model-config", help="override detection: preset (sd15, sd21_v, …) or an LDM .yaml")
    p.add_argument("--dtype", choices=tuple(WEIGHT_DTYPES), default="fp32",
                   help="U-Net and text-encoder weights (default fp32; bf16 halves their memory, the VAE stays fp32)")
    add_output_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("reproduce", help="regenerate an image from its metadata: nijimi's recipe, A1111's parameters "
                       "(PNG, JPEG, WebP) or a ComfyUI graph")
    p.add_argument("image", help="a PNG written by nijimi, or a PNG/JPEG/WebP written by A1111 or ComfyUI")
    p.add_argument("--model", help="use this model file (or embedded) instead of the one recorded")
    add_folder_arguments(p)
    add_output_arguments(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("info", help="print the generation metadata of a PNG, JPEG or WebP (nijimi, A1111, ComfyUI)")
    p.add_argument("image")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a model between single-file and diffusers-folder layouts")
    p.add_argument("src", help="checkpoint file or diffusers folder")
    p.add_argument("dst", help="output .safetensors file or folder")
    p.add_argument("--to", choices=("single", "diffusers"), help="output layout (default: from DST's name)")
    p.add_argument("--half", action="store_true", help="store float16")
    p.add_argument("--model-config", help="override detection: preset name or LDM .yaml")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(func=_cmd_convert)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error: …`` line (exit 2), like the library's errors, and that
    takes no abbreviated flags (``--vae`` must not silently mean ``--vae-tile``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


DESCRIPTION = "nijimi (滲み): latent diffusion (Stable Diffusion) from scratch, fast on an ordinary CPU."


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nijimi", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"nijimi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("samplers", help="list the samplers and σ spacings")
    p.set_defaults(func=_cmd_samplers)

    p = sub.add_parser("explain", help="plots that show how the pieces behave")
    what = p.add_subparsers(dest="what", required=True, metavar="TOPIC")
    q = what.add_parser("schedules", help="ᾱ_t, log-SNR and a noising strip for linear, scaled_linear and cosine")
    q.add_argument("--image", help="image to noise (default: a generated test pattern)")
    q.add_argument("--out", required=True, help="output folder for the PNGs")
    q.add_argument("--overwrite", action="store_true", help="replace existing PNGs of the same names")
    q.set_defaults(func=_cmd_explain)
    add_explain_parsers(what, add_request_arguments, request_from_args)

    _add_generation_parsers(sub)
    add_train_parsers(sub)
    add_control_parsers(sub)
    add_adapter_parsers(sub)
    add_eval_parsers(sub)
    add_doctor_parser(sub)
    add_serve_parser(sub)

    p = sub.add_parser("demo", help="generate sample images from the embedded model")
    p.add_argument("--out", default="out", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo.png and grid.png")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # a flag's parser may raise NijimiError too (e.g. --control)
        apply_default_threads()
        code = args.func(args)
    except NijimiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    finish_distributed(code)
    return code


def finish_distributed(code: int) -> None:
    """End a ``torchrun`` process whose work is done: leave the process group and exit at once with ``code``.

    After gloo's teardown one of its C++ static destructors intermittently calls ``std::terminate`` at interpreter
    exit (SIGABRT, "terminate called without an active exception"), which torchrun reports as a failed rank though
    every output was written; ``os._exit`` skips those destructors. Does nothing outside a process group.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if code == 0:
        torch.distributed.barrier()  # no rank leaves while another still writes
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
