"""A1111's hires fix: a first pass at the requested size, an upscale, then an img2img pass at the larger size.

What AUTOMATIC1111's ``StableDiffusionProcessingTxt2Img`` does, and so what :func:`generate` does:

- **Size** (its ``calculate_target_resolution``). ``hires_scale`` s upscales to ``int(width·s) × int(height·s)``;
  ``hires_size`` (W, H), its "resize width/height to", to that size: 0 on one side keeps the aspect ratio, two sides
  upscale to cover both and crop the centre of the upscaled latent. The latent is ``size // f`` cells (A1111's
  ``// 8``), so an uncropped side rounds down to a multiple of 8 pixels.
- **Upscale.** The latent upscalers interpolate the first pass's latents with ``torch.nn.functional.interpolate``
  (:data:`LATENT_UPSCALERS`, A1111's ``latent_upscale_modes``). The pixel upscalers (Lanczos, Nearest) decode with
  the VAE, round to 8 bits as A1111 does (truncating), resize with PIL and encode again, taking the posterior's mean
  where A1111 samples it from its global RNG (which no seed fixes).
- **Second pass** (``sample_hr_pass`` → ``sample_img2img`` → ``setup_img2img_steps``). Exactly N steps run, N =
  ``hires_steps`` or else ``steps``: the last N of a schedule of ``int(N / min(denoise, 0.999))`` steps
  (:func:`hires_schedule`). It starts from the upscaled latent plus noise drawn afresh from each image's seed (with the
  same variation seed and seed resize) times the σ of its first step, with the prompt's conditioning (or
  ``hires_prompt``'s), the sampler (or ``hires_sampler``), LoRAs and ControlNets of the request.

One difference: nijimi's prompt editing (``[a:b:0.5]``) in the second pass counts steps on the whole
``int(N / denoise)`` schedule, as its img2img does, where A1111 counts the N steps of the pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nijimi.diffusion.choice import default_sampler
from nijimi.diffusion.noise import starting_noise
from nijimi.diffusion.samplers import StepInfo
from nijimi.errors import ConfigError
from nijimi.pipelines import edit
from nijimi.pipelines.images import to_tensor
from nijimi.pipelines.runtime import choose_attention_slice, choose_vae_tile

if TYPE_CHECKING:
    from nijimi.pipelines.pipeline import Pipeline
    from nijimi.pipelines.request import GenerationRequest

LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
"""A1111's latent upscalers: name → (``interpolate`` mode, antialias)."""
PIXEL_UPSCALERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
"""A1111's built-in pixel upscalers: name → PIL resampling filter."""
MAX_SCALE = 4.0
"""The largest ``hires_scale``: A1111's slider goes from 1 to 4."""
MAX_SIDE = 8192
"""The largest side of a hires image in pixels (an SD U-Net's activations at 8192² px already take tens of GB)."""


@dataclass(frozen=True)
class HiresSize:
    """The second pass's geometry: the latent size (h, w) the first pass's latents are upscaled to, the cells cropped
    from it (top, bottom, left, right), and the image size of the result in pixels."""

    upscaled: tuple[int, int]
    crop: tuple[int, int, int, int]
    width: int
    height: int


def enabled(request: GenerationRequest) -> bool:
    """Whether ``request`` asks for the hires fix (a scale or a size)."""
    return request.hires_scale is not None or request.hires_size is not None


