"""The CLI side of ControlNet: ``nijimi train-controlnet`` and the infotext of ``generate --control …``.

``cli.build_parser`` adds ``train-controlnet`` with :func:`add_control_parsers`; ``generate``'s ``--control`` comes
from the generation request (:mod:`nijimi.pipelines.request`), its A1111 infotext from :func:`control_infotext`;
``eval control`` lives in ui/eval.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from nijimi.embedded import CONTROLNET, CONTROLNET_NAME
from nijimi.errors import ConfigError
from nijimi.io.find import legacy_model_hash
from nijimi.models.controlnet import ControlNetModel
from nijimi.models.ldm import LatentDiffusion
from nijimi.pipelines.control import ControlUnit
from nijimi.pipelines.control_maps import PREPROCESSORS, preprocess
from nijimi.pipelines.infotext import CONTROL_MODES, CONTROL_MODULES, CONTROL_RESIZE_MODES
from nijimi.pipelines.pipeline import Pipeline
from nijimi.train.config import build_config
from nijimi.train.controlnet import MASK, ControlNetTrainConfig, Preprocess, train_controlnet
from nijimi.ui.progress import TrainingProgress
from nijimi.ui.train import add_finetune_parser, config_values

_MODULES = {pre: name for name, pre in CONTROL_MODULES.items()}
_RESIZE_MODES = {**{mode: name for name, mode in CONTROL_RESIZE_MODES.items()}, "none": "None"}


def control_infotext(entries: list[dict] | None) -> dict[str, str]:
    """A1111's ControlNet extension's infotext items, ``{"ControlNet 0": "Module: canny, Model: name [hash], Weight:
    1, …"}``, one per entry of a generation's ``control`` settings (specs' fields, or a unit's
    scale/start/end/guess_mode)."""
    items = {}
    for i, entry in enumerate(entries or ()):
        guess = entry.get("guess", entry.get("guess_mode", False))
        fields = {"Module": _MODULES.get(entry.get("pre", "map"), entry.get("pre")),
                  "Model": _model_title(entry["model"]) if "model" in entry else None,
                  "Weight": entry["scale"], "Resize Mode": _RESIZE_MODES.get(entry.get("resize", "resize")),
                  "Threshold A": entry.get("low"), "Threshold B": entry.get("high"),
                  "Guidance Start": entry["start"], "Guidance End": entry["end"],
                  "Control Mode": CONTROL_MODES[2] if guess else CONTROL_MODES[0]}
        items[f"ControlNet {i}"] = ", ".join(f"{k}: {_number(v)}" for k, v in fields.items() if v is not None)
    return items


def _model_title(model: str) -> str:
    """A ControlNet as the extension names it: ``name [legacy hash]`` (the embedded one as
    :data:`~nijimi.embedded.CONTROLNET_NAME`), the name alone when the file is not there to hash."""
    path = Path(model)
    name = CONTROLNET_NAME if path == CONTROLNET else path.stem
    return f"{name} [{legacy_model_hash(path)}]" if path.is_file() else name


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
