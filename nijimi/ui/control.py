"""The CLI side of ControlNet: ``generate --control …`` and ``nijimi train-controlnet`` (``eval control``: ui/eval.py).

``cli.build_parser`` adds ``train-controlnet`` with :func:`add_control_parsers`; ``generate`` takes
:func:`add_control_argument`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from PIL import Image

from nijimi.embedded import CONTROLNET
from nijimi.errors import ConfigError, NijimiError
from nijimi.models.controlnet import ControlNetModel
from nijimi.models.ldm import LatentDiffusion
from nijimi.pipelines.control import ControlUnit
from nijimi.pipelines.control_maps import PREPROCESSORS, ControlSpec, parse_control_spec, preprocess
from nijimi.pipelines.pipeline import EMBEDDED, Pipeline
from nijimi.train.config import build_config
from nijimi.train.controlnet import MASK, ControlNetTrainConfig, Preprocess, train_controlnet
from nijimi.ui.progress import TrainingProgress
from nijimi.ui.train import add_finetune_parser, config_values

CONTROL_HELP = ("steer with a ControlNet: model=PATH|embedded,image=IMG[,scale=1][,pre=map|invert|canny]"
                "[,low=100,high=200][,start=0][,end=1][,resize=resize|crop|fill|none][,guess=false]; "
                "repeat for several")
_MODULES = {"map": "none", "invert": "invert", "canny": "canny"}
_RESIZE_MODES = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill", "none": "None"}


def add_control_argument(p: argparse.ArgumentParser) -> None:
    """``--control SPEC`` (repeatable) on a generating command."""
    p.add_argument("--control", action="append", default=[], metavar="SPEC", help=CONTROL_HELP)


def controlnet_source(model: str) -> str:
    """A ControlNet file or folder named on the command line, as an absolute path; ``embedded`` is the embedded
    model's demo ControlNet (:data:`nijimi.embedded.CONTROLNET`)."""
    return str(CONTROLNET if model == EMBEDDED else Path(model).absolute())


def control_specs(texts: list[str] | None) -> list[ControlSpec]:
    """Parse each ``--control`` flag (:func:`parse_control_spec`); file paths are made absolute so that the recipe
    stored in the PNG names them from anywhere."""
    specs = [parse_control_spec(text) for text in texts or ()]
    return [dataclasses.replace(s, model=controlnet_source(s.model), image=str(Path(s.image).absolute()))
            for s in specs]


def specs_from_recipe(entries: list | None, source: str) -> list[ControlSpec]:
    """The ``control`` entries of a nijimi recipe back as specs (``reproduce``); anything else raises
    :class:`NijimiError` naming ``source``."""
    try:
        return [ControlSpec(**entry) for entry in entries or ()]
    except TypeError as exc:
        raise NijimiError(f"{source}: recipe control entry is not a --control spec ({exc})") from None


def control_infotext(entries: list[dict] | None) -> dict[str, str]:
    """A1111's ControlNet extension's infotext items, ``{"ControlNet 0": "Module: canny, Model: name, Weight: 1, …"}``,
    one per entry of a generation's ``control`` settings (specs' fields, or a unit's scale/start/end/guess_mode)."""
    items = {}
    for i, entry in enumerate(entries or ()):
        guess = entry.get("guess", entry.get("guess_mode", False))
        fields = {"Module": _MODULES.get(entry.get("pre", "map"), entry.get("pre")),
                  "Model": Path(entry["model"]).stem if "model" in entry else None,
                  "Weight": entry["scale"], "Resize Mode": _RESIZE_MODES.get(entry.get("resize", "resize")),
                  "Threshold A": entry.get("low"), "Threshold B": entry.get("high"),
                  "Guidance Start": entry["start"], "Guidance End": entry["end"],
                  "Control Mode": "ControlNet is more important" if guess else "Balanced"}
        items[f"ControlNet {i}"] = ", ".join(f"{k}: {_number(v)}" for k, v in fields.items() if v is not None)
    return items


def _number(value: object) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


# ---- train-controlnet ---------------------------------------------------------------------------------------------

CONDITIONS = (MASK, *PREPROCESSORS)


def condition_preprocess(condition: str, low: float = 100, high: float = 200) -> Preprocess | None:
    """The map maker of a training ``condition``: None for ``mask`` (built into the training data), else the
    preprocessor of that name (canny with thresholds ``low``/``high``, checked here, before any work)."""
    if condition not in CONDITIONS:
        raise ConfigError(f"unknown condition {condition!r}; choose one of {', '.join(CONDITIONS)}")
    if condition == MASK:
        return None
    preprocess(Image.new("RGB", (8, 8)), condition, low, high)
    return lambda image: preprocess(image, condition, low, high)


def sample_control_images(base: LatentDiffusion, controlnet: ControlNetModel, prompts: list[str],
                          maps: list[torch.Tensor], steps: int, seed: int) -> list:
    """One image per prompt and map (seeds seed, seed+1, …), default sampler: the sample grids of a training run."""
    pipe = Pipeline(base)
    return [pipe.generate(p, steps=steps, seed=seed + i, width=m.shape[3], height=m.shape[2],
                          control=[ControlUnit(controlnet, m)]).images[0]
            for i, (p, m) in enumerate(zip(prompts, maps, strict=True))]


def cmd_train_controlnet(args: argparse.Namespace) -> int:
    cfg = build_config(ControlNetTrainConfig, config_values(args))
    maker = condition_preprocess(cfg.condition, cfg.low, cfg.high)
    with TrainingProgress(args.quiet) as progress:
        train_controlnet(cfg, preprocess=maker, resume=args.resume, overwrite=args.overwrite,
                         on_step=progress.stage(f"train controlnet ({cfg.condition})"),
                         sample_fn=None if args.no_samples else sample_control_images)
    print(cfg.out)
    return 0


def add_control_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``train-controlnet`` to the ``nijimi`` command's sub-commands (``cli.build_parser`` calls it)."""
    add_finetune_parser(sub, "train-controlnet", "train a ControlNet that steers a locked model with condition maps",
                        ControlNetTrainConfig, cmd_train_controlnet)
