"""``nijimi train-controlnet``: teach a ControlNet (Zhang, Rao & Agrawala, arXiv:2302.05543) to steer a locked model.

1. Load the base model (a checkpoint file, a diffusers folder or ``"embedded"``) and lock it: the U-Net, VAE and text
   encoder are frozen and stay outside the trained module, so checkpoints and the optimiser hold the ControlNet alone.
2. Initialise the ControlNet as the paper does (§3.2): the base U-Net's encoder copied, zero convolutions at zero, so
   training starts from exactly the base model's output. Its hint encoder takes maps at image size to latent size
   (three stride-2 levels for SD's factor 8, two for the embedded model's 4).
3. Train it on the diffusion loss through the locked U-Net: noise an image's latent at a random step, run the
   ControlNet on (x_t, t, caption, condition map), add its residuals to the U-Net's skips and minimise the MSE to ε
   (or v). Captions are dropped to "" with probability ``caption_dropout`` (the paper replaces 50 % of the prompts,
   §3.3, so the ControlNet learns to read the map by itself). The shared :class:`~nijimi.train.trainer.Trainer`
   gives progress, atomic checkpoints and bit-exact resume; loss curves and sample grids (maps above, samples below)
   go to the work folder.
4. Save it in the original layout (``control_model.*`` keys, :func:`nijimi.io.controlnet.save_original`), which
   A1111, ComfyUI, diffusers' ``from_single_file`` and ``nijimi generate --control`` read.

Conditions (:class:`ControlPairs`): ``mask`` — object silhouettes, white on black: for the shapes world exactly from
the scene geometry (:func:`scene_mask`), for a folder the image's own mask (``.mask.png`` or alpha) or else its
non-white pixels (:func:`foreground`); any other name is a preprocessor run on the training image (``canny``,
``invert``, ``map``), supplied by the caller as ``preprocess`` because the preprocessors live in the pipeline layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from nijimi.diffusion.forward import diffusion_loss, q_sample, training_target
from nijimi.errors import CheckpointError, ConfigError
from nijimi.io.controlnet import save_original
from nijimi.models.controlnet import HINT_WIDTHS, ControlNetModel
from nijimi.models.ldm import LatentDiffusion, ModelConfig
from nijimi.train.adapter import EMBEDDED, load_base
from nijimi.train.data import ImageFolder
from nijimi.train.detect import ATTRIBUTES, Score, score
from nijimi.train.report import run_with_reports, write_grid
from nijimi.train.shapes import COLOURS, Scene, ShapesDataset, render
from nijimi.train.trainer import LoopConfig, Trainer

MASK = "mask"
FOREGROUND_LEVEL = 96
"""A pixel is foreground when its darkest channel lies this far below white: half the depth of the palest shapes
colour (purple, darkest channel 64), so every shape is cut at about half coverage."""

Preprocess = Callable[[Image.Image], Image.Image]
OnStep = Callable[[Trainer, float, float], None]
# sample_fn(base, controlnet, prompts, maps (1, 3, S, S) each, steps, seed) -> one image per prompt; given by the
# caller (the pipeline layer sits above).
SampleFn = Callable[[LatentDiffusion, ControlNetModel, list[str], list[torch.Tensor], int, int], list]


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


def shape_coverage(image: np.ndarray) -> np.ndarray:
    """Per pixel of a uint8 RGB shapes image (H, W, 3), the coverage α in [0, 1] of the palette colour that explains
    it best as white mixed with it: least squares over RGB, ``α_c = ⟨255 − p, 255 − c⟩ / |255 − c|²``, for the colour
    ``c`` with the smallest residual. Exact on rendered scenes; tolerant of a generated image's colour drift."""
    depth = 255.0 - image.astype(np.float64)
    colours = 255.0 - np.array(list(COLOURS.values()), dtype=np.float64)
    alphas = depth @ colours.T / (colours**2).sum(axis=1)
    residual = ((depth[..., None, :] - alphas[..., None] * colours) ** 2).sum(axis=-1)
    best = np.take_along_axis(alphas, residual.argmin(axis=-1)[..., None], axis=-1)[..., 0]
    return np.clip(best, 0.0, 1.0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A training image (3, H, W) in [-1, 1] → uint8 (H, W, 3) (the exact inverse of ``pixel / 127.5 − 1``)."""
    return ((image.detach().float() + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (H, W); 1 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


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
        """The loss over ``indices[part]``; random draws as :class:`~nijimi.train.ldm.DiffusionObjective` makes them
        (latent sample, timestep, noise, caption dropout), for the whole global batch."""
        items = [self.data[i] for i in indices[part]]
        images, hints = torch.stack([it[0] for it in items]), torch.stack([it[2] for it in items])
        base, schedule, n = self.base, self.base.config.schedule, len(indices)
        with torch.no_grad():
            posterior = base.vae.encode(images)
            x0_shape = (n, *posterior.mean.shape[1:])
            z_eps = torch.randn(x0_shape, generator=generator)[part]
            t = torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator)[part]
            noise = torch.randn(x0_shape, generator=generator)[part]
            drop = (torch.rand(n, generator=generator) < self.caption_dropout)[part]
            x0 = (posterior.mean + posterior.std * z_eps) * base.config.vae.scaling_factor
            captions = ["" if d else it[1] for d, it in zip(drop.tolist(), items, strict=True)]
            context = base.text_encoder(self.tokenizer(captions))
            x_t = q_sample(x0, t, noise, schedule)
        down, mid = self.controlnet(x_t, t, context, hints)
        pred = base.unet(x_t, t, context, down_residuals=down, mid_residual=mid)
        loss, _ = diffusion_loss(pred, training_target(x0, noise, t, schedule), t, schedule,
                                 min_snr_gamma=self.min_snr_gamma)
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
class ControlNetTrainConfig(LoopConfig):
    """Every setting of a ControlNet run (``--key=value`` overrides name these fields), on top of :class:`LoopConfig`.

    ``condition``: ``mask`` or a preprocessor (``canny`` with thresholds ``low``/``high``, ``invert``, ``map``).
    ``size`` 0: the base model's native size. ``work``: checkpoint, loss curve and sample grids (default: ``out``
    without its ending + ``-train``). ``min_snr_gamma`` 0: plain MSE. ``sample_count``: maps in a sample grid (held-out
    shapes scenes, or the first training examples of a folder). ``ema_decay`` > 0 saves the EMA weights.
    """

    out: str = "controlnet.safetensors"
    work: str = ""
    base: str = EMBEDDED
    data: str = "shapes"
    data_count: int = 100_000
    size: int = 0
    condition: str = MASK
    low: float = 100.0
    high: float = 200.0
    caption_dropout: float = 0.5
    min_snr_gamma: float = 0.0
    half: bool = False
    sample_every: int = 250
    sample_steps: int = 20
    sample_count: int = 4
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 50
    ema_decay: float = 0.0
    save_every: int = 250

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"steps and batch_size must be ≥ 1, got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout must be within [0, 1], got {self.caption_dropout}")
        if not str(self.out).lower().endswith(".safetensors"):
            raise ConfigError(f"out {self.out!r}: ControlNets are written as .safetensors; choose a name ending in it")

    @property
    def work_dir(self) -> Path:
        out = Path(self.out)
        return Path(self.work) if self.work else out.with_name(out.stem + "-train")


def image_size(cfg: ControlNetTrainConfig, config: ModelConfig) -> int:
    """The training image side: ``cfg.size`` or the model's native size, checked against its downscaling."""
    multiple = config.vae.downscale_factor * 2 ** (len(config.unet.channel_mult) - 1)
    size = cfg.size or config.unet.sample_size * config.vae.downscale_factor
    if size < multiple or size % multiple:
        raise ConfigError(f"image size {size} must be a positive multiple of {multiple} for this model")
    return size


