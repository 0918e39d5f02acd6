"""img2img and inpainting: the starting latent, the extra U-Net inputs and the per-step blend.

The generator draws follow diffusers' pipelines (image latents sampled from the posterior first, then the noise,
then the masked-image latents), one generator per image, so the same seeds give the same pictures.

- img2img: encode the init image, noise it to ``sigmas[start]`` with ``start`` from the strength, denoise from there.
- inpainting with a 9-channel U-Net (SD inpainting checkpoints): the U-Net also sees the mask and the latent of the
  image with the repaint region blanked, ``[x, mask, masked-image latent]`` along channels.
- inpainting with a normal 4-channel U-Net: after every step the known region is replaced by the original latent
  re-noised to the current σ (:func:`~nijimi.diffusion.samplers.masked_blend`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from nijimi.diffusion.samplers import img2img_start, initial_latent, masked_blend, noised_latent
from nijimi.errors import ImageError, SamplerError
from nijimi.models.ldm import LatentDiffusion
from nijimi.pipelines.images import mask_tensor, open_image, to_tensor


@dataclass(frozen=True)
class Sources:
    """The user's init image and mask (either may be None), read and checked."""

    image: Image.Image | None = None
    mask: Image.Image | None = None
    image_name: str | None = None

    def settings(self, strength: float) -> dict:
        """What the generation settings record about the sources."""
        if self.image is None:
            return {}
        out = {"init_image": self.image_name, "strength": strength}
        if self.mask is not None:
            out["mask"] = True
        return out


def load_sources(image: Image.Image | str | os.PathLike | None,
                 mask: Image.Image | str | os.PathLike | None) -> Sources:
    if image is None:
        if mask is not None:
            raise ImageError("a mask needs an init image to inpaint")
        return Sources()
    rgb = open_image(image, "RGB")
    grey = None if mask is None else open_image(mask, "L")
    if grey is not None and grey.size != rgb.size:
        raise ImageError(f"mask size {grey.size[0]}x{grey.size[1]} does not match the init image size "
                         f"{rgb.size[0]}x{rgb.size[1]}")
    return Sources(rgb, grey, None if isinstance(image, Image.Image) else str(image))


def _encode(model: LatentDiffusion, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One posterior sample per generator of the single image ``pixels`` (1, 3, H, W) → scaled latents (B, C, h, w)."""
    posterior = model.vae.encode(pixels)
    scale = model.config.scaling_factor
    return torch.cat([posterior.sample(g) * scale for g in generators])


def _noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """``torch.randn(shape, generator=g)`` for each image's generator, stacked: (B, C, h, w) for shape (1, C, h, w)."""
    return torch.cat([torch.randn(shape, generator=g) for g in generators])


@torch.inference_mode()
def prepare(model: LatentDiffusion, source: Sources, strength: float, steps: int, sigmas: torch.Tensor,
            generators: list[torch.Generator], sampler: str, shape: tuple[int, ...], width: int, height: int):
    """(start index, starting latent (B, C, h, w), extra U-Net input or None, blend or None)."""
    schedule = model.config.schedule
    in_channels, z = model.config.unet.in_channels, shape[1]
    if in_channels not in (z, 2 * z + 1):
        raise ImageError(f"a U-Net with {in_channels} input channels (instruct-pix2pix?) is not supported here")
    inpaint_unet = in_channels == 2 * z + 1
    if source.image is None:
        x = initial_latent(_noise(shape, generators), sigmas, schedule, sampler)
        if not inpaint_unet:
            return 0, x, None, None
        # txt2img with an inpainting model (as A1111 does it): everything masked, the masked image blank (grey).
        blank = _encode(model, torch.zeros(1, 3, height, width), generators)
        return 0, x, torch.cat([torch.ones_like(blank[:, :1]), blank], dim=1), None
    if not 0.0 <= strength <= 1.0:
        raise SamplerError(f"strength={strength!r} must be within [0, 1]")
    if inpaint_unet and source.mask is None:
        raise ImageError(f"this is an inpainting model ({in_channels}-channel U-Net): give a mask with the init image")
    pixels = to_tensor(source.image, width, height)
    start = img2img_start(steps, strength)
    full_noise = inpaint_unet and start == 0
    known = None if full_noise else _encode(model, pixels, generators)
    noise = _noise(shape, generators)
    x = initial_latent(noise, sigmas, schedule, sampler) if full_noise else noised_latent(known, noise, sigmas, start)
    if source.mask is None:
        return start, x, None, None
    mask = mask_tensor(source.mask, width, height)
    latent_mask = F.interpolate(mask, size=shape[2:])
    if inpaint_unet:
        masked = _encode(model, pixels * (mask < 0.5), generators)
        return start, x, torch.cat([latent_mask.expand(len(generators), -1, -1, -1), masked], dim=1), None
    return start, x, None, masked_blend(known, noise, latent_mask)
