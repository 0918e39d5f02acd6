"""``nijimi train CONFIG.toml``: the whole recipe of a latent text-to-image model, stage by stage.

1. ``vae`` — the autoencoder on the training images; its latent scaling factor is then measured on the data.
2. ``unet`` — the U-Net (and, jointly, the text encoder) on the VAE's latents. Sample grids and the loss curve are
   written every ``sample_every`` steps.
3. export — one single-file checkpoint (EMA weights) that ``nijimi.load`` reads like any SD file.

A stage whose output file exists is done; ``--resume`` continues an interrupted stage from its checkpoint; without it
an earlier run's checkpoint, like an existing export, is replaced only with ``--overwrite``. With
``init`` (``--init MODEL``) an existing model is fine-tuned: the VAE stage is skipped and its networks are the start.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nijimi.diffusion.forward import timestep_weights
from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.errors import ConfigError
from nijimi.io.checkpoint import load_model, save_single
from nijimi.io.files import check_output
from nijimi.io.limits import check_model_fits
from nijimi.io.safetensors import load_file, read_metadata, save_file
from nijimi.models.ldm import LatentDiffusion, ModelConfig
from nijimi.models.vae import VAE
from nijimi.train.captions import DATA_PHRASINGS, ORIGINAL
from nijimi.train.config import Settings, build_config, check_settings, replace_config
from nijimi.train.data import ImageFolder
from nijimi.train.finetune import SampleFn
from nijimi.train.ldm import AutoencoderObjective, DiffusionObjective, measure_scaling_factor
from nijimi.train.report import matplotlib_figure, write_grid, write_loss_curve
from nijimi.train.shapes import TWO_OBJECTS, AnyColourShapes, ShapesDataset
from nijimi.train.trainer import LoopConfig, Trainer, check_fresh_start, open_trainer

StageStep = Callable[[str, Trainer, float, float], None]
"""``on_step(stage, trainer, loss, seconds)``: :data:`~nijimi.train.trainer.OnStep` with the stage's name."""


@dataclass
class RunConfig:
    """Top-level keys of a training recipe. ``model``: the architecture preset (tables ``[arch.unet]``, ``[arch.vae]``,
    ``[arch.text]`` change its fields); ``init``: fine-tune this model (checkpoint file or diffusers folder) instead;
    ``export``: the model file (default ``out/model.safetensors``); ``default_guidance``: the guidance scale the
    export names for generation (``ModelConfig.guidance``, measured with ``eval shapes --cfg``; 0 keeps ``init``'s,
    7 for a new model); ``two_objects`` and ``captions`` (the phrasing of :mod:`nijimi.train.captions`): shapes data
    only."""

    out: str = "runs/train"
    data: str = "shapes"
    data_count: int = 100_000
    two_objects: float = TWO_OBJECTS  # shapes data: fraction of scenes with two objects (the rest have one)
    captions: str = ORIGINAL  # shapes data: "original" (the first recipe's phrasing) or "training" (the wider one)
    size: int = 64
    seed: int = 0
    model: str = "tiny"
    init: str = ""
    prediction_type: str = "epsilon"
    beta_schedule: str = "scaled_linear"
    rescale_zero_terminal_snr: bool = False
    timestep_spacing: str = "leading"
    sample_every: int = 500
    sample_steps: int = 20
    sample_prompts: tuple = ("a red circle on the left", "a large blue square in the center",
                             "a small green triangle at the top", "a yellow star on the right")
    export: str = ""
    default_guidance: float = 0.0
    half: bool = True

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass
class VAEStage(LoopConfig):
    """Table ``[vae]``: the autoencoder stage's loop and its KL weight; ``any_colour`` (shapes data only): chance an
    object is drawn in a random colour (:class:`~nijimi.train.shapes.AnyColourShapes`)."""

    kl_weight: float = 1e-6
    any_colour: float = 0.0


