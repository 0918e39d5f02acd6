"""The training objectives of a latent text-to-image model, as modules the shared :class:`Trainer` drives.

- :class:`AutoencoderObjective`: the VAE stage — reconstruction (L1 + MSE) plus a small KL term toward N(0, I)
  (LDM 2112.10752 §3: a KL-regularised autoencoder; we omit the perceptual and adversarial terms, which flat-colour
  images do not need).
- :class:`DiffusionObjective`: the U-Net stage — noise an image's latent at a random step with q(x_t|x_0), have the
  U-Net predict ε or v (2202.00512), minimise the optionally Min-SNR-γ weighted MSE (2303.09556). The text encoder
  is trained jointly by the same loss (or frozen, for fine-tuning); captions are dropped to "" with probability
  ``caption_dropout`` so classifier-free guidance has an unconditional model (2207.12598).

Every forward takes ``(indices, generator, part)`` as the trainer defines: random numbers are drawn for the whole
global batch, then the rank's ``part`` is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from nijimi.diffusion.forward import diffusion_loss, q_sample, training_target
from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.models.text_encoder import TextEncoder
from nijimi.models.unet import UNetModel
from nijimi.models.vae import VAE
from nijimi.text.tokenizer import ClipTokenizer


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
    """``1 / std`` of the posterior-mean latents over ``count`` images, so scaled latents have unit variance (LDM
    appendix: SD's 0.18215 was measured the same way on its data)."""
    was_training = vae.training
    vae.eval()
    latents = [vae.encode(load_batch(data, range(i, min(i + batch, count)))[0]).mean for i in range(0, count, batch)]
    vae.train(was_training)
    return float(1.0 / torch.cat(latents).float().std())


class DiffusionObjective(nn.Module):
    """U-Net stage over a frozen VAE; ``train_text_encoder`` decides whether the text encoder learns too."""

    def __init__(self, unet: UNetModel, text_encoder: TextEncoder, vae: VAE, tokenizer: ClipTokenizer,
                 schedule: NoiseSchedule, data: CaptionedImages, *, caption_dropout: float = 0.1,
                 min_snr_gamma: float | None = 5.0, train_text_encoder: bool = True) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.vae = vae.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(train_text_encoder)
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.data = data
        self.caption_dropout = caption_dropout
        self.min_snr_gamma = min_snr_gamma

    def train(self, mode: bool = True) -> DiffusionObjective:
        super().train(mode)
        self.vae.eval()
        return self

    def forward(self, indices: list[int], generator: torch.Generator, part: slice) -> torch.Tensor:
        images, captions = load_batch(self.data, indices[part])
        n = len(indices)
        with torch.no_grad():
            posterior = self.vae.encode(images)
        x0_shape = (n, *posterior.mean.shape[1:])
        z_eps = torch.randn(x0_shape, generator=generator)[part]
        t = torch.randint(0, self.schedule.num_train_timesteps, (n,), generator=generator)[part]
        noise = torch.randn(x0_shape, generator=generator)[part]
        drop = (torch.rand(n, generator=generator) < self.caption_dropout)[part]
        x0 = (posterior.mean + posterior.std * z_eps) * self.vae.config.scaling_factor
        captions = ["" if d else c for d, c in zip(drop.tolist(), captions, strict=True)]
        context = self.text_encoder(self.tokenizer(captions))
        x_t = q_sample(x0, t, noise, self.schedule)
        pred = self.unet(x_t, t, context)
        loss, _ = diffusion_loss(pred, training_target(x0, noise, t, self.schedule), t, self.schedule,
                                 min_snr_gamma=self.min_snr_gamma)
        return loss
