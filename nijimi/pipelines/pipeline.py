"""One object that turns requests into images with a loaded model: ``nijimi.load(...)`` → ``pipe.generate(...)``.

The path of a prompt: the text encoder makes the conditioning of every step (A1111's rules, :mod:`nijimi.text.prompt`;
:class:`Conditioner` caches each prompt's encoding: a second generation with the same prompt, steps and clip skip
runs no text-encoder pass), the sampler walks σ down through a stack of small wrappers around the U-Net, built in
:meth:`Pipeline.model_stack` (per-step conditioning → guidance interval → denoiser → guidance → dtype → DeepCache →
ControlNet residuals → inpainting channels → U-Net; a layer that is switched off is not in the stack), and the VAE (a
request's own ``vae`` swapped in for that call, or a TAESD tiny decoder) decodes the latent. img2img and inpainting
only change the starting latent and add a per-step blend (:mod:`nijimi.pipelines.edit`); A1111's hires fix runs a
second such pass on the upscaled latents of the first (:mod:`nijimi.pipelines.hires`).
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from nijimi.diffusion.choice import default_sampler
from nijimi.diffusion.guidance import Denoiser, GuidedNetwork
from nijimi.diffusion.noise import starting_noise
from nijimi.diffusion.samplers import Callback, StepInfo
from nijimi.embedded import EMBEDDED, embedded_path
from nijimi.errors import CheckpointError, ConfigError, PromptError
from nijimi.io.checkpoint import LoadReport, load_model
from nijimi.io.embeddings import EmbeddingLibrary
from nijimi.io.pngmeta import model_hash
from nijimi.io.taesd import load_taesd
from nijimi.io.vae_file import load_vae
from nijimi.models.ldm import LatentDiffusion
from nijimi.models.taesd import TAESD
from nijimi.models.vae import VAE
from nijimi.pipelines import edit, hires
from nijimi.pipelines.adapters import apply_loras
from nijimi.pipelines.control import ControlRun, prepare_control, with_controlnets
from nijimi.pipelines.images import check_size, to_pil, to_unit
from nijimi.pipelines.preview import LatentRGB, fit_latent_rgb
from nijimi.pipelines.request import GenerationRequest
from nijimi.pipelines.runtime import (
    check_generation_memory,
    choose_attention_slice,
    choose_vae_tile,
    dtype_name,
    resolve_device,
)
from nijimi.pipelines.shortcuts import with_deepcache, with_guidance_interval
from nijimi.text.prompt import ScheduledCond, encode_prompt_schedule

CACHE_SIZE = 32
"""Prompt encodings kept per pipeline (an SD 1.x encoding of one text is 77 × 768 floats, 236 kB)."""


@dataclass(frozen=True)
class StepConditioning:
    """The prompt's and (with guidance) the negative prompt's conditioning over the sampling steps."""

    cond: ScheduledCond
    uncond: ScheduledCond | None

    @property
    def embeddings(self) -> list[str]:
        """The textual-inversion embeddings used: the prompt's, then the negative prompt's others (A1111's order)."""
        return list(dict.fromkeys([*self.cond.embeddings, *(self.uncond.embeddings if self.uncond else ())]))

    @property
    def guidance_weight(self) -> float:
        """A1111's prompt weight (``"a cat :1.5"``) multiplies the guidance scale."""
        return self.cond.weight

    def at(self, step: int, batch: int) -> tuple[dict, dict | None]:
        """The U-Net inputs for sampling step ``step`` (0-based), repeated for ``batch`` images: the text ``context``
        and ``is_cond`` (batch,) bool, True in the conditional branch (guided batches keep telling the rows apart)."""
        context = self.cond.at_step(step).expand(batch, -1, -1)
        c = {"context": context, "is_cond": torch.ones(batch, dtype=torch.bool, device=context.device)}
        if self.uncond is None:
            return c, None
        return c, {"context": self.uncond.at_step(step).expand(batch, -1, -1), "is_cond": ~c["is_cond"]}

    def per_step(self, denoiser: Callable[..., torch.Tensor], first: int, batch: int) -> Callable[..., torch.Tensor]:
        """The top of the model stack, what the sampler calls: ``model(x, σ, step=i)`` gives ``denoiser`` the
        conditioning of sampling step ``first + i`` (prompt editing picks the text per step; img2img samplers start
        at step ``first``) and that step index."""

        def model(x: torch.Tensor, sigma: torch.Tensor, *, step: int) -> torch.Tensor:
            cond, uncond = self.at(first + step, batch)
            return denoiser(x, sigma, cond=cond, uncond=uncond, step=first + step)

        return model


class Conditioner:
    """Encodes prompts with the model's tokenizer and text encoder, caching each prompt's encoding.

    Encodings come in the text encoder's dtype, on its device.
    """

    def __init__(self, model: LatentDiffusion) -> None:
        self.model = model
        self.tokenizer = model.config.tokenizer()
        self.cache: OrderedDict[tuple, ScheduledCond] = OrderedDict()

    @torch.inference_mode()
    def schedule(self, prompt: str, steps: int, clip_skip: int | None, negative: bool,
                 embeddings: EmbeddingLibrary | None = None) -> ScheduledCond:
        """The encoded prompt schedule of ``prompt`` over ``steps`` steps (see ``encode_prompt_schedule``), with the
        textual-inversion ``embeddings`` it may name."""
        key = (prompt, steps, clip_skip, negative, embeddings and embeddings.key)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        text_encoder = self.model.text_encoder
        device = next(text_encoder.parameters()).device
        vocabulary = embeddings and embeddings.vocabulary(self.tokenizer)
        encode = lambda ids: text_encoder(ids.to(device), clip_skip=clip_skip,  # noqa: E731
                                          extra=vocabulary and vocabulary.vectors)
        self.cache[key] = encode_prompt_schedule(prompt, steps, self.tokenizer, encode, negative=negative,
                                                 vocabulary=vocabulary)
        if len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        return self.cache[key]

    def step_conditioning(self, prompt: str, negative: str, steps: int, clip_skip: int | None,
                          guided: bool, embeddings: EmbeddingLibrary | None = None) -> StepConditioning:
        """Conditioning for every step; ``guided`` adds the negative prompt's (the unconditional branch); both may name
        textual-inversion ``embeddings``."""
        return StepConditioning(self.schedule(prompt, steps, clip_skip, False, embeddings),
                                self.schedule(negative, steps, clip_skip, True, embeddings) if guided else None)


@dataclass
class Generation:
    """What :meth:`Pipeline.generate` returns: images, their seeds, the final latents (B, C, h, w), the decoded
    ``pixels`` (B, 3, H, W) float32 in [0, 1] the images were rounded from, the request as it ran (seed, size,
    sampler, VAE tile and attention slice filled in), and the keys of adapter files that fit no module of the model
    and were left out (file → key → why; only files that had any), and the textual-inversion embeddings the prompts
    used (name → file, in A1111's order)."""

    images: list[Image.Image]
    seeds: list[int]
    latents: torch.Tensor
    pixels: torch.Tensor
    request: GenerationRequest
    lora_unmatched: dict[Path, dict[str, str]] = field(default_factory=dict)
    embeddings: dict[str, Path] = field(default_factory=dict)


@dataclass
class Pipeline:
    """A loaded model plus what is needed to describe its images (name, file hash) and a prompt-embedding cache.

    ``device``: where the networks run (``"cpu"``, ``"cuda"``, ``"cuda:1"`` …); seeds give the same starting noise
    everywhere (it is drawn on the CPU). ``dtype``: the U-Net's and text encoder's weight dtype (float32 or
    bfloat16); the VAE and every sampler computation stay float32. ``probe_layer``: a model-stack layer put right
    above the U-Net (under DeepCache and the ControlNets) while an explain view reads the U-Net's insides
    (:mod:`nijimi.explain.daam`); None, and so not in the stack, otherwise.
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
        self.tiny_decoders: dict[Path, TAESD] = {}
        self.vaes: dict[Path, VAE] = {}
        self.latent_rgb: LatentRGB | None = None
        self.probe_layer: Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]] | None = None

    @property
    def native_size(self) -> int:
        """Default image side in pixels: the U-Net's training latent size × the VAE factor."""
        cfg = self.model.config
        return cfg.unet.sample_size * cfg.vae.downscale_factor

    def generate(self, request: GenerationRequest | str, negative_prompt: str | None = None, /, *,
                 callback: Callable[[StepInfo], None] | None = None, **fields: Any) -> Generation:
        """Generate ``request.batch`` images; image i uses seed ``request.seed + i``. A prompt (and negative prompt)
        and keyword ``fields`` build the request (``pipe.generate("a red circle", steps=10)``); with a request they
        replace its fields.

        The initial latent of image i is ``torch.randn((1, C, H/f, W/f), generator=torch.Generator().manual_seed(seed
        + i))`` — the convention diffusers and A1111 share — so a seed means the same picture across tools (A1111's
        variation seed and seed resize change it: :func:`~nijimi.diffusion.noise.starting_noise`). LoRAs are
        merged for this call and the weights restored exactly afterwards; their keys that fit no module are left out
        (``Generation.lora_unmatched``), or refused with ``strict_loras``. The prompts may name textual-inversion
        embeddings of ``embeddings_dir`` / ``embeddings`` (``Generation.embeddings`` lists those used). ``callback``
        sees every sampling step (of both passes of the hires fix, ``hires_scale`` or ``hires_size``:
        :func:`nijimi.pipelines.hires.generate`).
        """
        if negative_prompt is not None:
            fields["negative_prompt"] = negative_prompt
        if isinstance(request, str):
            request = GenerationRequest(request, **fields)
        elif fields:
            request = request.replace(**fields)
        request = self.with_model_defaults(request)
        if hires.enabled(request):
            request, x, pixels, unmatched, embeddings = hires.generate(self, request, callback)
        else:
            with self.vae_swapped(request.vae):
                request, x, unmatched, embeddings = self.sample_latents(request, callback)
                pixels = self.decode(x, request.vae_tile or None, request.decoder)
        seeds = [request.seed + i for i in range(request.batch)]
        return Generation(to_pil(pixels), seeds, x.cpu(), pixels, request, unmatched, embeddings)

    def with_model_defaults(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with the model's guidance scale (``ModelConfig.guidance``) when it names none."""
        return request if request.guidance is not None else request.replace(guidance=self.model.config.guidance)

    def sample_latents(self, request: GenerationRequest, callback: Callable[[StepInfo], None] | None = None
                       ) -> tuple[GenerationRequest, torch.Tensor, dict[Path, dict[str, str]], dict[str, Path]]:
        """The final latents (B, C, h, w) of ``request`` without the hires fix, not decoded, with the request as it
        ran (seed, size, sampler, guidance, VAE tile and attention slice filled in), the adapter keys left out and
        the textual-inversion embeddings used (:meth:`denoise`). An init image is encoded by the current VAE: call it
        inside :meth:`vae_swapped` of the request's ``vae``."""
        request = self.with_model_defaults(request)
        if not request.prompt and request.guidance != 1.0 and not request.negative_prompt:
            raise PromptError("the prompt is empty; give a prompt (or use --guidance 1 for unconditional samples)")
        cfg = self.model.config
        sampler = request.sampler or default_sampler(cfg.schedule, request.schedule)
        sigmas = sampler.sigmas(cfg.schedule, request.steps)
        source = edit.load_sources(request.init_image, request.mask)
        width, height = self._size(request, source)
        rows = request.batch * (1 + (request.guidance != 1.0))
        check_generation_memory(cfg.unet, cfg.vae, width, height, request.batch, rows)
        f = cfg.vae.downscale_factor
        shape = (1, cfg.vae.z_channels, height // f, width // f)
        noise_seeds = request.noise_seeds(f)
        vae_tile = choose_vae_tile(request.vae_tile, cfg.vae, width, height, request.batch)
        attention_slice = choose_attention_slice(request.attention_slice, cfg.unet, shape[2:], rows)
        request = request.replace(sampler=sampler, schedule=sampler.schedule, width=width, height=height,
                                  vae_tile=vae_tile or 0, attention_slice=attention_slice or 0)
        if source.image is None and cfg.unet.in_channels == cfg.vae.z_channels:  # txt2img: noise at σ₀
            start = edit.Start(0, starting_noise(shape, noise_seeds).to(self.device)
                               * sampler.start_scale(float(sigmas[0]), cfg.schedule))
        else:  # an init image, or an inpainting U-Net (its extra channels)
            start = edit.prepare(self.model, source, request.strength, sigmas, noise_seeds, sampler, shape, vae_tile)
        x, unmatched, embeddings = self.denoise(request, sigmas, start, noise_seeds.generators, callback)
        return request, x, unmatched, embeddings

    def denoise(self, request: GenerationRequest, sigmas: torch.Tensor, start: edit.Start,
                generators: list[torch.Generator], callback: Callable[[StepInfo], None] | None = None
                ) -> tuple[torch.Tensor, dict[Path, dict[str, str]], dict[str, Path]]:
        """Sample ``request`` (size, sampler and attention slice filled in) from ``start`` along ``sigmas`` (the
        request's whole schedule): its ControlNets prepared for its size, its LoRAs merged for the call, its
        prompts' conditioning (with the textual-inversion embeddings they name), the model stack; ``generators`` (one
        per image) feed a stochastic sampler. Returns the latents, the adapter keys left out and the embeddings
        used (name → file)."""
        run = prepare_control(request.control, self.model.config, request.width, request.height, start.index,
                              request.steps, self.device, self.dtype)
        library = None
        if request.embeddings_dir or request.embeddings:
            library = EmbeddingLibrary(request.embeddings_dir, request.embeddings, self.model.config.text.width)
        applied = apply_loras(self, request.loras, request.prompt, request.lora_dir, request.strict_loras)
        try:
            conds = self.conditioner.step_conditioning(applied.prompt, request.negative_prompt, request.steps,
                                                       request.clip_skip, request.guidance != 1.0, library)
            x = self._sample(request, sigmas, start, self.model_stack(request, conds, start, run),
                             request.sampler.noise(start.latent, float(sigmas[0]), generators), callback)
        finally:
            applied.undo()
        embeddings = {name: library.path(name) for name in conds.embeddings} if library else {}
        return x, applied.unmatched, embeddings

    def model_stack(self, request: GenerationRequest, conds: StepConditioning, start: edit.Start,
                    run: ControlRun) -> Callable[..., torch.Tensor]:
        """The per-step model the sampler calls, ``model(x, σ, step=i) → x̂₀``, composed of small wrappers: the
        step's conditioning, the guidance interval, the denoiser (σ ↔ t, prediction type), classifier-free guidance,
        the pipeline's dtype, DeepCache, ControlNet residuals, an inpainting U-Net's extra channels, the U-Net."""
        net = self._unet if self.probe_layer is None else self.probe_layer(self._unet)
        if start.extra is not None:
            net = edit.with_inpaint_channels(net, start.extra)
        shallow = net
        if run.units:
            net = with_controlnets(net, run)
        if request.deepcache > 1:
            net = with_deepcache(net, shallow, request.deepcache, start.index)
        guided = GuidedNetwork(_in_dtype(net, self.dtype), request.guidance * conds.guidance_weight,
                               request.guidance_rescale)
        schedule = self.model.config.schedule
        denoiser = Denoiser(guided, schedule, timesteps=request.sampler.timestep_table(schedule, request.steps))
        if request.guidance_interval is not None:
            denoiser = with_guidance_interval(denoiser, *request.guidance_interval)
        return conds.per_step(denoiser, start.index, request.batch)

    def _sample(self, request: GenerationRequest, sigmas: torch.Tensor, start: edit.Start, model: Callable,
                noise: Callable | None, callback: Callback | None) -> torch.Tensor:
        """Run the request's sampler from ``start`` (img2img: the tail of ``sigmas``); strength 0 runs no step."""
        if start.index >= request.steps:
            return start.latent
        options = request.sampler.options(self.model.config.schedule, request.eta, request.steps)
        self.model.unet.set_attention_slice(request.attention_slice or None)
        with torch.inference_mode():
            return request.sampler.fn(model, start.latent, sigmas[start.index:], noise=noise,
                                      callback=edit.with_blend(start.blend, callback), **options)

    def decode(self, latents: torch.Tensor, tile: int | None = None, decoder: str = "vae") -> torch.Tensor:
        """Scaled latents (B, C, h, w) → pixels (B, 3, H, W) float32 in [0, 1] on the CPU, through the VAE (``tile``
        pixels tiles its decode) or, for ``decoder`` ``tiny[:PATH]``, a TAESD decoder (:meth:`tiny_decoder`)."""
        latents = latents.to(self.device, torch.float32)
        if decoder == "vae":
            return to_unit(self.model.vae.decode_latents(latents, tile=tile))
        with torch.inference_mode():
            return to_unit(self.tiny_decoder(decoder).decode_latents(latents))

    def preview(self, latents: torch.Tensor, decoder: str = "rgb") -> torch.Tensor:
        """Quick pixels (B, 3, H, W) float32 in [0, 1] on the CPU of scaled latents, such as a step callback's
        ``info.denoised`` (x̂₀): ``"rgb"``, a linear latent → RGB map fitted to the VAE on first use
        (:func:`~nijimi.pipelines.preview.fit_latent_rgb`); other values decode as :meth:`decode` does."""
        if decoder != "rgb":
            return self.decode(latents, decoder=decoder)
        if self.latent_rgb is None:
            self.latent_rgb = fit_latent_rgb(self.model.vae)
        return self.latent_rgb(latents)

    def tiny_decoder(self, decoder: str) -> TAESD:
        """The TAESD of ``decoder``: ``tiny:PATH``, or ``tiny``, the ``taesd_decoder.safetensors`` beside the model's
        weights; loaded once, on the pipeline's device. Its factor and latent channels must be the VAE's."""
        if decoder == "tiny" and self.source is None:
            raise ConfigError("decoder tiny: this pipeline's model was not loaded from a file; give tiny:PATH")
        folder = Path(self.source or "")
        path = Path(decoder[5:]) if decoder.startswith("tiny:") else \
            (folder if folder.is_dir() else folder.parent) / "taesd_decoder.safetensors"
        if decoder == "tiny" and not path.is_file():
            raise CheckpointError(f"{path}: the model ships no tiny decoder here; give tiny:PATH")
        if path not in self.tiny_decoders:
            tiny, vae = load_taesd(path), self.model.config.vae
            kind = "a TAESD decoder of factor {} for {} latent channels"
            wanted = kind.format(vae.downscale_factor, vae.z_channels)
            found = kind.format(tiny.config.downscale_factor, tiny.config.latent_channels)
            found = "no decoder" if tiny.decoder is None else found
            if found != wanted:
                raise CheckpointError(f"{path}: holds {found}; this model needs {wanted}")
            self.tiny_decoders[path] = tiny.requires_grad_(False).to(self.device)
        return self.tiny_decoders[path]

    @contextlib.contextmanager
    def vae_swapped(self, path: str | os.PathLike | None) -> Iterator[None]:
        """While the block runs, the model's VAE is the one at ``path`` (None: its own), so the img2img encode and the
        decode both use it; the model's own is put back afterwards, also on errors. The VAE is loaded by
        :func:`~nijimi.io.vae_file.load_vae` (its latents must be the model's), float32 on the pipeline's device; only
        the last one is kept in ``vaes`` (an SD VAE is 335 MB), so a run with one ``--vae`` loads it once."""
        own = self.model.vae
        if path is not None:
            path = Path(path)
            if path not in self.vaes:
                self.vaes = {path: load_vae(path, self.model.config.vae).requires_grad_(False).to(self.device)}
            self.model.first_stage_model = self.vaes[path]
        try:
            yield
        finally:
            self.model.first_stage_model = own

    def _size(self, request: GenerationRequest, source: edit.Sources) -> tuple[int, int]:
        w, h = request.width, request.height
        if source.image is not None:
            w = source.image.size[0] // 8 * 8 if w is None else w
            h = source.image.size[1] // 8 * 8 if h is None else h
        w, h = w or self.native_size, h or self.native_size
        check_size(w, h, self.model.config.vae.downscale_factor)
        return w, h

    def _unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *, step: int | None = None,
              is_cond: torch.Tensor | None = None, **residuals: Any) -> torch.Tensor:
        """The bottom of the model stack: the U-Net (``residuals``: ControlNet down/mid residuals, DeepCache's
        ``cache``)."""
        return self.model.unet(x, t, context, **residuals)


def _in_dtype(net: Callable[..., torch.Tensor], dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """Run ``net`` with its latents and text context in the pipeline's weight dtype and return float32."""

    def cast(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return net(x.to(dtype), t, context.to(dtype), **kwargs).float()

    return cast


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