def open_pairs(cfg: ControlNetTrainConfig, config: ModelConfig, preprocess: Preprocess | None = None,
               split: str = "train") -> ControlPairs:
    """The training triples (``split`` ``"heldout"``: held-out shapes scenes, for samples and evaluation)."""
    size = image_size(cfg, config)
    if cfg.data == "shapes":
        count = cfg.data_count if split == "train" else cfg.sample_count
        return ControlPairs(ShapesDataset(size, cfg.seed, split, count), cfg.condition, preprocess)
    return ControlPairs(ImageFolder(cfg.data, size, seed=cfg.seed), cfg.condition, preprocess)


@dataclass
class ControlNetTraining:
    """A prepared run: the locked base, the ControlNet, the training and sample triples, and the trainer."""

    cfg: ControlNetTrainConfig
    base: LatentDiffusion
    controlnet: ControlNetModel
    data: ControlPairs
    samples: ControlPairs
    trainer: Trainer


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
    trainer = Trainer(objective, len(data), cfg, cfg.work_dir)
    if resume and trainer.checkpoint_path.is_file():
        try:
            trainer.resume()
        except (RuntimeError, KeyError) as e:  # a checkpoint of a ControlNet for another base
            raise CheckpointError(f"{trainer.checkpoint_path} holds a ControlNet for another base model; start "
                                  f"without --resume or use another work folder: {str(e).splitlines()[0]}") from None
    return ControlNetTraining(cfg, base, controlnet, data, samples, trainer)


