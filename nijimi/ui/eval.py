"""``nijimi eval shapes``, ``nijimi eval control`` and ``nijimi eval attention``: the CLI side of :mod:`nijimi.eval`.
Images come from a pipeline here; the evaluators see only a function from captions (and maps) and seeds to images
(and, for attention, the colour words' maps)."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import torch

from nijimi.errors import ConfigError
from nijimi.eval.adherence import evaluate, evaluate_control, format_control_table, format_table
from nijimi.eval.attention import evaluate_attention, format_summary, two_colour_captions
from nijimi.explain.attention import word_maps
from nijimi.io.controlnet import load_controlnet
from nijimi.io.files import check_output
from nijimi.pipelines.adapters import apply_loras, few_step_adapters, lora_requests
from nijimi.pipelines.control import ControlUnit, controlnet_source
from nijimi.pipelines.pipeline import EMBEDDED, load
from nijimi.pipelines.request import GenerationRequest
from nijimi.pipelines.shortcuts import fast_settings
from nijimi.train.captions import ORIGINAL, PHRASINGS
from nijimi.train.controlnet import MASK, ControlPairs, map_image
from nijimi.train.report import write_grid
from nijimi.train.shapes import COLOURS, CONCEPT_COLOURS, ShapesDataset, sample_captions
from nijimi.ui.control import CONDITIONS, condition_preprocess
from nijimi.ui.progress import ProgressBar


def _bar(total: int, label: str, quiet: bool) -> ProgressBar:
    return ProgressBar(total, label=label, stream=io.StringIO() if quiet else None)


def _check_options(args: argparse.Namespace) -> None:
    """What an evaluation is refused for before any work: no captions, or a grid file that exists or cannot be
    written (unless ``--overwrite``); the generation settings are checked as a request's."""
    if args.n < 1:
        raise ConfigError(f"--n {args.n}: evaluate at least one caption")
    GenerationRequest("x", steps=args.steps, sampler=args.sampler, guidance=args.cfg, seed=args.seed)
    if args.grid:
        check_output(args.grid, args.overwrite)


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    _check_options(args)
    pipe, loras = load(args.model or EMBEDDED), lora_requests(args.lora)
    captions = sample_captions(args.n, seed=args.seed, split=args.split, concept=args.concept, phrasing=args.phrasing)
    palette = {**COLOURS, args.concept: CONCEPT_COLOURS[args.concept]} if args.concept else COLOURS
    settings = {"steps": args.steps, "sampler": args.sampler, "guidance": args.cfg}
    if args.fast:
        settings.update(fast_settings(few_step_adapters(loras, "", None)))
    made: list = []

    def generate(batch: list[str], seeds: list[int]) -> list:
        images = [pipe.generate(c, **settings, seed=s, embeddings=args.embedding, decoder=args.decoder).images[0]
                  for c, s in zip(batch, seeds, strict=True)]
        made.extend(images)
        bar.update(len(made))
        return images

    applied = apply_loras(pipe, loras)  # merged once for every caption: the same images as per-call loras=
    try:
        with contextlib.closing(_bar(len(captions), "eval", args.quiet)) as bar:
            table = evaluate(generate, captions, seeds=[args.seed + i for i in range(len(captions))],
                             palette=palette)
    finally:
        applied.undo()
    if args.grid:
        write_grid(made[:16], Path(args.grid), cols=min(8, len(made)), overwrite=args.overwrite)
    print(format_table(table))
    return 0


def cmd_eval_control(args: argparse.Namespace) -> int:
    _check_options(args)
    pipe = load(args.model or EMBEDDED)
    controlnet, _ = load_controlnet(controlnet_source(args.controlnet))
    size = args.size or pipe.native_size
    pairs = ControlPairs(ShapesDataset(size, args.seed, args.split, args.n), args.condition,
                         condition_preprocess(args.condition, args.low, args.high))
    made: list = []

    def generate(captions: list[str], maps: list[torch.Tensor], seeds: list[int]) -> list:
        images = [pipe.generate(c, steps=args.steps, sampler=args.sampler, guidance=args.cfg, seed=s, width=size,
                                height=size, control=[ControlUnit(controlnet, m, args.scale)]).images[0]
                  for c, m, s in zip(captions, maps, seeds, strict=True)]
        made.extend(zip(maps, images, strict=True))
        bar.update(len(made))
        return images

    with contextlib.closing(_bar(len(pairs), "eval control", args.quiet)) as bar:
        result = evaluate_control(generate, pairs, seeds=[args.seed + i for i in range(len(pairs))])
    if args.grid:
        shown = made[:8]
        write_grid([map_image(m[0]) for m, _ in shown] + [image for _, image in shown], Path(args.grid), len(shown),
                   overwrite=args.overwrite)
    print(format_control_table(result))
    return 0


