"""One object that turns prompts into images with a loaded model: ``nijimi.load(...)`` → ``pipe.generate(...)``.

The path of a prompt: the text encoder makes the conditioning (:mod:`nijimi.pipelines.conditioning`), the sampler
walks σ down with classifier-free guidance through the U-Net (:mod:`nijimi.diffusion`), the VAE decodes the latent.
img2img and inpainting only change the starting latent and add a per-step blend (:mod:`nijimi.pipelines.edit`).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from nijimi.diffusion.denoiser import Denoiser
from nijimi.diffusion.guidance import GuidedNetwork
from nijimi.diffusion.samplers import StepInfo, canonical_name, default_sampler, parse_sampler
from nijimi.diffusion.schedules import sampling_sigmas
from nijimi.embedded import embedded_path
from nijimi.errors import ConfigError, PromptError, SamplerError
from nijimi.io.checkpoint import LoadReport, load_model
from nijimi.io.pngmeta import model_hash
from nijimi.models.ldm import LatentDiffusion
from nijimi.pipelines import edit
from nijimi.pipelines.adapters import apply_loras
from nijimi.pipelines.conditioning import Conditioner, StepConditioning
from nijimi.pipelines.control import ControlInput, ControlRun, ControlStep, prepare_control
from nijimi.pipelines.images import check_size, to_pil, to_unit
from nijimi.pipelines.runtime import choose_attention_slice, choose_vae_tile, dtype_name, resolve_device

EMBEDDED = "embedded"


@dataclass
class Generation:
    """What :meth:`Pipeline.generate` returns: images, their seeds, the final latents (B, C, h, w), the decoded
    ``pixels`` (B, 3, H, W) float32 in [0, 1] the images were rounded from, every setting used, and the keys of
    adapter files that fit no module of the model and were left out (file → key → why; only files that had any)."""

    images: list[Image.Image]
    seeds: list[int]
    latents: torch.Tensor
    pixels: torch.Tensor
    settings: dict = field(default_factory=dict)
    lora_unmatched: dict[Path, dict[str, str]] = field(default_factory=dict)


@dataclass
class Pipeline:
    """A loaded model plus what is needed to describe its images (name, file hash) and a prompt-embedding cache.

    ``device``: where the networks run (``"cpu"``, ``"cuda"``, ``"cuda:1"`` …); seeds give the same starting noise
    everywhere (it is drawn on the CPU). ``dtype``: the U-Net's and text encoder's weight dtype (float32 or
    bfloat16); the VAE and every sampler computation stay float32.
    """

    model: LatentDiffusion
    name: str = "model"
    source: str | None = None
    model_hash: str | None = None
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    report: LoadReport | None = None

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        dtype_name(self.dtype)  # ConfigError for a dtype other than float32 and bfloat16
        self.model.eval().requires_grad_(False)
        self.model.vae.to(self.device, torch.float32)
        self.model.unet.to(self.device, self.dtype)
        self.model.text_encoder.to(self.device, self.dtype)
        self.conditioner = Conditioner(self.model)

    @property
    def native_size(self) -> int:
        """Default image side in pixels: the U-Net's training latent size × the VAE factor."""
        cfg = self.model.config
        return cfg.unet.sample_size * cfg.vae.downscale_factor

    def generate(self, prompt: str, negative_prompt: str = "", *, steps: int = 20, sampler: str | None = None,
                 cfg: float = 7.0, seed: int | None = None, width: int | None = None, height: int | None = None,
                 batch: int = 1, init_image: Image.Image | str | os.PathLike | None = None, strength: float = 0.75,
                 mask: Image.Image | str | os.PathLike | None = None, clip_skip: int | None = None,
                 guidance_rescale: float = 0.0, vae_tile: int | None = None, attention_slice: int | None = None,
                 control: Sequence[ControlInput] | None = None, loras: Sequence = (), lora_dir: str | None = None,
                 strict_loras: bool = False, callback: Callable[[StepInfo], None] | None = None) -> Generation:
        """Generate ``batch`` images; image i uses seed ``seed + i`` (a random seed when ``seed`` is None).

        ``init_image`` (+ ``strength``) makes it img2img; with ``mask`` (white = repaint) it is inpainting. Sizes
        default to the init image's size, else the model's native size. The initial latent of image i is
        ``torch.randn((1, C, H/f, W/f), generator=torch.Generator().manual_seed(seed + i))`` — the convention
        diffusers and A1111 share — so a seed means the same picture across tools. ``vae_tile`` (pixels) and
        ``attention_slice`` (query rows) bound memory; None chooses from the free memory, 0 switches them off.
        ``sampler`` None: the model's :func:`~nijimi.diffusion.samplers.default_sampler`.
        ``control``: ControlNets (units, moved to the pipeline's device and dtype, or ``--control`` specs).
        ``loras``: adapters ``(path, te_weight, unet_weight)`` merged for this call, with the prompt's A1111 tags
        ``<lora:NAME:W>`` (NAME looked up in ``lora_dir``); the weights are restored exactly afterwards. Their keys
        that fit no module are left out (``Generation.lora_unmatched``), or refused with ``strict_loras``.
        """
        if not prompt and cfg != 1.0 and not negative_prompt:
            raise PromptError("the prompt is empty; give a prompt (or use --cfg 1 for unconditional samples)")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch {batch!r} must be an integer >= 1")
        if not 0.0 <= strength <= 1.0:
            raise SamplerError(f"strength={strength!r} must be within [0, 1]")
        sampler = sampler or default_sampler(self.model.config.schedule)
        fn, spacing = parse_sampler(sampler)
        sigmas = sampling_sigmas(self.model.config.schedule, steps, spacing)
        seed = secrets.randbelow(2**32) if seed is None else int(seed)
        source = edit.load_sources(init_image, mask)
        width, height = self._size(width, height, source)
        seeds = [seed + i for i in range(batch)]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        f = self.model.config.vae.downscale_factor
        shape = (1, self.model.config.vae.z_channels, height // f, width // f)
        vae_tile = choose_vae_tile(vae_tile, self.model.config.vae, width, height, batch)
        attention_slice = choose_attention_slice(attention_slice, self.model.config.unet, shape[2:],
                                                 batch * (1 + (cfg != 1.0)))
        self.model.unet.set_attention_slice(attention_slice)
        start = edit.prepare(self.model, source, strength, sigmas, generators, sampler, shape, vae_tile)
        run = prepare_control(control, self.model.config, width, height, start.index, steps, self.device, self.dtype)
        applied = apply_loras(self, loras, prompt, lora_dir, strict_loras)
        try:
            conds = self.conditioner.step_conditioning(applied.prompt, negative_prompt, steps, clip_skip, cfg != 1.0)
            guided = GuidedNetwork(self._network, cfg * conds.guidance_weight, guidance_rescale)
            denoiser = Denoiser(guided, self.model.config.schedule, quantize=_quantized(sampler))
            extra = {} if start.extra is None else {"extra": start.extra}
            with torch.inference_mode():
                x = fn(_per_step(denoiser, conds, sigmas, batch, extra, run), start.latent, sigmas,
                       generator=generators, start=start.index, callback=callback, blend=start.blend)
        finally:
            applied.undo()
        pixels = self.decode(x, vae_tile)
        settings = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps,
                    "sampler": canonical_name(sampler), "cfg": cfg, "seed": seed, "width": width, "height": height,
                    "batch": batch, "clip_skip": clip_skip, "guidance_rescale": guidance_rescale,
                    "vae_tile": vae_tile or 0, "attention_slice": attention_slice or 0,
                    "dtype": dtype_name(self.dtype), **source.settings(strength), **run.settings,
                    **_lora_settings(loras, lora_dir)}
        return Generation(to_pil(pixels), seeds, x.cpu(), pixels, settings, applied.unmatched)

    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Scaled latents (B, C, h, w) → pixels (B, 3, H, W) float32 in [0, 1] on the CPU; ``tile`` (pixels) tiles
        the VAE decode."""
        return to_unit(self.model.vae.decode_latents(latents.to(self.device, torch.float32), tile=tile))

    def _size(self, width: int | None, height: int | None, source: edit.Sources) -> tuple[int, int]:
        if source.image is not None:
            w, h = source.image.size
            w = w - w % 8 if width is None else width
            h = h - h % 8 if height is None else height
        else:
            w = self.native_size if width is None else width
            h = self.native_size if height is None else height
        cfg = self.model.config
        check_size(w, h, cfg.vae.downscale_factor)
        return w, h

    def _network(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, extra: torch.Tensor | None = None,
                 control: ControlStep | None = None, is_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The U-Net call in the pipeline's dtype, returning float32; ``extra`` holds the inpainting U-Net's
        additional input channels (mask, masked image); ``control`` adds ControlNet residuals (see ControlRun)."""
        x, context = x.to(self.dtype), context.to(self.dtype)
        down, mid = (None, None) if control is None else control(x, t, context, is_cond)
        x = x if extra is None else torch.cat([x, extra.to(self.dtype)], dim=1)
        return self.model.unet(x, t, context, down_residuals=down, mid_residual=mid).float()


