"""img2img and inpainting: the starting latent, the extra U-Net inputs and the per-step blend.

The generator draws follow diffusers' pipelines (image latents sampled from the posterior first, then the noise,
then the masked-image latents), one generator per image, so the same seeds give the same pictures. One difference:
for a batch, diffusers' inpainting pipeline samples the image posteriors with the first generator only; here each
image uses its own, so image i of a batch equals a single generation with seed i (the two agree for batch 1).

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

from nijimi.diffusion.samplers import Blend, img2img_start, initial_latent, masked_blend, noised_latent
from nijimi.errors import ImageError
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
    """Open the init image (RGB) and mask (greyscale), checking that a mask comes with an image of its size."""
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


def _encode(model: LatentDiffusion, pixels: torch.Tensor, generators: list[torch.Generator],
            tile: int | None) -> torch.Tensor:
    """One posterior sample per generator of the single image ``pixels`` (1, 3, H, W) → scaled latents (B, C, h, w).

    The sample's noise is drawn on the CPU from each generator (as diffusers' ``randn_tensor`` does for a CPU
    generator), so a seed gives the same latent on any device. ``tile`` (pixels) tiles the encoder for big images.
    """
    vae = model.vae
    big = tile is not None and max(pixels.shape[-2:]) > tile
    posterior = vae.tiled_encode(pixels, tile) if big else vae.encode(pixels)
    eps = _noise(tuple(posterior.mean.shape), generators).to(posterior.mean.device)
    return (posterior.mean + posterior.std * eps) * model.config.scaling_factor


def _noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """``torch.randn(shape, generator=g)`` on the CPU for each image's generator, stacked: (B, C, h, w) for shape
    (1, C, h, w)."""
    return torch.cat([torch.randn(shape, generator=g) for g in generators])


@dataclass(frozen=True)
class Start:
    """What sampling starts from: the index of the first σ, the latent (B, C, h, w) there, the extra U-Net input
    (an inpainting U-Net's mask and masked-image latent, (B, 1 + C, h, w)) or None, and the per-step blend or None."""

    index: int
    latent: torch.Tensor
    extra: torch.Tensor | None = None
    blend: Blend | None = None


@torch.inference_mode()
def prepare(model: LatentDiffusion, source: Sources, strength: float, sigmas: torch.Tensor,
            generators: list[torch.Generator], sampler: str, shape: tuple[int, ...], tile: int | None = None) -> Start:
    """The starting point of a generation of latent ``shape`` (1, C, h, w) per image, on the model's device.

    Generator draws per image, as diffusers' pipelines make them: txt2img the noise; img2img the image's posterior
    sample, then the noise; inpainting the posterior sample (skipped by a 9-channel U-Net at strength 1), the noise,
    then the masked image's posterior sample (drawn for a 4-channel U-Net too, which does not use it, so that an
    ancestral sampler's later draws stay in step). At strength 1 inpainting starts from pure noise, img2img from the
    image noised to σ₀.
    """
    schedule, device = model.config.schedule, next(model.vae.parameters()).device
    in_channels, z = model.config.unet.in_channels, shape[1]
    if in_channels not in (z, 2 * z + 1):
        raise ImageError(f"a U-Net with {in_channels} input channels (instruct-pix2pix?) is not supported here")
    inpaint_unet = in_channels == 2 * z + 1
    f = model.config.vae.downscale_factor
    width, height = shape[3] * f, shape[2] * f
    if source.image is None:
        x = initial_latent(_noise(shape, generators).to(device), sigmas, schedule, sampler)
        if not inpaint_unet:
            return Start(0, x)
        # txt2img with an inpainting model (as A1111 does it): everything masked, the masked image blank (grey).
        blank = _encode(model, torch.zeros(1, 3, height, width, device=device), generators, tile)
        return Start(0, x, torch.cat([torch.ones_like(blank[:, :1]), blank], dim=1))
    if inpaint_unet and source.mask is None:
        raise ImageError(f"this is an inpainting model ({in_channels}-channel U-Net): give a mask with the init image")
    start = img2img_start(len(sigmas) - 1, strength)
    pixels = to_tensor(source.image, width, height).to(device)
    full_noise = source.mask is not None and strength == 1.0
    known = None if full_noise and inpaint_unet else _encode(model, pixels, generators, tile)
    noise = _noise(shape, generators).to(device)
    x = initial_latent(noise, sigmas, schedule, sampler) if full_noise else noised_latent(known, noise, sigmas, start)
    if source.mask is None:
        return Start(start, x)
    mask = mask_tensor(source.mask, width, height).to(device)
    latent_mask = F.interpolate(mask, size=shape[2:])
    if inpaint_unet:
        masked = _encode(model, pixels * (mask < 0.5), generators, tile)
        return Start(start, x, torch.cat([latent_mask.expand(len(generators), -1, -1, -1), masked], dim=1))
    _noise(shape, generators)  # the draw of the masked image's posterior sample, which only a 9-channel U-Net uses
    return Start(start, x, None, masked_blend(known, noise, latent_mask))