def cmd_eval_attention(args: argparse.Namespace) -> int:
    _check_options(args)
    pipe = load(args.model or EMBEDDED)
    captions = two_colour_captions(args.n, seed=args.seed, split=args.split)
    done = 0

    def maps(caption: str, words: list[str], seed: int) -> tuple:
        nonlocal done
        request = GenerationRequest(caption, steps=args.steps, sampler=args.sampler, guidance=args.cfg, seed=seed)
        result = word_maps(pipe, request, words)
        done += 1
        bar.update(done)
        return result.image, result.maps

    with contextlib.closing(_bar(len(captions), "eval attention", args.quiet)) as bar:
        rows = evaluate_attention(maps, captions, seeds=[args.seed + i for i in range(len(captions))])
    print(format_summary(rows))
    return 0


def _add_generation_options(q: argparse.ArgumentParser, n: int, what: str, grid: bool = True) -> None:
    q.add_argument("--n", type=int, default=n, help=f"number of {what} (default {n})")
    q.add_argument("--steps", type=int, default=20)
    q.add_argument("--sampler", help="sampler name (default: the model's, as for generate)")
    q.add_argument("--cfg", type=float, help="guidance scale (default: the model's, as for generate)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--split", default="heldout", choices=("heldout", "train"), help=f"{what} split (default heldout)")
    q.add_argument("--quiet", action="store_true")
    if grid:
        q.add_argument("--overwrite", action="store_true", help="replace an existing --grid file")


def add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``eval shapes``, ``eval control`` and ``eval attention`` to the ``nijimi`` command's sub-commands
    (``cli.build_parser``)."""
    what = sub.add_parser("eval", help="measure prompt adherence").add_subparsers(dest="what", required=True,
                                                                               metavar="KIND")
    q = what.add_parser("shapes", help="generate held-out shapes captions and score them with the detector")
    q.add_argument("--model", help="model to evaluate (default: the embedded model)")
    _add_generation_options(q, 200, "captions")
    q.add_argument("--phrasing", default=ORIGINAL, choices=(ORIGINAL, *PHRASINGS),
                   help="captions in the first recipe's phrasing (default original, what the first stage learned), "
                        "the wider training phrasing, or paraphrases no training caption uses")
    q.add_argument("--concept", choices=sorted(CONCEPT_COLOURS),
                   help="make each caption's first object this new colour (to measure an adapter that teaches it)")
    q.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="apply an adapter while generating (repeatable)")
    q.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion embedding the captions may name by its file's stem (repeatable)")
    q.add_argument("--decoder", default="vae", metavar="vae|tiny[:PATH]",
                   help="latents → pixels, as for generate (default vae; tiny: the model's TAESD decoder)")
    q.add_argument("--fast", action="store_true",
                   help="generate with generate --fast's settings (a few-step --lora's recipe, else DeepCache and a "
                        "guidance window); they replace --steps, --sampler and --cfg")
    q.add_argument("--grid", help="also write a PNG of the first 16 images (rows of 8, in caption order)")
    q.set_defaults(func=cmd_eval_shapes)

    q = what.add_parser("control", help="generate with a ControlNet from held-out shapes scenes; mean IoU of the "
                                        "objects vs the control masks, and the detector's prompt adherence")
    q.add_argument("--controlnet", default=EMBEDDED,
                   help="the ControlNet file or folder (default: embedded, the embedded model's demo ControlNet)")
    q.add_argument("--model", help="the model it steers (default: the embedded model)")
    q.add_argument("--condition", default=MASK, help=f"the maps it was trained on: {', '.join(CONDITIONS)}")
    q.add_argument("--low", type=float, default=100.0, help="canny's low threshold (default 100)")
    q.add_argument("--high", type=float, default=200.0, help="canny's high threshold (default 200)")
    q.add_argument("--scale", type=float, default=1.0, help="ControlNet weight (default 1)")
    q.add_argument("--size", type=int, help="image side (default: the model's native size)")
    _add_generation_options(q, 50, "scenes")
    q.add_argument("--grid", help="also write a PNG of the first 8 maps (top) and images (bottom)")
    q.set_defaults(func=cmd_eval_control)

    q = what.add_parser("attention", help="DAAM maps of two-object shapes captions: each colour word's map mass on "
                                          "the object of that colour (detected in the image) over its area share")
    q.add_argument("--model", help="model to evaluate (default: the embedded model)")
    _add_generation_options(q, 50, "two-object captions with two colours", grid=False)
    q.set_defaults(func=cmd_eval_attention, grid=None, overwrite=False)
