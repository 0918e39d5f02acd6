"""``nijimi train`` and ``dataset shapes``; and the one shape of every training command (``train``, ``train-adapter``,
``train-controlnet``): ``--config TOML`` plus a ``--key=value`` flag for each field of the command's config
dataclasses (:func:`add_config_flags`), read back with :func:`config_values`. Flags override the file; both are typed
and checked by the config's own reader (:func:`nijimi.train.config.build_config`)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from collections.abc import Callable
from typing import Any

import torch

from nijimi.models.ldm import LatentDiffusion
from nijimi.models.text_encoder import TextEncoderConfig
from nijimi.models.unet import UNetConfig
from nijimi.models.vae import VAEConfig
from nijimi.pipelines.pipeline import Pipeline
from nijimi.pipelines.request import GenerationRequest
from nijimi.train.config import build_config, read_toml
from nijimi.train.decoder import DecoderTrainConfig, heldout_psnr, train_decoder
from nijimi.train.run import RunConfig, UNetStage, VAEStage, run_training
from nijimi.train.shapes import write_shapes_dataset
from nijimi.ui.progress import TrainingProgress

_SETTING = "setting:"
"""Prefix of the argparse destinations of config fields."""


def _describe(cls: type) -> str:
    """The docstrings of a config dataclass and of the config classes it extends, most general first."""
    own = [c for c in reversed(cls.__mro__) if dataclasses.is_dataclass(c) and c.__dict__.get("__doc__")]
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", " ".join(inspect.getdoc(c) for c in own)).replace("``", "")


def add_config_flags(p: argparse.ArgumentParser, sections: dict[str, type], preset: tuple[str, ...] = ()) -> None:
    """``--config TOML`` and ``--KEY=VALUE`` for every field of each dataclass in ``sections`` (key prefix → class,
    e.g. ``{"": RunConfig, "unet.": UNetStage}``; a TOML table ``[unet]`` holds the same keys). A boolean's flag
    alone means true. Help comes from the classes' docstrings and the fields' defaults (the model preset's for the
    prefixes in ``preset``)."""
    p.add_argument("--config", metavar="TOML", help="settings from this file; flags override them")
    for prefix, cls in sections.items():
        group = p.add_argument_group(f"[{prefix[:-1]}] settings" if prefix else "settings", _describe(cls))
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            flag = f.type in (bool, "bool")
            default = "the model preset's" if prefix in preset else repr(f.default)
            group.add_argument(*dict.fromkeys((f"--{key.replace('_', '-')}", f"--{key}")), dest=_SETTING + key,
                               metavar="VALUE" if f.default is None else type(f.default).__name__.upper(),
                               nargs="?" if flag else None, const="true" if flag else None, help=f"default {default}")


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a training command was given: its ``--config`` file's keys, then the ``--KEY=VALUE`` flags."""
    values = read_toml(args.config) if args.config else {}
    values.update({k.removeprefix(_SETTING): v for k, v in vars(args).items()
                   if k.startswith(_SETTING) and v is not None})
    return values


def add_finetune_parser(sub: argparse._SubParsersAction, name: str, help: str, config: type,
                        func: Callable[[argparse.Namespace], int]) -> None:
    """Add the fine-tuning command ``name`` (settings: the fields of ``config``) that runs ``func(args)``."""
    p = sub.add_parser(name, allow_abbrev=False, help=help)
    p.add_argument("--resume", action="store_true", help="continue from the work folder's checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT, and start afresh over an earlier run's checkpoint in the work folder")
    p.add_argument("--no-samples", action="store_true", help="no sample grids during training")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(p, {"": config})
    p.set_defaults(func=func)


def sample_images(model: LatentDiffusion, prompts: list[str], steps: int, seed: int, **settings: Any) -> list:
    """One image per prompt (seeds seed, seed+1, …) with the default sampler, or the generation ``settings`` given
    (``sampler="lcm", guidance=1.0``): sample grids during training."""
    pipe = Pipeline(model)
    return [pipe.generate(p, steps=steps, seed=seed + i, **settings).images[0] for i, p in enumerate(prompts)]


def sample_latents(model: LatentDiffusion, prompt: str, seed: int) -> torch.Tensor:
    """The latents ``generate`` makes for ``prompt`` and ``seed`` with the model's default settings, not decoded:
    ``train-decoder``'s sampled scenes."""
    return Pipeline(model).sample_latents(GenerationRequest(prompt, seed=seed))[1]


def cmd_train(args: argparse.Namespace) -> int:
    with TrainingProgress(args.quiet) as progress:
        path = run_training(config_values(args), resume=args.resume, on_step=progress, sample_fn=sample_images,
                            overwrite=args.overwrite)
    print(path)
    return 0


def cmd_train_decoder(args: argparse.Namespace) -> int:
    cfg = build_config(DecoderTrainConfig, config_values(args))
    with TrainingProgress(args.quiet) as progress:
        run = train_decoder(cfg, resume=args.resume, overwrite=args.overwrite, on_step=progress.stage("train decoder"),
                            samples=not args.no_samples, latent_fn=sample_latents)
    shapes = cfg.data.startswith("shapes")
    print(f"{cfg.out}: PSNR {heldout_psnr(run):.2f} dB against the VAE's decode "
          f"({'64 held-out scenes' if shapes else 'the first 64 training images'})")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    print(write_shapes_dataset(args.out, args.count, seed=args.seed, size=args.size, overwrite=args.overwrite))
    return 0


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", allow_abbrev=False, help="train a latent text-to-image model from a TOML recipe "
                                                          "(e.g. --config configs/embedded.toml)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted stage from its checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing export, and start a stage afresh over an earlier run's checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(p, {"": RunConfig, "vae.": VAEStage, "unet.": UNetStage, "arch.unet.": UNetConfig,
                         "arch.vae.": VAEConfig, "arch.text.": TextEncoderConfig},
                     preset=("arch.unet.", "arch.vae.", "arch.text."))
    p.set_defaults(func=cmd_train)

    add_finetune_parser(sub, "train-decoder", "distil a TAESD tiny decoder (--encoder: and encoder) from a model's "
                        "VAE", DecoderTrainConfig, cmd_train_decoder)

    p = sub.add_parser("dataset", help="write a procedural data set")
    what = p.add_subparsers(dest="what", required=True, metavar="KIND")
    q = what.add_parser("shapes", help="the shapes world: images + captions.jsonl")
    q.add_argument("--count", type=int, required=True, help="number of images")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    q.add_argument("--overwrite", action="store_true", help="replace existing images and captions.jsonl")
    q.set_defaults(func=cmd_dataset)
