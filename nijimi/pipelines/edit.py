"""img2img and inpainting: the starting latent, the extra U-Net inputs and the per-step blend.

The generator draws follow diffusers' pipelines (image latents sampled from the posterior first, then the noise,
then the masked-image latents), one generator per image, so the same seeds give the same pictures. One difference:
for a batch, diffusers' inpainting pipeline samples the image posteriors with the first generator only; here each
image uses its own, so image i of a batch equals a single generation with seed i (the two agree for batch 1).

- img2img: encode the init image, noise it to ``sigmas[start]`` with ``start`` from the strength, denoise from there.
- inpainting with a 9-channel U-Net (SD inpainting checkpoints): the U-Net also sees the mask and the latent of the
  image with the repaint region blanked, ``[x, mask, masked-image latent]`` along channels
  (:func:`with_inpaint_channels`, a layer of the pipeline's model stack).
- inpainting with a normal 4-channel U-Net: after every step the known region is replaced by the original latent
  re-noised to the current σ (:func:`masked_blend`, run by the sampler's step callback, :func:`with_blend`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image

from nijimi.diffusion.choice import SamplerChoice
from nijimi.diffusion.noise import Seeds, initial_noise, starting_noise
from nijimi.diffusion.samplers import Callback, StepInfo
from nijimi.errors import ImageError, SamplerError
from nijimi.models.ldm import LatentDiffusion
from nijimi.models.vae import DiagonalGaussian
from nijimi.pipelines.images import mask_tensor, open_image, to_tensor


@dataclass(frozen=True)
class Sources:
    """The user's init image and mask (either may be None), read and checked."""

    image: Image.Image | None = None
    mask: Image.Image | None = None


def load_sources(image: Image.Image | str | os.PathLike | None,
                 mask: Image.Image | str | os.PathLike | None) -> Sources:
    """Open the init image (RGB) and mask (greyscale), checking that the mask has the image's size."""
    if image is None:
        return Sources()
    rgb = open_image(image, "RGB")
    grey = None if mask is None else open_image(mask, "L")
    if grey is not None and grey.size != rgb.size:
        raise ImageError(f"mask size {grey.size[0]}x{grey.size[1]} does not match the init image size "
                         f"{rgb.size[0]}x{rgb.size[1]}")
    return Sources(rgb, grey)


def posterior(model: LatentDiffusion, pixels: torch.Tensor, tile: int | None) -> DiagonalGaussian:
    """The VAE's posterior over the unscaled latents of ``pixels`` (B, 3, H, W) in [-1, 1]; ``tile`` (pixels) tiles
    the encoder for images larger than it."""
    vae = model.vae
    big = tile is not None and max(pixels.shape[-2:]) > tile
    return vae.tiled_encode(pixels, tile) if big else vae.encode(pixels)


def _encode(model: LatentDiffusion, pixels: torch.Tensor, generators: list[torch.Generator],
            tile: int | None) -> torch.Tensor:
    """One posterior sample per generator of the single image ``pixels`` (1, 3, H, W) → scaled latents (B, C, h, w).

    The sample's noise is drawn on the CPU from each generator (:func:`initial_noise`), so a seed gives the same
    latent on any device. ``tile`` (pixels) tiles the encoder for big images.
    """
    latent = posterior(model, pixels, tile)
    eps = initial_noise(tuple(latent.mean.shape), generators).to(latent.mean.device)
    return (latent.mean + latent.std * eps) * model.config.scaling_factor


Blend = Callable[[torch.Tensor, float], torch.Tensor]
"""``blend(x, σ) → x``: the latent to continue from, given the sampler's latent ``x`` now at ``σ``."""


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first σ for img2img at ``strength`` in [0, 1] (diffusers: skip ``steps - int(steps·strength)``
    steps); 0 means start from pure noise level σ₀, ``steps`` means no denoising at all."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SamplerError(f"steps={steps!r} must be an integer >= 1")
    if not 0.0 <= strength <= 1.0:
        raise SamplerError(f"strength={strength!r} must be within [0, 1]")
    return steps - min(int(steps * strength), steps)


