"""The training objectives of a latent text-to-image model, as modules the shared :class:`Trainer` drives.

- :class:`AutoencoderObjective`: the VAE stage — reconstruction (L1 + MSE) plus a small KL term toward N(0, I)
  (LDM 2112.10752 §3: a KL-regularised autoencoder; we omit the perceptual and adversarial terms, which flat-colour
  images do not need).
- :class:`DiffusionObjective`: the U-Net stage — noise an image's latent at a random step with q(x_t|x_0), have the
  U-Net predict ε or v (2202.00512), minimise the optionally Min-SNR-γ weighted MSE (2303.09556). The text encoder
  is trained jointly by the same loss (or frozen, for fine-tuning); captions are dropped to "" with probability
  ``caption_dropout`` so classifier-free guidance has an unconditional model (2207.12598). With ``mask_loss``, an
  image's mask (:class:`~nijimi.train.data.Sample`) weights the loss per latent pixel (:func:`masked_diffusion_loss`).

Every forward takes ``(indices, generator, part)`` as the trainer defines: random numbers are drawn for the whole
global batch, then the rank's ``part`` is used. A diffusion step makes its draws in one place,
:func:`draw_diffusion_batch`, which the ControlNet objective (``nijimi.train.controlnet``) shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nijimi.diffusion.forward import diffusion_loss, min_snr_weights, q_sample, training_target
from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.errors import ConfigError
from nijimi.models.ldm import LatentDiffusion
from nijimi.models.vae import VAE, DiagonalGaussian
from nijimi.train.data import collate


class CaptionedImages(Protocol):
    """What a training data set provides: ``ds[i] -> (image (3, H, W) in [-1, 1], caption, ...)``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple: ...


def load_batch(data: CaptionedImages, indices: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
    """Stack ``data[i]`` for ``indices`` → images (B, 3, H, W) and their captions."""
    items = [data[i] for i in indices]
    return torch.stack([item[0] for item in items]), [item[1] for item in items]


class AutoencoderObjective(nn.Module):
    """VAE stage: ``L = |x − x̂|₁ + |x − x̂|² + kl_weight · KL(q(z|x) ‖ N(0, I)) / (pixels)``."""

    def __init__(self, vae: VAE, data: CaptionedImages, kl_weight: float = 1e-6) -> None:
        super().__init__()
        self.vae = vae
        self.data = data
        self.kl_weight = kl_weight

    def forward(self, indices: list[int], generator: torch.Generator, part: slice) -> torch.Tensor:
        images, _ = load_batch(self.data, indices[part])
        posterior = self.vae.encode(images)
        cfg = self.vae.config
        f = cfg.downscale_factor
        shape = (len(indices), cfg.z_channels, images.shape[2] // f, images.shape[3] // f)
        eps = torch.randn(shape, generator=generator)[part]
        recon = self.vae.decode(posterior.mean + posterior.std * eps)
        err = recon - images
        kl = posterior.kl().mean() / images[0].numel()
        return err.abs().mean() + err.pow(2).mean() + self.kl_weight * kl


@torch.no_grad()
def measure_scaling_factor(vae: VAE, data: CaptionedImages, count: int = 512, batch: int = 64) -> float:
    """``1 / std`` of the posterior-mean latents over ``count`` images (at most the data set), so scaled latents
    have unit variance (LDM appendix: SD's 0.18215 was measured the same way on its data)."""
    count = min(count, len(data))
    was_training = vae.training
    vae.eval()
    latents = [vae.encode(load_batch(data, range(i, min(i + batch, count)))[0]).mean for i in range(0, count, batch)]
    vae.train(was_training)
    return float(1.0 / torch.cat(latents).float().std())


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) in [0, 1] averaged over each latent cell's pixels → (B, 1, h, w) (area resampling)."""
    return F.interpolate(mask.float(), size=size, mode="area")


def masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
                          weights: torch.Tensor, *, min_snr_gamma: float | None = None) -> torch.Tensor:
    """The diffusion MSE with per-latent-pixel ``weights`` (B, 1, h, w) ≥ 0: each sample's loss is the weighted mean
    ``Σ w·(pred − target)² / (C·Σ w)`` (a binary mask gives the plain MSE over the kept pixels only; a sample whose
    weights are all 0 contributes 0), times its Min-SNR-γ weight (2303.09556) when given; returns the batch mean.
    pred, target (B, C, h, w), t (B,). Computed in float32."""
    if weights.shape != (pred.shape[0], 1, *pred.shape[2:]):
        raise ConfigError(f"loss weights of shape {tuple(weights.shape)} do not fit predictions {tuple(pred.shape)}")
    w = weights.float()
    squared = (pred.float() - target.float()).pow(2) * w
    total = (w.sum(dim=(1, 2, 3)) * pred.shape[1]).clamp(min=torch.finfo(torch.float32).tiny)
    per_sample = squared.sum(dim=(1, 2, 3)) / total
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(t, schedule, min_snr_gamma).to(per_sample.device)
    return per_sample.mean()