def write_samples(run: ControlNetTraining, sample_fn: SampleFn) -> Path:
    """A grid of the sample maps (top row) and what the model makes of them with their captions (bottom row), with
    the weights that will be saved (EMA when ``ema_decay`` > 0); live weights and training mode are restored."""
    trainer, cfg = run.trainer, run.cfg
    count = min(cfg.sample_count, len(run.samples))
    triples = [run.samples[i] for i in range(count)]
    with trainer.averaged_weights():
        run.controlnet.eval()
        images = sample_fn(run.base, run.controlnet, [c for _, c, _ in triples], [h[None] for _, _, h in triples],
                           cfg.sample_steps, cfg.seed)
    maps = [Image.fromarray((h.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for _, _, h in triples]
    return write_grid(maps + list(images), cfg.work_dir / f"samples-{trainer.step:06d}.png", cols=count)


def save_trained(run: ControlNetTraining) -> Path:
    """Write the ControlNet (EMA weights when ``ema_decay`` > 0) to ``cfg.out`` in the original layout, atomically."""
    if run.cfg.ema_decay > 0:
        run.trainer.ema.copy_to(run.trainer.module)
    out = Path(run.cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_original(run.controlnet, out, half=run.cfg.half)
    return out


def train_controlnet(cfg: ControlNetTrainConfig, *, preprocess: Preprocess | None = None, resume: bool = False,
                     overwrite: bool = False, on_step: OnStep | None = None, sample_fn: SampleFn | None = None,
                     base: LatentDiffusion | None = None) -> ControlNetTraining:
    """Run the whole recipe (see the module docstring); returns the finished run (``cfg.out`` written).

    ``preprocess`` makes the condition maps for a ``condition`` other than ``mask``; ``base`` replaces loading
    ``cfg.base``. An existing ``cfg.out`` is refused before any work unless ``overwrite``. Sample grids (with
    ``sample_fn``) are made at step 0 — where the ControlNet does nothing yet — and every ``sample_every`` steps.
    """
    if Path(cfg.out).exists() and not overwrite:
        raise ConfigError(f"{cfg.out} exists; use --overwrite to replace it")
    run = prepare_training(cfg, preprocess, base, resume)
    samples = None if sample_fn is None else lambda: write_samples(run, sample_fn)
    run_with_reports(run.trainer, cfg.sample_every, "ControlNet", samples, on_step)
    save_trained(run)
    return run


# ---- evaluation ---------------------------------------------------------------------------------------------------

GenerateFn = Callable[[list[str], list[torch.Tensor], list[int]], Sequence[Image.Image]]


@dataclass(frozen=True)
class ControlEval:
    """How well generated images follow their control masks and captions: per image, the IoU of its objects
    (:func:`shape_coverage` ≥ ½) with the scene's silhouettes (:func:`scene_mask` ≥ ½), and the detector's verdicts
    (:func:`nijimi.train.detect.score`: colour, shape, size, position, count, whole caption)."""

    ious: tuple[float, ...]
    scores: tuple[Score, ...]

    @property
    def iou(self) -> float:
        """Mean IoU over the images."""
        return float(np.mean(self.ious))

    def accuracy(self, attribute: str) -> float | None:
        """Share of images with ``attribute`` right (``"correct"``: the whole caption); None if none was judged."""
        judged = [getattr(s, attribute) for s in self.scores if getattr(s, attribute) is not None]
        return sum(judged) / len(judged) if judged else None


def evaluate_control(generate_fn: GenerateFn, pairs: ControlPairs, seeds: Sequence[int] | None = None,
                     batch_size: int = 8) -> ControlEval:
    """Generate an image per triple of ``pairs`` (over a :class:`ShapesDataset`, held-out scenes for a fair test)
    with ``generate_fn(captions, maps (1, 3, S, S), seeds) → images`` in batches, and judge each against its scene.

    ``seeds`` default to 0, 1, 2, …; the function never sees a pipeline, only captions, maps and seeds.
    """
    if not isinstance(pairs.data, ShapesDataset):
        raise ConfigError("evaluate_control needs shapes scenes (their geometry is the reference)")
    seeds = list(range(len(pairs))) if seeds is None else list(seeds)
    if len(seeds) != len(pairs) or batch_size < 1:
        raise ConfigError(f"evaluate_control needs one seed per example and batch_size ≥ 1; got {len(pairs)} "
                          f"examples, {len(seeds)} seeds, batch_size {batch_size}")
    ious, scores = [], []
    for start in range(0, len(pairs), batch_size):
        indices = range(start, min(start + batch_size, len(pairs)))
        triples = [pairs[i] for i in indices]
        images = generate_fn([c for _, c, _ in triples], [h[None] for _, _, h in triples], seeds[start:indices[-1] + 1])
        if len(images) != len(triples):
            raise ConfigError(f"generate_fn returned {len(images)} images for {len(triples)} captions")
        for i, (_, caption, _), image in zip(indices, triples, images, strict=True):
            target = scene_mask(pairs.data.scene(i), pairs.data.size) >= 0.5
            ious.append(mask_iou(shape_coverage(np.asarray(image.convert("RGB"))) >= 0.5, target))
            scores.append(score(image, caption))
    return ControlEval(tuple(ious), tuple(scores))


def format_control_table(result: ControlEval) -> str:
    """One plain-text table: images, mean IoU, then the detector's accuracies in percent."""
    columns = (*ATTRIBUTES, "correct")
    cells = [f"{'-':>8s}" if (a := result.accuracy(c)) is None else f"{100 * a:7.1f}%" for c in columns]
    header = f"{'n':>5s} {'IoU':>6s} " + " ".join(f"{'caption' if c == 'correct' else c:>8s}" for c in columns)
    return f"{header}\n{len(result.ious):>5d} {result.iou:6.3f} " + " ".join(cells)
