"""One fine-tuning flow for ``train-adapter`` and ``train-controlnet``: the settings every run has
(:class:`FineTuneConfig`), a prepared run (:class:`FineTuning`: the trainer of the objective whose sub-modules are what
is trained, an adapter or a ControlNet) and :func:`run_finetune`: refuse an existing output, prepare (resuming from
``work_dir/checkpoint.pt``), train with the reports — the loss curve and a sample grid every ``sample_every`` steps,
and a grid before the first step of a fresh run, to show where it starts — then save the EMA weights atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nijimi.embedded import EMBEDDED, embedded_path
from nijimi.errors import ConfigError
from nijimi.io.checkpoint import load_model
from nijimi.io.files import check_output
from nijimi.models.ldm import LatentDiffusion, ModelConfig
from nijimi.train.captions import ORIGINAL
from nijimi.train.data import ImageFolder
from nijimi.train.report import matplotlib_figure, write_grid, write_loss_curve
from nijimi.train.shapes import ConceptShapes, ShapesDataset
from nijimi.train.trainer import LoopConfig, OnStep, Trainer, check_fresh_start

SampleFn = Callable[..., list]
"""``sample_fn(model, prompts, steps, seed, **fields)`` → one image per prompt (``fields``: more generation request
fields, e.g. ``embeddings``); given by the caller (pipelines sit above)."""


@dataclass
class FineTuneConfig(LoopConfig):
    """The settings every fine-tuning run shares, on top of :class:`LoopConfig`; ``--key=value`` flags name them.

    ``out``: the file to write. ``work``: folder for the checkpoint, loss curve and sample grids (default: ``out``
    without its ending + ``-train``). ``base``: checkpoint file, diffusers folder or ``embedded``. ``data``: ``shapes``,
    ``shapes-<colour>`` (e.g. ``shapes-pink``) or a folder of captioned images; ``captions``: the phrasing of ``shapes``
    captions (``original`` or ``training``, :mod:`nijimi.train.captions`). ``size`` 0: the base model's native
    size. ``min_snr_gamma`` 0: plain MSE. ``half``: save float16. ``ema_decay`` > 0 saves the EMA weights.
    ``sample_every`` 0: no sample grids.
    """

    out: str = "out.safetensors"
    work: str = ""
    base: str = EMBEDDED
    data: str = "shapes"
    data_count: int = 64
    captions: str = ORIGINAL
    size: int = 0
    caption_dropout: float = 0.0
    min_snr_gamma: float = 5.0
    half: bool = False
    sample_every: int = 100
    sample_steps: int = 20
    steps: int = 500
    batch_size: int = 4
    warmup_steps: int = 20
    ema_decay: float = 0.0
    save_every: int = 100

    @property
    def work_dir(self) -> Path:
        out = Path(self.out)
        return Path(self.work) if self.work else out.with_name(out.stem + "-train")

    def image_size(self, config: ModelConfig) -> int:
        """The training image side: ``size`` or the native size of a model of ``config``, checked against its
        downscaling."""
        multiple = config.vae.downscale_factor * 2 ** (len(config.unet.channel_mult) - 1)
        size = self.size or config.unet.sample_size * config.vae.downscale_factor
        if size < multiple or size % multiple:
            raise ConfigError(f"image size {size} must be a positive multiple of {multiple} for this model")
        return size


def open_images(source: str, size: int, seed: int, count: int, split: str = "train", captions: str = ORIGINAL):
    """Training images at ``size``: ``shapes`` (``count`` scenes of ``split``, captions in phrasing ``captions``),
    ``shapes-<colour>`` (:class:`~nijimi.train.shapes.ConceptShapes`) or a folder of captioned images."""
    if source == "shapes":
        return ShapesDataset(size, seed, split, count, phrasing=captions)
    if source.startswith("shapes-"):
        return ConceptShapes(source.removeprefix("shapes-"), size, seed, count)
    return ImageFolder(source, size)


def load_base(source: str) -> LatentDiffusion:
    """The model at ``source`` (checkpoint file or diffusers folder), or the embedded model for ``"embedded"``."""
    model, _ = load_model(embedded_path() if source == EMBEDDED else source)
    return model


class TrainedPart(nn.Module):
    """What the trainer trains in a fine-tuning run: a module whose own parameters (an adapter's layers, an embedding's
    vectors) are all that checkpoints and the EMA hold; the frozen model's loss ``objective``, computed through them,
    stays outside its module tree."""

    def __init__(self, objective: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "objective", objective)  # a plain attribute: not part of state_dict()

    def forward(self, indices: list[int], generator: torch.Generator, part: slice) -> torch.Tensor:
        """The loss over ``indices[part]`` (see :class:`~nijimi.train.trainer.Trainer`)."""
        return self.objective(indices, generator, part)

    def train(self, mode: bool = True) -> TrainedPart:
        super().train(mode)
        self.objective.train(mode)
        return self


@dataclass
class FineTuning:
    """A prepared run: its settings and trainer. Each kind gives the loss curve's ``title``, its sample grid
    ``sample_grid(sample_fn) → (images, columns)`` and ``save(out, overwrite)``, which writes what was trained
    atomically, replacing an existing file only if ``overwrite``."""

    cfg: FineTuneConfig
    trainer: Trainer

    def write_samples(self, sample_fn: Callable) -> Path:
        """A sample grid with the EMA weights at the current step (live weights and training mode restored)."""
        with self.trainer.averaged_weights():
            images, cols = self.sample_grid(sample_fn)
        return write_grid(images, self.cfg.work_dir / f"samples-{self.trainer.step:06d}.png", cols)


def run_finetune(cfg: FineTuneConfig, prepare: Callable[[], FineTuning], *, resume: bool = False,
                 overwrite: bool = False, on_step: OnStep | None = None,
                 sample_fn: Callable | None = None) -> FineTuning:
    """Run the whole flow (see the module docstring); returns the finished run (``cfg.out`` written).

    Refused before any work unless ``overwrite``: an existing ``cfg.out``, and, unless ``resume``, an earlier run's
    checkpoint in the work folder (:func:`~nijimi.train.trainer.check_fresh_start`); ``prepare()`` builds the run
    (``resume``: from that checkpoint); sample grids are made only with ``sample_fn``.
    """
    matplotlib_figure()  # the loss plot's extra: checked before any work
    check_output(cfg.out, overwrite)
    check_output(cfg.work_dir, folder=True)
    check_fresh_start(cfg.work_dir, resume, overwrite)
    run = prepare()
    samples = (lambda: None) if sample_fn is None else (lambda: run.write_samples(sample_fn))

    def report(t: Trainer) -> None:
        write_loss_curve(t.losses, t.out_dir / "loss.png", run.title)
        samples()

    if cfg.sample_every and run.trainer.step == 0:
        samples()
    run.trainer.run(on_step=on_step, every=cfg.sample_every, report=report)
    run.trainer.ema.copy_to(run.trainer.module)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    run.save(out, overwrite)
    return run
