"""Cheap previews of the image being sampled: a linear latent → RGB map fitted to the model's VAE.

Each latent cell of SD-like autoencoders mostly encodes the mean colour of the ``f × f`` pixels it covers, so
``rgb ≈ W · z + b`` (``W``: 3 × C) gives a blurry but faithful picture at the cost of one tiny matrix product — the
"latent2rgb" preview of A1111 and ComfyUI, whose tables are fitted to SD's VAE. We fit ``W, b`` to any model's VAE by
least squares on what that VAE decodes random latents to (:func:`fit_latent_rgb`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nijimi.errors import NijimiError
from nijimi.models.vae import VAE
from nijimi.pipelines.images import to_pil, to_unit


@dataclass(frozen=True)
class LatentRGB:
    """``rgb = weight · z + bias`` per latent cell, ``weight: (3, C)``, ``bias: (3,)``, colours in [0, 1]; shown at
    full size by bilinear ×``factor`` upsampling."""

    weight: torch.Tensor
    bias: torch.Tensor
    factor: int

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, C, h, w)`` → pixels ``(B, 3, h·f, w·f)`` float32 in [0, 1] on the CPU."""
        z = latents.detach().float().cpu()
        rgb = torch.einsum("rc,bchw->brhw", self.weight, z) + self.bias.view(1, 3, 1, 1)
        return F.interpolate(rgb, scale_factor=self.factor, mode="bilinear").clamp(0, 1)


@torch.inference_mode()
def fit_latent_rgb(vae: VAE, count: int = 4, cells: int = 16, seed: int = 0) -> LatentRGB:
    """Least squares ``[z, 1] → the mean colour of the f × f pixels vae decodes the cell to``, over ``count``
    unit-Gaussian latents (the sampler's scale) of ``cells`` cells a side drawn from ``seed``: the latents a
    preview sees, rather than encoded pictures of some other world."""
    z = torch.randn(count, vae.config.z_channels, cells, cells, generator=torch.Generator().manual_seed(seed))
    pictures = to_unit(vae.decode_latents(z.to(next(vae.parameters()).device)))
    inputs = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), torch.ones(count * cells * cells, 1)], 1)
    targets = F.avg_pool2d(pictures, vae.config.downscale_factor).permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(inputs.double(), targets.double()).solution.float()
    return LatentRGB(solution[:-1].T.contiguous(), solution[-1].contiguous(), vae.config.downscale_factor)


def save_preview(pixels: torch.Tensor, path: str | os.PathLike) -> None:
    """Write pixels ``(B, 3, H, W)`` in [0, 1] to the PNG ``path`` as one row of B images, replacing it whole (a temp
    file renamed over it, so a viewer never reads half a file; not fsynced, as it is rewritten every step)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.part")
    try:
        to_pil(torch.cat(list(pixels), dim=2)[None])[0].save(temp, format="PNG")
        os.replace(temp, path)
    except OSError as exc:
        raise NijimiError(f"{path}: cannot write the preview ({exc.strerror or exc})") from None
