"""Cheap previews of the image being sampled: a linear latent → RGB map fitted to the model's VAE.

Each latent cell of SD-like autoencoders mostly encodes the mean colour of the ``f × f`` pixels it covers, so
``rgb ≈ W · z + b`` (``W``: 3 × C) gives a blurry but faithful picture at the cost of one tiny matrix product — the
"latent2rgb" preview of A1111 and ComfyUI, whose tables are fitted to SD's VAE. We fit ``W, b`` to any model's VAE by
least squares on pictures of flat colour patches encoded by that VAE (:func:`fit_latent_rgb`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nijimi.errors import NijimiError
from nijimi.models.vae import VAE
from nijimi.pipelines.images import to_pil


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
def fit_latent_rgb(vae: VAE, count: int = 8, cells: int = 16, seed: int = 0) -> LatentRGB:
    """Least squares ``[z, 1] → the mean colour of the f × f pixels of a latent cell``, over ``count`` pictures of
    ``cells`` latent cells a side encoded by ``vae`` (posterior means, on the sampler's scale): 4 × 4 patches of flat
    colour, random or (half of them) white, drawn from ``seed``. Without white in the mix the background of a typical
    picture pulls every colour towards grey."""
    f = vae.config.downscale_factor
    gen = torch.Generator().manual_seed(seed)
    colours = torch.rand(count, 3, 4, 4, generator=gen)
    colours = torch.where(torch.rand(count, 1, 4, 4, generator=gen) < 0.5, 1.0, colours)
    pictures = F.interpolate(colours, size=cells * f)
    z = (vae.encode(pictures.to(next(vae.parameters()).device) * 2 - 1).mean * vae.config.scaling_factor).float().cpu()
    inputs = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), torch.ones(count * cells * cells, 1)], 1)
    targets = F.avg_pool2d(pictures, f).permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(inputs.double(), targets.double()).solution.float()
    return LatentRGB(solution[:-1].T.contiguous(), solution[-1].contiguous(), f)


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
