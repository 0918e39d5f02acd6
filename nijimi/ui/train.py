"""``nijimi train``, ``dataset shapes`` and ``eval shapes``: the CLI side of training and evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path

from nijimi.eval.adherence import evaluate, format_table
from nijimi.models.ldm import LatentDiffusion
from nijimi.models.text_encoder import TextEncoderConfig
from nijimi.models.unet import UNetConfig
from nijimi.models.vae import VAEConfig
from nijimi.pipelines.adapters import lora_requests
from nijimi.pipelines.pipeline import EMBEDDED, Pipeline, load
from nijimi.train.report import write_grid
from nijimi.train.run import RunConfig, UNetStage, VAEStage, run_training
from nijimi.train.shapes import COLOURS, CONCEPT_COLOURS, sample_captions, write_shapes_dataset
from nijimi.ui.config_flags import add_config_flags, config_values
from nijimi.ui.control import add_eval_control_parser
from nijimi.ui.progress import ProgressBar, TrainingProgress


def sample_images(model: LatentDiffusion, prompts: list[str], steps: int, seed: int) -> list:
    """One image per prompt (seeds seed, seed+1, …) with the default sampler: sample grids during training."""
    pipe = Pipeline(model)
    return [pipe.generate(p, steps=steps, seed=seed + i).images[0] for i, p in enumerate(prompts)]


def cmd_train(args: argparse.Namespace) -> int:
    with TrainingProgress(args.quiet) as progress:
        path = run_training(config_values(args), resume=args.resume, on_step=progress, sample_fn=sample_images)
    print(path)
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    print(write_shapes_dataset(args.out, args.count, seed=args.seed, size=args.size))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    pipe = load(args.model or EMBEDDED)
    loras = lora_requests(args.lora)
    captions = sample_captions(args.n, seed=args.seed, split=args.split, concept=args.concept)
    palette = {**COLOURS, args.concept: CONCEPT_COLOURS[args.concept]} if args.concept else COLOURS
    bar = None if args.quiet else ProgressBar(len(captions), label="eval")
    made: list = []

    def generate(batch: list[str], seeds: list[int]) -> list:
        images = [pipe.generate(c, steps=args.steps, sampler=args.sampler, cfg=args.cfg, seed=s, loras=loras).images[0]
                  for c, s in zip(batch, seeds, strict=True)]
        made.extend(images)
        if bar is not None:
            bar.update(len(made))
        return images

    table = evaluate(generate, captions, seeds=[args.seed + i for i in range(len(captions))], palette=palette)
    if bar is not None:
        bar.close()
    if args.grid:
        write_grid(made[:16], Path(args.grid), cols=min(8, len(made)))
    print(format_table(table))
    return 0


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", allow_abbrev=False, help="train a latent text-to-image model from a TOML recipe "
                                                          "(e.g. --config configs/embedded.toml)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted stage from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(p, {"": RunConfig, "vae.": VAEStage, "unet.": UNetStage, "arch.unet.": UNetConfig,
                         "arch.vae.": VAEConfig, "arch.text.": TextEncoderConfig},
                     preset=("arch.unet.", "arch.vae.", "arch.text."))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("dataset", help="write a procedural data set")
    what = p.add_subparsers(dest="what", required=True, metavar="KIND")
    q = what.add_parser("shapes", help="the shapes world: images + captions.jsonl")
    q.add_argument("--count", type=int, required=True, help="number of images")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    q.set_defaults(func=cmd_dataset)

    p = sub.add_parser("eval", help="measure prompt adherence")
    what = p.add_subparsers(dest="what", required=True, metavar="KIND")
    q = what.add_parser("shapes", help="generate held-out shapes captions and score them with the detector")
    q.add_argument("--model", help="model to evaluate (default: the embedded model)")
    q.add_argument("--n", type=int, default=200, help="number of captions (half one-object, half two-object)")
    q.add_argument("--steps", type=int, default=20)
    q.add_argument("--sampler", help="sampler name (default: the model's, as for generate)")
    q.add_argument("--cfg", type=float, default=7.0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--split", default="heldout", choices=("heldout", "train"), help="caption split (default heldout)")
    q.add_argument("--concept", choices=sorted(CONCEPT_COLOURS),
                   help="make each caption's first object this new colour (to measure an adapter that teaches it)")
    q.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="apply an adapter while generating (repeatable)")
    q.add_argument("--grid", help="also write a PNG of the first 16 images (rows of 8, in caption order)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_eval)
    add_eval_control_parser(what)