def noised_latent(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, start: int) -> torch.Tensor:
    """The img2img starting latent ``x₀ + noise·sigmas[start]`` (σ-space). x₀, noise (B, ...)."""
    return x0 + noise * sigmas[start].to(x0.dtype)


def masked_blend(known: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> Blend:
    """Inpainting blend: keep the sampler's latent where ``mask`` is 1 (the region to repaint) and put the known
    latent re-noised to the current σ, ``known + noise·σ``, where it is 0 (diffusers' SD inpainting with a
    4-channel U-Net); at σ = 0 the known region becomes the original exactly. known, noise (B, C, H, W); mask
    (B or 1, 1, H, W) in [0, 1]."""

    def blend(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return mask * x + (1 - mask) * (known + noise * sigma)

    return blend


def with_blend(blend: Blend | None, callback: Callable[[StepInfo], None] | None) -> Callback | None:
    """The sampler's step callback: apply ``blend`` after each step (at the step's ``sigma_next``) and continue from
    its result; ``callback`` (progress, previews) then sees the blended latent."""
    if blend is None:
        return callback

    def step(info: StepInfo) -> torch.Tensor:
        x = blend(info.x, info.sigma_next)
        if callback is not None:
            callback(replace(info, x=x))
        return x

    return step


def with_inpaint_channels(net: Callable[..., torch.Tensor], extra: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A model-stack layer for a 9-channel inpainting U-Net: append ``extra`` (B, 1 + C, h, w) — the mask and the
    masked image's latent — to the latent channels, repeated for a guided batch (2B rows)."""

    def inpainting(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
        rows = extra.to(x.dtype).repeat(x.shape[0] // extra.shape[0], 1, 1, 1)
        return net(torch.cat([x, rows], dim=1), t, context, **kwargs)

    return inpainting


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
            seeds: Seeds, sampler: SamplerChoice, shape: tuple[int, ...], tile: int | None = None) -> Start:
    """The starting point of a generation of latent ``shape`` (1, C, h, w) per image, on the model's device, when
    there is an init image or the U-Net is an inpainting one (plain txt2img starts in ``Pipeline.generate``).

    Generator draws per image, as diffusers' pipelines make them: txt2img the noise; img2img the image's posterior
    sample, then the noise; inpainting the posterior sample (skipped by a 9-channel U-Net at strength 1), the noise,
    then the masked image's posterior sample (drawn for a 4-channel U-Net too, which does not use it, so that an
    ancestral sampler's later draws stay in step). At strength 1 inpainting starts from pure noise, img2img from the
    image noised to σ₀. The noise is ``seeds``' :func:`~nijimi.diffusion.noise.starting_noise` (variation seeds).
    """
    generators = seeds.generators
    schedule, device = model.config.schedule, next(model.vae.parameters()).device
    in_channels, z = model.config.unet.in_channels, shape[1]
    if in_channels not in (z, 2 * z + 1):
        raise ImageError(f"a U-Net with {in_channels} input channels (instruct-pix2pix?) is not supported here")
    inpaint_unet = in_channels == 2 * z + 1
    f = model.config.vae.downscale_factor
    width, height = shape[3] * f, shape[2] * f
    if source.image is None:
        x = starting_noise(shape, seeds).to(device) * sampler.start_scale(float(sigmas[0]), schedule)
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
    noise = starting_noise(shape, seeds).to(device)
    x = noise * sampler.start_scale(float(sigmas[0]), schedule) if full_noise else \
        noised_latent(known, noise, sigmas, start)
    if source.mask is None:
        return Start(start, x)
    mask = mask_tensor(source.mask, width, height).to(device)
    latent_mask = F.interpolate(mask, size=shape[2:])
    if inpaint_unet:
        masked = _encode(model, pixels * (mask < 0.5), generators, tile)
        return Start(start, x, torch.cat([latent_mask.expand(len(generators), -1, -1, -1), masked], dim=1))
    initial_noise(shape, generators)  # the draw of the masked image's posterior sample; only 9-channel U-Nets use it
    return Start(start, x, None, masked_blend(known, noise, latent_mask))