def hires_size(width: int, height: int, scale: float | None, size: tuple[int, int] | None,
               factor: int) -> HiresSize:
    """A1111's hires target for a first pass of ``width`` × ``height`` pixels and a VAE of downscale ``factor``: by
    ``scale``, or to ``size`` (W, H) when that is given (see the module's docstring). ConfigError when a side of the
    result is not within [``lcm(8, factor)``, :data:`MAX_SIDE`] pixels."""
    if size is None:
        upscale_to = target = (int(width * scale), int(height * scale))
    else:
        by_width = size[1] == 0 or (size[0] != 0 and width / height < size[0] / size[1])
        upscale_to = (size[0], size[0] * height // width) if by_width else (size[1] * width // height, size[1])
        target = upscale_to if 0 in size else size
    multiple = math.lcm(8, factor)
    (w, left, right), (h, top, bottom) = (_axis(u, t, factor, multiple) for u, t in zip(upscale_to, target,
                                                                                        strict=True))
    result = HiresSize((h, w), (top, bottom, left, right), (w - left - right) * factor, (h - top - bottom) * factor)
    if not all(multiple <= side <= MAX_SIDE for side in (result.width, result.height)):
        asked = f"--hires-size {size[0]}x{size[1]}" if size else f"--hires {scale}"
        raise ConfigError(f"{asked} on a {width}x{height} first pass makes a {result.width}x{result.height} image; "
                          f"its sides must be from {multiple} to {MAX_SIDE} pixels")
    return result


def _axis(upscale_to: int, target: int, factor: int, multiple: int) -> tuple[int, int, int]:
    """One side: (latent cells upscaled to, cells cropped before, cells cropped after)."""
    if upscale_to == target:
        return upscale_to // multiple * multiple // factor, 0, 0
    cut = (upscale_to - target) // factor
    return upscale_to // factor, cut // 2, (cut + 1) // 2


def hires_schedule(steps: int, denoise: float) -> tuple[int, int]:
    """A1111's ``setup_img2img_steps`` for a pass of ``steps`` steps at denoising strength ``denoise`` in (0, 1]:
    (schedule length ``int(steps / min(denoise, 0.999))``, index of its first σ that is run); the pass runs exactly
    ``steps`` steps."""
    total = int(steps / min(denoise, 0.999))
    return total, total - steps


@torch.inference_mode()
def upscale(pipe: Pipeline, latents: torch.Tensor, size: HiresSize, upscaler: str,
            tile: int | None = None) -> torch.Tensor:
    """The first pass's scaled latents (B, C, h, w) upscaled by ``upscaler`` to ``size.upscaled`` and cropped: the
    second pass's starting latents. A pixel upscaler decodes and encodes with ``pipe``'s VAE (``tile`` in pixels)."""
    if upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[upscaler]
        big = F.interpolate(latents, size=size.upscaled, mode=mode, antialias=antialias)
    else:
        f = pipe.model.config.vae.downscale_factor
        width, height = size.upscaled[1] * f, size.upscaled[0] * f
        pixels = pipe.decode(latents, tile).permute(0, 2, 3, 1).numpy()
        images = [Image.fromarray((255.0 * a).astype(np.uint8)).resize((width, height), PIXEL_UPSCALERS[upscaler])
                  for a in pixels]
        batch = torch.cat([to_tensor(image, width, height) for image in images]).to(pipe.device)
        big = edit.posterior(pipe.model, batch, tile).mean * pipe.model.config.scaling_factor
    top, bottom, left, right = size.crop
    return big[:, :, top:big.shape[2] - bottom, left:big.shape[3] - right]


def generate(pipe: Pipeline, request: GenerationRequest, callback: Callable[[StepInfo], None] | None = None
             ) -> tuple[GenerationRequest, torch.Tensor, torch.Tensor, dict, dict]:
    """Run ``request`` with the hires fix on ``pipe``: the first pass at the request's size, :func:`upscale`, the
    second pass (see the module's docstring); ``callback`` sees the steps of both passes. Returns the request as it
    ran (first-pass size; the VAE tile and attention slice chosen for the hires size, used by both passes), the hires
    latents (B, C, h, w), their pixels (B, 3, H, W) in [0, 1], the adapter keys left out and the textual-inversion
    embeddings used by either pass (as :meth:`Pipeline.generate <nijimi.pipelines.pipeline.Pipeline.generate>`
    returns them)."""
    cfg = pipe.model.config
    if request.init_image is not None:
        raise ConfigError("the hires fix (--hires, --hires-size) is for text to image; it takes no --init image")
    if cfg.unet.in_channels != cfg.vae.z_channels:
        raise ConfigError(f"the hires fix cannot run an inpainting model ({cfg.unet.in_channels}-channel U-Net)")
    f = cfg.vae.downscale_factor
    width, height = request.width or pipe.native_size, request.height or pipe.native_size
    size = hires_size(width, height, request.hires_scale, request.hires_size, f)
    rows = request.batch * (1 + (request.guidance != 1.0))
    request = request.replace(
        sampler=request.sampler or default_sampler(cfg.schedule, request.schedule), width=width, height=height,
        vae_tile=choose_vae_tile(request.vae_tile, cfg.vae, size.width, size.height, request.batch) or 0,
        attention_slice=choose_attention_slice(request.attention_slice, cfg.unet, (size.height // f, size.width // f),
                                               rows) or 0)
    total, start = hires_schedule(request.hires_steps or request.steps, request.hires_denoise)
    second = second_pass(request, size, total)
    with pipe.vae_swapped(request.vae):
        _, latents, unmatched, used = pipe.sample_latents(request.replace(hires_scale=None, hires_size=None), callback)
        latents = upscale(pipe, latents, size, request.hires_upscaler, request.vae_tile or None)
        seeds = second.noise_seeds(f)
        sigmas = second.sampler.sigmas(cfg.schedule, total)
        noise = starting_noise((1, *latents.shape[1:]), seeds).to(latents.device)
        begin = edit.Start(start, edit.noised_latent(latents, noise, sigmas, start))
        x, more, used_again = pipe.denoise(second, sigmas, begin, seeds.generators, callback)
        pixels = pipe.decode(x, request.vae_tile or None, request.decoder)
    return request, x, pixels, {**unmatched, **more}, {**used, **used_again}


def second_pass(request: GenerationRequest, size: HiresSize, steps: int) -> GenerationRequest:
    """The request of the second pass of ``request`` (sampler, size, tile and slice filled in): the hires size, the
    ``steps`` of its whole schedule (:func:`hires_schedule`), the hires sampler (η kept where it takes one) and
    prompts."""
    sampler = request.hires_sampler or request.sampler
    return request.replace(
        hires_scale=None, hires_size=None, width=size.width, height=size.height, sampler=sampler, steps=steps,
        eta=request.eta if sampler.takes_eta else None, prompt=request.hires_prompt or request.prompt,
        negative_prompt=request.hires_negative_prompt or request.negative_prompt)


def infotext(request: GenerationRequest) -> dict[str, object]:
    """A1111's hires fields of the infotext of ``request`` as it ran, in A1111's order (its "Denoising strength" goes
    earlier in the line, see ``nijimi.cli``); empty without the hires fix."""
    if not enabled(request):
        return {}
    differs = lambda mine, first: mine if mine and mine != first else None  # noqa: E731
    sampler = request.hires_sampler
    return {"Hires sampler": differs(sampler and sampler.display, request.sampler.display),
            "Hires prompt": differs(request.hires_prompt, request.prompt),
            "Hires negative prompt": differs(request.hires_negative_prompt, request.negative_prompt),
            "Hires upscale": request.hires_scale if request.hires_size is None else None,
            "Hires resize": request.hires_size,
            "Hires steps": request.hires_steps or None, "Hires upscaler": request.hires_upscaler}


INFOTEXT_FIELDS = {"Hires upscale": ("hires_scale", None), "Hires resize": ("hires_size", None),
                   "Hires steps": ("hires_steps", 0), "Hires upscaler": ("hires_upscaler", "Latent"),
                   "Hires sampler": ("hires_sampler", None), "Hires prompt": ("hires_prompt", ""),
                   "Hires negative prompt": ("hires_negative_prompt", "")}
"""A1111's hires infotext keys → (request field, A1111's value when the key is missing)."""


def request_fields(settings: Mapping[str, object]) -> dict[str, Any]:
    """The hires request fields an A1111 infotext states (``settings`` as :func:`~nijimi.io.pngmeta.parse_parameters`
    reads them; :data:`INFOTEXT_FIELDS`); empty when it has no hires fix. Missing keys take A1111's defaults."""
    if "Hires upscale" not in settings and "Hires resize" not in settings:
        return {}
    fields = {name: settings.get(key, default) for key, (name, default) in INFOTEXT_FIELDS.items()}
    if "Denoising strength" in settings:
        fields["hires_denoise"] = settings["Denoising strength"]
    return fields