def _lora_settings(loras: Sequence, lora_dir: str | None) -> dict:
    """The adapters asked for (absolute paths, so ``reproduce`` finds them from anywhere); tags stay in the prompt."""
    out = {"loras": [[str(Path(p).resolve()), float(te), float(unet)] for p, te, unet in loras]} if loras else {}
    return {**out, "lora_dir": str(Path(lora_dir).resolve())} if lora_dir else out


def _quantized(sampler: str) -> bool:
    """diffusers' multistep solvers round the timesteps of Karras/exponential σ's to integers; match them."""
    name = canonical_name(sampler)
    return name.startswith(("dpm++", "unipc")) and name.endswith(("-karras", "-exponential"))


def _per_step(denoiser: Denoiser, conds: StepConditioning, sigmas: torch.Tensor, batch: int, extra: dict,
              control: ControlRun):
    """A denoiser ``D(x, σ)`` that gives the U-Net the conditioning of the current step (prompt editing picks the
    text per step, ControlNets act in a window; step i runs at ``sigmas[i]``: the number of later σ's ≥ σ)."""
    levels = sigmas.tolist()[1:]

    def model(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        s = float(torch.as_tensor(sigma).reshape(-1)[0]) * (1 - 1e-6)
        cond, uncond = conds.at(step := sum(level >= s for level in levels), batch)
        c_extra, u_extra = control.inputs(step, batch, x.device)
        return denoiser(x, sigma, cond={**cond, **extra, **c_extra},
                        uncond=None if uncond is None else {**uncond, **extra, **u_extra})

    return model


def load(source: str | os.PathLike = EMBEDDED, config=None, *, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> Pipeline:
    """Load ``"embedded"`` (the shipped tiny model), a single checkpoint file or a diffusers folder, to run on
    ``device`` with the U-Net and text encoder in ``dtype`` (see :class:`Pipeline`)."""
    device = resolve_device(device)
    dtype_name(dtype)  # fail before loading the weights
    if str(source) == EMBEDDED:
        path = embedded_path()
        name = EMBEDDED
    else:
        path = Path(source).absolute()
        name = path.stem if path.is_file() else path.name
    model, report = load_model(path, config=config)
    digest = model_hash(path) if path.is_file() else None
    return Pipeline(model, name=name, source=str(path), model_hash=digest, device=device, dtype=dtype, report=report)