@dataclass
class UNetStage(LoopConfig):
    """Table ``[unet]``: the U-Net stage's loop, its loss (``min_snr_gamma`` 0: plain MSE) and which networks learn
    (``train_unet`` off: the text encoder alone, fine-tuning an ``init`` model on new captions);
    ``timestep_bias_*``: diffusers' options (:func:`nijimi.diffusion.forward.timestep_weights`)."""

    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    train_text_encoder: bool = True
    train_unet: bool = True
    timestep_bias_strategy: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = NoiseSchedule.num_train_timesteps

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.train_unet or self.train_text_encoder):
            raise ConfigError("unet.train_unet and unet.train_text_encoder are both false: nothing would learn")
        # a bad bias setting fails when the config is read, not after the VAE stage
        self.timestep_weights(NoiseSchedule.num_train_timesteps)

    def timestep_weights(self, num_timesteps: int) -> torch.Tensor | None:
        return timestep_weights(num_timesteps, self.timestep_bias_strategy, self.timestep_bias_multiplier,
                                self.timestep_bias_portion, self.timestep_bias_begin, self.timestep_bias_end)


_ARCH_KEYS = ("arch.unet.", "arch.vae.", "arch.text.")


def parse_config(values: dict) -> tuple[RunConfig, VAEStage, UNetStage, dict[str, dict]]:
    """Split flat config keys into the run, the two stages and architecture overrides (``arch.unet.*`` …)."""
    settings = values if isinstance(values, Settings) else Settings(values)
    prefixes = (*_ARCH_KEYS, "vae.", "unet.")
    groups = {p: settings.section(p) for p in prefixes}
    groups[""] = settings.section("")
    for key in [k for k in groups[""] if k.startswith(prefixes)]:
        del groups[""][key]
    arch = {k.split(".")[1]: groups[k] for k in _ARCH_KEYS}
    run, vae, unet = (build_config(cls, groups[k]) for cls, k in ((RunConfig, ""), (VAEStage, "vae."),
                                                                  (UNetStage, "unet.")))
    for name, stage in (("vae", vae), ("unet", unet)):
        if stage.steps < 1:
            raise ConfigError(f"{name}.steps = {stage.steps}: a stage needs at least one step")
    if vae.any_colour and run.data != "shapes":
        raise ConfigError(f"vae.any_colour = {vae.any_colour} recolours shapes scenes; data {run.data!r} is a folder "
                          "of images (set it to 0)")
    if run.two_objects != TWO_OBJECTS and run.data != "shapes":
        raise ConfigError(f"two_objects = {run.two_objects} sets the shapes world's scenes; data {run.data!r} is a "
                          "folder of images (remove it)")
    if run.captions not in DATA_PHRASINGS:
        raise ConfigError(f"captions = {run.captions!r}: expected one of {', '.join(DATA_PHRASINGS)}")
    check_model_fits(model_config(run, arch), settings.source or "training config", error=ConfigError)
    return run, vae, unet, arch


def model_config(run: RunConfig, arch: dict[str, dict], scaling_factor: float | None = None) -> ModelConfig:
    """The preset ``run.model`` with ``arch`` field overrides, the run's schedule and the measured scaling factor."""
    base = ModelConfig.preset(run.model)
    unet = replace_config(base.unet, arch["unet"])
    vae = replace_config(base.vae, arch["vae"])
    text = replace_config(base.text, arch["text"])
    if scaling_factor is not None:
        vae = dataclasses.replace(vae, scaling_factor=scaling_factor)
    schedule = NoiseSchedule(beta_schedule=run.beta_schedule, prediction_type=run.prediction_type,
                             rescale_zero_terminal_snr=run.rescale_zero_terminal_snr,
                             timestep_spacing=run.timestep_spacing)
    return dataclasses.replace(base, unet=dataclasses.replace(unet, context_dim=text.width), vae=vae, text=text,
                               schedule=schedule)


def open_data(run: RunConfig):
    """The training set: the procedural shapes world, or a folder of captioned images."""
    if run.data == "shapes":
        return ShapesDataset(size=run.size, seed=run.seed, split="train", count=run.data_count,
                             two_objects=run.two_objects, phrasing=run.captions)
    return ImageFolder(run.data, run.size)


def train_vae(run: RunConfig, stage: VAEStage, arch: dict, data, resume: bool, on_step: StageStep | None) -> Path:
    """Stage 1; writes ``out/vae.safetensors`` (EMA weights) with the measured scaling factor in its metadata."""
    out = Path(run.out)
    path = out / "vae.safetensors"
    if path.is_file():
        return path
    torch.manual_seed(run.seed)  # the modules' initialisers draw from the global generator
    vae = VAE(model_config(run, arch).vae)
    images = AnyColourShapes(data, stage.any_colour) if stage.any_colour else data
    trainer = open_trainer(AutoencoderObjective(vae, images, stage.kl_weight), len(images), stage, out / "vae", resume)
    trainer.run(on_step=None if on_step is None else lambda t, loss, s: on_step("vae", t, loss, s))
    trainer.ema.copy_to(trainer.module)
    scale = measure_scaling_factor(vae, data)
    save_file(vae.state_dict(), path, metadata={"scaling_factor": repr(scale)}, overwrite=False)
    write_loss_curve(trainer.losses, out / "vae-loss.png", "VAE")
    return path