@dataclass(frozen=True)
class DiffusionBatch:
    """A step's draws for this rank's b samples: x_t, target (ε or v) (b, C, h, w), t (b,), captions to drop."""

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    drop: list[bool]


def draw_diffusion_batch(generator: torch.Generator, n: int, part: slice, posterior: DiagonalGaussian,
                         scaling_factor: float, schedule: NoiseSchedule, *, caption_dropout: float = 0.0,
                         timestep_weights: torch.Tensor | None = None) -> DiffusionBatch:
    """The one place a diffusion training step draws random numbers. For the global batch of ``n`` it draws, in this
    order: the latent's posterior sample ε_z, the timesteps t (uniform, or ∝ ``timestep_weights``), the noise ε and
    the caption-dropout coins (dropped with probability ``caption_dropout``); the rank keeps ``part`` of each.

    ``posterior``: q(z|x) of the rank's images; x0 = (mean + std·ε_z)·``scaling_factor``, x_t = q(x_t|x0) with ε
    (DDPM 2006.11239 eq. 4), target ε or v (2202.00512) as ``schedule`` predicts.
    """
    x0_shape = (n, *posterior.mean.shape[1:])
    z_eps = torch.randn(x0_shape, generator=generator)[part]
    if timestep_weights is None:
        t = torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator)[part]
    else:
        t = torch.multinomial(timestep_weights, n, replacement=True, generator=generator)[part]
    noise = torch.randn(x0_shape, generator=generator)[part]
    drop = (torch.rand(n, generator=generator) < caption_dropout)[part]
    x0 = (posterior.mean + posterior.std * z_eps) * scaling_factor
    return DiffusionBatch(q_sample(x0, t, noise, schedule), t, training_target(x0, noise, t, schedule), drop.tolist())


class DiffusionObjective(nn.Module):
    """U-Net stage of ``model`` over its frozen VAE; ``train_text_encoder`` decides whether the text encoder learns
    too, and ``train_unet`` whether the U-Net does (off: only the text encoder learns, e.g. new phrasings of what a
    model draws).

    ``mask_loss``: weight the loss by the images' masks (mask 1 = learn, 0 = ignore; samples without one weigh 1).
    """

    def __init__(self, model: LatentDiffusion, data: CaptionedImages, *, caption_dropout: float = 0.1,
                 min_snr_gamma: float | None = 5.0, train_text_encoder: bool = True, mask_loss: bool = False,
                 timestep_weights: torch.Tensor | None = None, train_unet: bool = True) -> None:
        super().__init__()
        self.unet = model.unet.requires_grad_(train_unet)
        self.text_encoder = model.text_encoder.requires_grad_(train_text_encoder)
        self.vae = model.vae.requires_grad_(False).eval()
        self.tokenizer = model.config.tokenizer()
        self.schedule = model.config.schedule
        self.data = data
        self.caption_dropout = caption_dropout
        self.min_snr_gamma = min_snr_gamma
        self.mask_loss = mask_loss
        self.timestep_weights = timestep_weights

    def train(self, mode: bool = True) -> DiffusionObjective:
        super().train(mode)
        self.vae.eval()
        return self

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """The U-Net's text context ``(B, 77, D)`` of training captions (one 77-token window each)."""
        return self.text_encoder(self.tokenizer(captions))

    def forward(self, indices: list[int], generator: torch.Generator, part: slice) -> torch.Tensor:
        images, captions, masks = collate([self.data[i] for i in indices[part]])
        with torch.no_grad():
            posterior = self.vae.encode(images)
        batch = draw_diffusion_batch(generator, len(indices), part, posterior, self.vae.config.scaling_factor,
                                     self.schedule, caption_dropout=self.caption_dropout,
                                     timestep_weights=self.timestep_weights)
        captions = ["" if d else c for d, c in zip(batch.drop, captions, strict=True)]
        context = self.encode_captions(captions)
        pred = self.unet(batch.x_t, batch.t, context)
        if self.mask_loss and masks is not None:
            return masked_diffusion_loss(pred, batch.target, batch.t, self.schedule,
                                         latent_mask(masks, pred.shape[2:]), min_snr_gamma=self.min_snr_gamma)
        loss, _ = diffusion_loss(pred, batch.target, batch.t, self.schedule, min_snr_gamma=self.min_snr_gamma)
        return loss
