"""``nijimi train-decoder``: distil a TAESD tiny decoder (and, with ``encoder``, its encoder) from a model's VAE.

The student is :class:`~nijimi.models.taesd.TAESD` (madebyollin/taesd's architecture) sized for the VAE: the
published SD shape for a factor-8 VAE, :meth:`~nijimi.models.taesd.TAESDConfig.tiny` for a factor-4 one such as the
embedded model's. Each training image x is encoded once by the frozen VAE (posterior mean, times its scaling factor:
the diffusion model's latents z) and decoded back, D(z); the decoder learns ``MSE(tiny(z), D(z)) + l1·|tiny(z) −
D(z)|₁ + edge·GDL(tiny(z), D(z))`` — it imitates the VAE's decode, not the image — and the encoder
``MSE(tiny_enc(x), z)``. GDL, the gradient difference loss (:func:`gradient_difference`), keeps the edges sharp that
MSE lets go soft: the points of small stars, which decide how a shape reads. The (z, D(z)) pairs are made once per
image and reused (the VAE is frozen). With ``sampled`` > 0, that share of the scenes trains on the latents the
diffusion model itself samples for the scene's caption instead (``latent_fn``, given by the caller): the latents
``--decoder tiny`` decodes in use, which lie a little off the encoder's, where a decoder that saw only encoded latents
is less exact. ``init`` starts from a published decoder file (to fine-tune one, e.g. on sampled latents). The run is
the shared fine-tuning flow (:func:`~nijimi.train.finetune.run_finetune`: checkpoints, resume, loss curve,
comparison grids); the result is saved in the published key layout, ``taesd_decoder.safetensors`` (and
``taesd_encoder.safetensors`` beside it), which ``--decoder tiny:PATH`` loads (:func:`nijimi.io.taesd.load_taesd`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nijimi.errors import ConfigError
from nijimi.io.files import check_output
from nijimi.io.safetensors import save_file
from nijimi.io.taesd import load_taesd
from nijimi.models.ldm import LatentDiffusion
from nijimi.models.taesd import TAESD, TAESDConfig
from nijimi.train.controlnet import to_uint8
from nijimi.train.finetune import FineTuneConfig, FineTuning, load_base, open_images, run_finetune
from nijimi.train.shapes import AnyColourShapes
from nijimi.train.trainer import OnStep, open_trainer

ENCODER_FILE = "taesd_encoder.safetensors"
LatentFn = Callable[[LatentDiffusion, str, int], torch.Tensor]
"""``latent_fn(model, prompt, seed)`` → the latents (1, C, h, w) ``model`` samples for ``prompt`` and ``seed`` (as
``generate`` would, before decoding); given by the caller (pipelines sit above)."""


@dataclass
class DecoderTrainConfig(FineTuneConfig):
    """Every setting of a decoder run, on top of :class:`FineTuneConfig` (its diffusion settings — caption dropout,
    Min-SNR, sample steps — are unused). ``l1``: weight of the L1 term. ``edge``: weight of the gradient difference
    term. ``encoder``: also distil the encoder, saved as ``taesd_encoder.safetensors`` beside ``out``. ``channels``
    0: the preset's width. ``any_colour`` (shapes data only): chance an object is drawn in a random colour, as the
    embedded VAE was trained. ``sampled``: share of the scenes whose latents are the base model's samples for their
    captions, not their encodings (decoder only). ``init``: a TAESD decoder file to start from."""

    out: str = "taesd_decoder.safetensors"
    min_snr_gamma: float = 0.0
    batch_size: int = 16
    lr: float = 1e-3
    l1: float = 0.0
    edge: float = 0.0
    encoder: bool = False
    channels: int = 0
    any_colour: float = 0.0
    sampled: float = 0.0
    init: str = ""
    sample_every: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.l1, self.edge, self.channels) < 0 or not 0.0 <= self.any_colour <= 1.0:
            raise ConfigError(f"l1, edge and channels must be ≥ 0 and any_colour within [0, 1], got l1={self.l1}, "
                              f"edge={self.edge}, channels={self.channels}, any_colour={self.any_colour}")
        if not 0.0 <= self.sampled <= 1.0 or (self.sampled and self.encoder):
            raise ConfigError(f"sampled = {self.sampled}: a share within [0, 1], and 0 with encoder = true (a "
                              "sampled latent has no image to encode)")
        if self.any_colour and not self.data.startswith("shapes"):
            raise ConfigError(f"any_colour = {self.any_colour} recolours shapes scenes; data {self.data!r} is a "
                              "folder of images (set it to 0)")

    def taesd_config(self, model: LatentDiffusion) -> TAESDConfig:
        """The student's shape for ``model``'s VAE: SD's TAESD for factor 8, the f = 4 preset for factor 4."""
        vae = model.config.vae
        presets = {8: TAESDConfig.sd(), 4: TAESDConfig.tiny()}
        if vae.downscale_factor not in presets:
            raise ConfigError(f"train-decoder: a VAE of factor {vae.downscale_factor} has no TAESD preset (4 or 8)")
        preset = presets[vae.downscale_factor]
        return dataclasses.replace(preset, latent_channels=vae.z_channels, channels=self.channels or preset.channels)