def _initial_model(run: RunConfig, arch: dict, vae_path: Path | None) -> LatentDiffusion:
    if run.init:
        model, _ = load_model(run.init)
        return model
    scale = float(read_metadata(vae_path)["scaling_factor"])
    torch.manual_seed(run.seed + 1)
    model = LatentDiffusion(model_config(run, arch, scale))
    model.vae.load_state_dict(load_file(vae_path))
    return model


def train_unet(run: RunConfig, stage: UNetStage, arch: dict, data, vae_path: Path | None, resume: bool,
               on_step: StageStep | None, sample_fn: SampleFn | None) -> LatentDiffusion:
    """Stage 2; returns the model with the EMA weights of the U-Net and text encoder."""
    out = Path(run.out)
    model = _initial_model(run, arch, vae_path)
    objective = DiffusionObjective(model, data, caption_dropout=stage.caption_dropout,
                                   min_snr_gamma=stage.min_snr_gamma or None,
                                   train_text_encoder=stage.train_text_encoder, train_unet=stage.train_unet,
                                   timestep_weights=stage.timestep_weights(model.config.schedule.num_train_timesteps))
    trainer = open_trainer(objective, len(data), stage, out / "unet", resume)

    stage_step = None if on_step is None else lambda t, loss, s: on_step("unet", t, loss, s)
    trainer.run(on_step=stage_step, every=run.sample_every, report=lambda t: _report(run, t, model, out, sample_fn))
    trainer.ema.copy_to(trainer.module)
    return model


def _report(run: RunConfig, trainer: Trainer, model: LatentDiffusion, out: Path, sample_fn: SampleFn | None) -> None:
    """Loss curve and a sample grid made with the EMA weights."""
    write_loss_curve(trainer.losses, out / "loss.png", "U-Net")
    if sample_fn is not None:
        with trainer.averaged_weights():
            images = sample_fn(model, list(run.sample_prompts), run.sample_steps, run.seed)
        write_grid(images, out / f"samples-{trainer.step:06d}.png")


def init_distributed() -> int:
    """Join the process group when started by ``torchrun`` (gloo on CPU, nccl on GPUs); returns this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def check_outputs(run: RunConfig, resume: bool, overwrite: bool) -> Path:
    """The export's path, after refusing before any work what would replace a file (unless ``overwrite``): an
    existing export, and, unless ``resume``, the checkpoint of an earlier run of a stage that would run again."""
    out = check_output(run.out, folder=True)
    target = check_output(Path(run.export) if run.export else out / "model.safetensors", overwrite)
    if not (run.init or (out / "vae.safetensors").is_file()):
        check_fresh_start(out / "vae", resume, overwrite)
    check_fresh_start(out / "unet", resume, overwrite)
    return target


def run_training(values: dict, resume: bool = False, on_step: StageStep | None = None,
                 sample_fn: SampleFn | None = None, overwrite: bool = False) -> Path:
    """Run every stage of the recipe ``values`` (flat keys: a TOML file read with
    :func:`~nijimi.train.config.read_toml`, command-line flags); returns the exported single-file model, which
    replaces an existing file only if ``overwrite`` (:func:`check_outputs`).

    Under ``torchrun`` every rank trains on its slice of each batch; rank 0 alone shows progress, makes sample
    grids and writes checkpoints and the export (the stage files, identical on every rank, are written atomically).
    """
    matplotlib_figure()  # the loss plot's extra: checked before any work
    rank = init_distributed()
    if rank != 0:
        on_step, sample_fn = None, None
    run, vae_stage, unet_stage, arch = parse_config(values)
    target = check_outputs(run, resume, overwrite)
    data = open_data(run)
    vae_path = None if run.init else train_vae(run, vae_stage, arch, data, resume, on_step)
    model = train_unet(run, unet_stage, arch, data, vae_path, resume, on_step, sample_fn)
    if run.default_guidance:
        model.set_config(dataclasses.replace(model.config, guidance=run.default_guidance))
    if rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_single(model, target, half=run.half, overwrite=overwrite)
    return target
