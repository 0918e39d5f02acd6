"""``nijimi train-controlnet``: teach a ControlNet (Zhang, Rao & Agrawala, arXiv:2302.05543) to steer a locked model.

1. Load the base model (a checkpoint file, a diffusers folder or ``"embedded"``) and lock it: the U-Net, VAE and text
   encoder are frozen and stay outside the trained module, so checkpoints and the optimiser hold the ControlNet alone.
2. Initialise the ControlNet as the paper does (§3.2): the base U-Net's encoder copied, zero convolutions at zero, so
   training starts from exactly the base model's output. Its hint encoder takes maps at image size to latent size
   (three stride-2 levels for SD's factor 8, two for the embedded model's 4).
3. Train it on the diffusion loss through the locked U-Net: noise an image's latent at a random step, run the
   ControlNet on (x_t, t, caption, condition map), add its residuals to the U-Net's skips and minimise the MSE to ε
   (or v). Captions are dropped to "" with probability ``caption_dropout`` (the paper replaces 50 % of the prompts,
   §3.3, so the ControlNet learns to read the map by itself), in the fine-tuning flow
   (:func:`~nijimi.train.finetune.run_finetune`; sample grids: maps above, samples below).
4. Save it in the original layout (``control_model.*`` keys, :func:`nijimi.io.controlnet.save_original`), which
   A1111, ComfyUI, diffusers' ``from_single_file`` and ``nijimi generate --control`` read.

Conditions (:class:`ControlPairs`): ``mask`` — object silhouettes, white on black: for the shapes world exactly from
the scene geometry (:func:`scene_mask`), for a folder the image's own mask (``.mask.png`` or alpha) or else its
non-white pixels (:func:`foreground`); any other name is a preprocessor run on the training image (``canny``,
``invert``, ``map``), supplied by the caller as ``preprocess`` because the preprocessors live in the pipeline layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from nijimi.diffusion.forward import diffusion_loss
from nijimi.errors import ConfigError
from nijimi.io.controlnet import save_original
from nijimi.models.controlnet import HINT_WIDTHS, ControlNetModel
from nijimi.models.ldm import LatentDiffusion, ModelConfig
from nijimi.train.finetune import FineTuneConfig, FineTuning, load_base, open_images, run_finetune
from nijimi.train.ldm import draw_diffusion_batch
from nijimi.train.shapes import COLOURS, Scene, ShapesDataset, render
from nijimi.train.trainer import OnStep, open_trainer

MASK = "mask"
FOREGROUND_LEVEL = 96
"""A pixel is foreground when its darkest channel lies this far below white: half the depth of the palest shapes
colour (purple, darkest channel 64), so every shape is cut at about half coverage."""

Preprocess = Callable[[Image.Image], Image.Image]
ControlSampleFn = Callable[[LatentDiffusion, ControlNetModel, list[str], list[torch.Tensor], int, int], list]
"""``sample_fn(base, controlnet, prompts, maps (1, 3, S, S) each, steps, seed)`` → one image per prompt; given by the
caller (the pipeline layer sits above)."""


# ---- condition maps -----------------------------------------------------------------------------------------------

def scene_mask(scene: Scene, size: int) -> np.ndarray:
    """Silhouettes of a shapes scene: (size, size) float64 in [0, 1], each object's anti-aliased coverage.

    Read back from rendering each object alone on white: a pixel of colour ``c`` at coverage α is ``255 + α(c − 255)``,
    solved on the channel where ``c`` is darkest (exact to the renderer's rounding, under 1/380).
    """
    mask = np.zeros((size, size))
    for obj in scene.objects:
        colour = COLOURS[obj.colour]
        channel = int(np.argmin(colour))
        alone = render(Scene((obj,)), size)[..., channel].astype(np.float64)
        mask += (255.0 - alone) / (255.0 - colour[channel])
    return np.clip(mask, 0.0, 1.0)


def foreground(image: np.ndarray, level: float = FOREGROUND_LEVEL) -> np.ndarray:
    """Non-white pixels of a uint8 RGB image (H, W, 3) → bool (H, W): darkest channel ≤ 255 − ``level``."""
    return image.min(axis=2).astype(np.float64) <= 255.0 - level


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A training image (3, H, W) in [-1, 1] → uint8 (H, W, 3) (the exact inverse of ``pixel / 127.5 − 1``)."""
    return ((image.detach().float() + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


class ControlPairs:
    """Training triples from a captioned data set: ``pairs[i]`` → (image (3, S, S) in [-1, 1], caption, condition map
    (3, S, S) float32 in [0, 1]) for ``condition`` ``"mask"`` or a preprocessor name (with ``preprocess``)."""

    def __init__(self, data, condition: str = MASK, preprocess: Preprocess | None = None) -> None:
        if condition != MASK and preprocess is None:
            raise ConfigError(f"condition {condition!r} needs its preprocessor (only {MASK!r} is built in)")
        self.data, self.condition, self.preprocess = data, condition, preprocess

    def __len__(self) -> int:
        return len(self.data)

    def silhouette(self, index: int, sample: tuple) -> np.ndarray:
        """Object mask (S, S) in [0, 1] of example ``index``: scene geometry, the sample's mask, or its foreground."""
        if isinstance(self.data, ShapesDataset):
            return scene_mask(self.data.scene(index), self.data.size)
        if len(sample) > 2 and sample[2] is not None:
            return sample[2][0].double().numpy()
        return foreground(to_uint8(sample[0])).astype(np.float64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, torch.Tensor]:
        sample = self.data[index]
        if self.condition == MASK:
            hint = torch.from_numpy(self.silhouette(index, sample)).float().expand(3, -1, -1)
        else:
            picture = self.preprocess(Image.fromarray(to_uint8(sample[0]))).convert("RGB")
            hint = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return sample[0], sample[1], hint.contiguous()


# ---- the objective ------------------------------------------------------------------------------------------------

class ControlNetObjective(nn.Module):
    """The ControlNet is this module's only sub-module (checkpoints, EMA and optimiser hold it alone); the locked base
    model is a plain attribute, in eval mode without gradients. ``min_snr_gamma`` None: plain MSE (the paper's)."""

    def __init__(self, controlnet: ControlNetModel, base: LatentDiffusion, data: ControlPairs, *,
                 caption_dropout: float = 0.5, min_snr_gamma: float | None = None) -> None:
        super().__init__()
        self.controlnet = controlnet
        object.__setattr__(self, "base", base.eval().requires_grad_(False))  # not part of state_dict()
        self.tokenizer = base.config.tokenizer()
        self.data, self.caption_dropout, self.min_snr_gamma = data, caption_dropout, min_snr_gamma

    def forward(self, indices: list[int], generator: torch.Generator, part: slice) -> torch.Tensor:
        """The loss over ``indices[part]``, with the random draws of :func:`~nijimi.train.ldm.draw_diffusion_batch`
        (those of :class:`~nijimi.train.ldm.DiffusionObjective`)."""
        items = [self.data[i] for i in indices[part]]
        images, hints = torch.stack([it[0] for it in items]), torch.stack([it[2] for it in items])
        base, schedule = self.base, self.base.config.schedule
        with torch.no_grad():
            batch = draw_diffusion_batch(generator, len(indices), part, base.vae.encode(images),
                                         base.config.vae.scaling_factor, schedule, caption_dropout=self.caption_dropout)
            captions = ["" if d else it[1] for d, it in zip(batch.drop, items, strict=True)]
            context = base.text_encoder(self.tokenizer(captions))
        down, mid = self.controlnet(batch.x_t, batch.t, context, hints)
        pred = base.unet(batch.x_t, batch.t, context, down_residuals=down, mid_residual=mid)
        loss, _ = diffusion_loss(pred, batch.target, batch.t, schedule, min_snr_gamma=self.min_snr_gamma)
        return loss


def hint_widths_for(config: ModelConfig) -> tuple[int, ...]:
    """The hint encoder's level widths for a model whose VAE downscales by ``f``: the first ``log2(f) + 1`` of SD's
    (16, 32, 96, 256), so the map at image size lands at latent size."""
    f = config.vae.downscale_factor
    levels = round(math.log2(f)) + 1
    if 2 ** (levels - 1) != f or levels > len(HINT_WIDTHS):
        raise ConfigError(f"a ControlNet needs a VAE factor of 1, 2, 4 or 8, this model's is {f}")
    return HINT_WIDTHS[:levels]


# ---- the run ------------------------------------------------------------------------------------------------------

@dataclass
class ControlNetTrainConfig(FineTuneConfig):
    """Every setting of a ControlNet run, on top of :class:`FineTuneConfig`.

    ``condition``: ``mask`` or a preprocessor (``canny`` with thresholds ``low``/``high``, ``invert``, ``map``).
    ``sample_count``: maps in a sample grid (held-out shapes scenes, or the first training examples of a folder).
    """

    out: str = "controlnet.safetensors"
    data_count: int = 100_000
    condition: str = MASK
    low: float = 100.0
    high: float = 200.0
    caption_dropout: float = 0.5
    min_snr_gamma: float = 0.0
    sample_every: int = 250
    sample_count: int = 4
    steps: int = 2000
    batch_size: int = 8
    warmup_steps: int = 50
    save_every: int = 250

    def __post_init__(self) -> None:
        super().__post_init__()
        if not str(self.out).lower().endswith(".safetensors"):
            raise ConfigError(f"out {self.out!r}: ControlNets are written as .safetensors; choose a name ending in it")


def open_pairs(cfg: ControlNetTrainConfig, config: ModelConfig, preprocess: Preprocess | None = None,
               split: str = "train") -> ControlPairs:
    """The training triples (``split`` ``"heldout"``: held-out shapes scenes, for samples and evaluation)."""
    images = open_images(cfg.data, cfg.image_size(config), cfg.seed,
                         cfg.data_count if split == "train" else cfg.sample_count, split)
    return ControlPairs(images, cfg.condition, preprocess)


def map_image(hint: torch.Tensor) -> Image.Image:
    """A condition map (3, S, S) in [0, 1] as an RGB image, for grids."""
    return Image.fromarray((hint.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@dataclass
class ControlNetTraining(FineTuning):
    """A prepared run: the locked base, the ControlNet, the training and sample triples, and the trainer."""

    base: LatentDiffusion
    controlnet: ControlNetModel
    data: ControlPairs
    samples: ControlPairs

    title = "ControlNet"

    def sample_grid(self, sample_fn: ControlSampleFn) -> tuple[list, int]:
        """The sample maps (top row) and what the model makes of them with their captions (bottom row)."""
        triples = [self.samples[i] for i in range(min(self.cfg.sample_count, len(self.samples)))]
        images = sample_fn(self.base, self.controlnet, [c for _, c, _ in triples], [h[None] for _, _, h in triples],
                           self.cfg.sample_steps, self.cfg.seed)
        return [map_image(h) for _, _, h in triples] + list(images), len(triples)

    def save(self, out: Path, overwrite: bool = False) -> None:
        """The ControlNet in the original layout (``control_model.*`` keys); an existing ``out`` is replaced only if
        ``overwrite``."""
        save_original(self.controlnet, out, half=self.cfg.half, overwrite=overwrite)


def prepare_training(cfg: ControlNetTrainConfig, preprocess: Preprocess | None = None,
                     base: LatentDiffusion | None = None, resume: bool = False) -> ControlNetTraining:
    """Load (or take) the base model, open the data, initialise the ControlNet from the base U-Net (hint encoder drawn
    from ``cfg.seed``), build the trainer; with ``resume``, continue from ``work_dir/checkpoint.pt`` if it exists."""
    base = load_base(cfg.base) if base is None else base
    data = open_pairs(cfg, base.config, preprocess)
    samples = open_pairs(cfg, base.config, preprocess, "heldout") if cfg.data == "shapes" else data
    controlnet = ControlNetModel.from_unet(base.unet, 3, hint_widths_for(base.config),
                                           torch.Generator().manual_seed(cfg.seed))
    objective = ControlNetObjective(controlnet, base, data, caption_dropout=cfg.caption_dropout,
                                    min_snr_gamma=cfg.min_snr_gamma or None)
    trainer = open_trainer(objective, len(data), cfg, cfg.work_dir, resume,
                           "holds a ControlNet for another base model")
    return ControlNetTraining(cfg, trainer, base, controlnet, data, samples)


def train_controlnet(cfg: ControlNetTrainConfig, *, preprocess: Preprocess | None = None, resume: bool = False,
                     overwrite: bool = False, on_step: OnStep | None = None, sample_fn: ControlSampleFn | None = None,
                     base: LatentDiffusion | None = None) -> ControlNetTraining:
    """Run the whole recipe (see the module docstring) with :func:`run_finetune`; returns the finished run.

    ``preprocess`` makes the condition maps for a ``condition`` other than ``mask``; ``base`` replaces loading
    ``cfg.base``. Sample grids (with ``sample_fn``) are made at step 0 — where the ControlNet does nothing yet — and
    every ``sample_every`` steps.
    """
    return run_finetune(cfg, lambda: prepare_training(cfg, preprocess, base, resume), resume=resume,
                        overwrite=overwrite, on_step=on_step, sample_fn=sample_fn)