def gradient_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The gradient difference loss of Mathieu, Couprie & LeCun ("Deep multi-scale video prediction beyond mean
    square error", 1511.05440) with α = 1, as a mean: for images ``a``, ``b`` (B, C, H, W),
    ``mean | |a[i,j] − a[i−1,j]| − |b[i,j] − b[i−1,j]| |`` over the vertical neighbour pairs plus the same mean over
    the horizontal ones. It is zero when the two have the same edge magnitudes everywhere and grows with each edge
    that one of them blurs or loses."""
    rows = ((a[..., 1:, :] - a[..., :-1, :]).abs() - (b[..., 1:, :] - b[..., :-1, :]).abs()).abs().mean()
    cols = ((a[..., 1:] - a[..., :-1]).abs() - (b[..., 1:] - b[..., :-1]).abs()).abs().mean()
    return rows + cols


@torch.no_grad()
def vae_pairs(model: LatentDiffusion, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` (B, 3, H, W) in [-1, 1] → their latents z (posterior mean × scaling factor) and the VAE's decode
    of them, D(z) (B, 3, H, W)."""
    latents = model.vae.encode(images).mean * model.vae.config.scaling_factor
    return latents, model.vae.decode_latents(latents)


class DecoderObjective(nn.Module):
    """What the trainer trains: ``tiny`` (the :class:`TAESD` halves) is the only sub-module; the frozen ``model``
    makes each scene's (x, z, D(z)) once (see the module docstring). z is the encoding of image x, or, for the scenes
    in ``sampled``, ``latent_fn(model, caption, seed + index)`` with the caption ``captioned[index][1]`` (``data``
    with its captions: shapes drawn in any colour have none), and x is then D(z)."""

    def __init__(self, tiny: TAESD, model: LatentDiffusion, data, cfg: DecoderTrainConfig, captioned=None,
                 latent_fn: LatentFn | None = None) -> None:
        super().__init__()
        self.tiny = tiny
        object.__setattr__(self, "model", model.requires_grad_(False).eval())
        self.data, self.l1, self.edge, self.seed = data, cfg.l1, cfg.edge, cfg.seed
        self.captioned, self.latent_fn = data if captioned is None else captioned, latent_fn
        draws = torch.rand(len(data), generator=torch.Generator().manual_seed(cfg.seed))
        self.sampled = set(torch.nonzero(draws < cfg.sampled).flatten().tolist())
        if self.sampled and latent_fn is None:
            raise ConfigError(f"sampled = {cfg.sampled} needs a latent_fn to sample latents with")
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _sampled_pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latents = self.latent_fn(self.model, self.captioned[index][1], self.seed + index)
        decoded = self.model.vae.decode_latents(latents)
        return decoded[0], latents[0], decoded[0]

    def examples(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images x, latents z and VAE decodes D(z) of ``data[i]`` for ``indices``, each made once."""
        todo = [i for i in indices if i not in self.pairs and i not in self.sampled]
        if todo:
            images = torch.stack([self.data[i][0] for i in todo])
            self.pairs.update(zip(todo, zip(images, *vae_pairs(self.model, images), strict=True), strict=True))
        self.pairs.update({i: self._sampled_pair(i) for i in dict.fromkeys(indices) if i not in self.pairs})
        return tuple(torch.stack(t) for t in zip(*(self.pairs[i] for i in indices), strict=True))

    def forward(self, indices: list[int], generator: torch.Generator, part: slice) -> torch.Tensor:
        """The loss over ``indices[part]`` (see :class:`~nijimi.train.trainer.Trainer`; nothing random is drawn)."""
        images, latents, target = self.examples(indices[part])
        decoded = self.tiny.decode_latents(latents)
        err = decoded - target
        loss = err.pow(2).mean() + self.l1 * err.abs().mean()
        if self.edge:
            loss = loss + self.edge * gradient_difference(decoded, target)
        if self.tiny.encoder is not None:
            loss = loss + F.mse_loss(self.tiny.encode_latents(images), latents)
        return loss


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images ``a`` against ``b`` in [-1, 1] (peak-to-peak 2), over all pixels."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


@torch.no_grad()
def decoder_psnr(tiny: TAESD, model: LatentDiffusion, images: torch.Tensor) -> float:
    """PSNR (dB) of the tiny decoder's images against the VAE's decode of the same latents, for ``images``."""
    latents, target = vae_pairs(model, images)
    return psnr(tiny.decode_latents(latents), target)


def heldout_images(cfg: DecoderTrainConfig, size: int, count: int) -> torch.Tensor:
    """``count`` images (count, 3, size, size) the run did not train on: held-out scenes of shapes data (seed + 1),
    else the data's first images."""
    data = open_images(cfg.data, size, cfg.seed + 1, count, "heldout")
    return torch.stack([data[i][0] for i in range(min(count, len(data)))])


def heldout_psnr(run: DecoderTraining, count: int = 64) -> float:
    """The trained decoder's PSNR (dB) against the VAE's decode on ``count`` :func:`heldout_images`."""
    return decoder_psnr(run.tiny, run.model, heldout_images(run.cfg, run.cfg.image_size(run.model.config), count))


@dataclass
class DecoderTraining(FineTuning):
    """A prepared run: the base model and the trainer of :class:`DecoderObjective`."""

    model: LatentDiffusion
    title = "tiny decoder"

    @property
    def tiny(self) -> TAESD:
        return self.trainer.module.tiny

    def sample_grid(self, sample_fn=None) -> tuple[list, int]:
        """Eight held-out scenes: the VAE's decode above, the tiny decoder's below (no sampling: ``sample_fn`` is
        not used)."""
        latents, target = vae_pairs(self.model, heldout_images(self.cfg, self.cfg.image_size(self.model.config), 8))
        with torch.no_grad():
            tiny = self.tiny.decode_latents(latents)
        return [Image.fromarray(to_uint8(x.clamp(-1, 1))) for x in torch.cat([target, tiny])], len(target)

    def save(self, out: Path, overwrite: bool = False) -> None:
        """The decoder in the published ``taesd_decoder`` layout; the encoder (if trained) beside it. Existing files
        are replaced only with ``overwrite``."""
        dtype = torch.float16 if self.cfg.half else torch.float32
        meta = {"nijimi_base": Path(self.cfg.base).name, "nijimi_steps": str(self.trainer.step)}
        parts = [(self.tiny.decoder, out)] + ([(self.tiny.encoder, out.with_name(ENCODER_FILE))]
                                              if self.tiny.encoder is not None else [])
        for _, path in parts:
            check_output(path, overwrite)
        for part, path in parts:
            save_file({k: v.to(dtype) for k, v in part.state_dict().items()}, path, meta, overwrite=overwrite)


def prepare_decoder(cfg: DecoderTrainConfig, model: LatentDiffusion | None = None, resume: bool = False,
                    latent_fn: LatentFn | None = None) -> DecoderTraining:
    """Load (or take) the base model and the data, build the student (from ``init``, if set) and the trainer; with
    ``resume``, continue from ``work_dir/checkpoint.pt`` when it exists. ``latent_fn`` samples the latents of
    ``sampled`` scenes."""
    model = load_base(cfg.base) if model is None else model
    captioned = open_images(cfg.data, cfg.image_size(model.config), cfg.seed, cfg.data_count, captions=cfg.captions)
    data = AnyColourShapes(captioned, cfg.any_colour) if cfg.any_colour else captioned
    torch.manual_seed(cfg.seed)  # the student's initialisers draw from the global generator
    tiny = TAESD(cfg.taesd_config(model), encoder=cfg.encoder)
    if cfg.init:
        start = load_taesd(cfg.init)
        if start.decoder is None:
            raise ConfigError(f"init {cfg.init}: holds no TAESD decoder")
        if start.config != tiny.config:
            raise ConfigError(f"init {cfg.init}: a TAESD decoder of shape {start.config}; this model needs "
                              f"{tiny.config}")
        tiny.decoder.load_state_dict(start.decoder.state_dict())
    objective = DecoderObjective(tiny, model, data, cfg, captioned, latent_fn)
    trainer = open_trainer(objective, len(data), cfg, cfg.work_dir, resume,
                           "holds another decoder (shape or encoder differ)")
    return DecoderTraining(cfg, trainer, model)


def train_decoder(cfg: DecoderTrainConfig, *, resume: bool = False, overwrite: bool = False,
                  on_step: OnStep | None = None, samples: bool = True,
                  model: LatentDiffusion | None = None, latent_fn: LatentFn | None = None) -> DecoderTraining:
    """Run the whole recipe (see the module docstring) with :func:`run_finetune`; returns the finished run.
    ``samples``: write comparison grids every ``sample_every`` steps; ``latent_fn``: see :func:`prepare_decoder`."""
    return run_finetune(cfg, lambda: prepare_decoder(cfg, model, resume, latent_fn), resume=resume,
                        overwrite=overwrite, on_step=on_step, sample_fn=(lambda *_: None) if samples else None)
