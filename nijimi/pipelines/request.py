"""One generation request: every knob of an image, declared once.

:class:`GenerationRequest` is checked when it is made. ``nijimi generate``'s flags are derived from its fields (each
field's ``cli`` metadata: flags, help, and the parser of the flag's text), :meth:`Pipeline.generate
<nijimi.pipelines.pipeline.Pipeline.generate>` takes it, the PNG recipe is :meth:`~GenerationRequest.to_dict` and
``nijimi reproduce`` is :meth:`~GenerationRequest.from_dict`. A new knob is one field here plus the code that uses it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from nijimi.adapters.tags import parse_lora_option
from nijimi.diffusion.choice import SamplerChoice, parse_sampler, parse_schedule, split_sampler_name
from nijimi.diffusion.noise import Seeds
from nijimi.errors import ConfigError, ImageError, SamplerError
from nijimi.pipelines.adapters import LoraRequest, resolve_request
from nijimi.pipelines.control import ControlUnit, controlnet_source
from nijimi.pipelines.control_maps import ControlSpec, parse_control_spec
from nijimi.pipelines.hires import LATENT_UPSCALERS, MAX_SCALE, MAX_SIDE, PIXEL_UPSCALERS, hires_schedule, hires_size

SEED_LIMIT = 2**64
"""Seeds are what ``torch.Generator.manual_seed`` takes: integers in [0, 2⁶⁴)."""


@dataclass(frozen=True)
class Cli:
    """How a field appears on ``nijimi generate``: its flags (none: positional), help, and the parser of one
    flag's text (``parse``, or ``expand`` for a flag that sets several fields); ``repeat`` appends, ``switch`` is a
    flag without a value."""

    flags: tuple[str, ...] = ()
    help: str = ""
    parse: Callable[[str], Any] = str
    metavar: str | None = None
    repeat: bool = False
    switch: bool = False
    expand: Callable[[str], dict] | None = None


def knob(default: Any, cli: Cli | None = None) -> Any:
    """A request field with its CLI description."""
    return field(default=default, metadata={"cli": cli} if cli else {})


def parse_size(text: str, flag: str = "--size") -> dict[str, int]:
    """``"512x768"`` → width 512, height 768; ``"512"`` → 512 × 512."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*(?:[xX×]\s*(\d{1,6}))?\s*", text)
    if not m:
        raise ConfigError(f"{flag} {text!r} is not WIDTHxHEIGHT (e.g. 512x512)")
    return {"width": int(m.group(1)), "height": int(m.group(2) or m.group(1))}


def _size_pair(flag: str) -> Callable[[str], tuple[int, int]]:
    """The parser of a ``WxH`` flag whose value is one (width, height) field."""
    return lambda text: tuple(parse_size(text, flag).values())


def parse_interval(text: str) -> tuple[float, float]:
    """``"0.3,5.4"`` → (0.3, 5.4)."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--guidance-interval {text!r} is not LOW,HIGH (two numbers)") from None
    return low, high


def _lora(text: str) -> LoraRequest:
    return LoraRequest(*parse_lora_option(text))


ImageSource = Image.Image | str | os.PathLike
Control = ControlSpec | ControlUnit


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. ``seed`` None draws a random seed once, here; image i of a batch uses ``seed + i``.
    ``width``/``height`` None: the init image's size, else the model's native size. ``guidance`` None: the model's
    (``ModelConfig.guidance``). ``sampler`` None: the model's default
    (:func:`~nijimi.diffusion.choice.default_sampler`); a name is parsed, with ``schedule``, into a
    :class:`SamplerChoice` (``schedule`` then holds the resolved schedule; "automatic": the sampler's A1111 default).
    ``vae_tile`` / ``attention_slice`` None: chosen from the free memory; 0: off. LoRA names that are not files are
    looked up in ``lora_dir`` (default: the embedded model's demo adapters); paths are kept absolute, so a recipe
    names its files from anywhere. ``variation_seed`` None draws a random one when ``variation_strength`` > 0;
    ``seed_resize`` is (width, height) in pixels. ``vae``: another VAE for this request's encode and decode
    (:func:`~nijimi.io.vae_file.load_vae`), a path kept absolute too. ``hires_*``: A1111's hires fix
    (:mod:`~nijimi.pipelines.hires`), on when ``hires_scale`` or ``hires_size`` is given; ``hires_steps`` 0, a None
    ``hires_sampler`` and empty hires prompts mean the first pass's. ``embeddings_dir`` and ``embeddings``:
    textual-inversion embeddings the prompts may name (:class:`~nijimi.io.embeddings.EmbeddingLibrary`); there is no
    default folder, so a prompt means the same wherever the model lies."""

    prompt: str = knob("", Cli((), "the prompt (A1111 syntax: (word:1.2), [from:to:when], BREAK, <lora:NAME:W> …)"))
    negative_prompt: str = knob("", Cli(("-n", "--negative"), "negative prompt"))
    steps: int = knob(20, Cli(("--steps",), "denoising steps", int))
    sampler: SamplerChoice | str | None = knob(None, Cli(
        ("--sampler",), "sampler name, nijimi's, A1111's or ComfyUI's (`nijimi samplers` lists them; default dpm++2m "
        "with the Karras schedule, or on the model's own timesteps for a zero-terminal-SNR model)"))
    schedule: str = knob("automatic", Cli(
        ("--schedule",), "σ schedule: automatic (the sampler's A1111 default), uniform (the model's own timesteps), "
        "karras, exponential, polyexponential, sgm_uniform, simple, normal, ddim_uniform, beta, kl_optimal, "
        "align_your_steps, trailing, lcm (A1111 labels such as 'SGM Uniform' too)"))
    eta: float | None = knob(None, Cli(("--eta",), "noise amount η of ddim (default 0), euler-a and dpm++2m-sde "
                                       "(default 1); tcd's γ (default 0.3)", float))
    guidance: float | None = knob(None, Cli(("--guidance", "--cfg"), "classifier-free guidance scale (default: "
                                            "the model's, 7 unless its file names another)", float))
    guidance_rescale: float = knob(0.0, Cli(("--guidance-rescale",), "guidance rescale φ in [0, 1] (2305.08891)",
                                            float))
    guidance_interval: tuple[float, float] | None = knob(None, Cli(
        ("--guidance-interval",), "guide only at noise levels σ in (LOW, HIGH], one conditional pass elsewhere "
        "(2404.07724)", parse_interval, "LOW,HIGH"))
    deepcache: int = knob(0, Cli(("--deepcache",), "DeepCache (2312.00858): the full U-Net every N-th step, the "
                                 "other steps only its shallow branch on cached deep features; 0 or 1 = off", int, "N"))
    seed: int | None = knob(None, Cli(("--seed",), "seed (default: random); image i of a batch uses seed+i", int))
    variation_seed: int | None = knob(None, Cli(("--variation-seed",), "A1111's variation seed, image i uses "
                                                "variation-seed+i (default: random with --variation-strength)", int))
    variation_strength: float = knob(0.0, Cli(("--variation-strength",), "slerp of the seed's starting noise "
                                              "towards the variation seed's: 0 = the seed's, 1 = the other's", float))
    seed_resize: tuple[int, int] | None = knob(None, Cli(
        ("--seed-resize",), "A1111's resize seed from: draw the seed's noise at this size, centred in the image's, so "
        "a seed's composition carries over to another size", _size_pair("--seed-resize"), "WxH"))
    width: int | None = knob(None, Cli(("--size",), "WIDTHxHEIGHT, multiples of 8 (default: the model's native "
                                       "size)", metavar="WxH", expand=parse_size))
    height: int | None = knob(None)
    batch: int = knob(1, Cli(("--batch",), "images to generate", int))
    init_image: ImageSource | None = knob(None, Cli(("--init",), "init image for img2img / inpainting"))
    strength: float = knob(0.75, Cli(("--strength",), "img2img denoising strength in [0, 1]", float))
    mask: ImageSource | None = knob(None, Cli(("--mask",), "inpainting mask (white = repaint), size of --init"))
    hires_scale: float | None = knob(None, Cli(
        ("--hires",), "A1111's hires fix: generate at --size, upscale by SCALE (1 to 4) and denoise again at that size",
        float, "SCALE"))
    hires_size: tuple[int, int] | None = knob(None, Cli(
        ("--hires-size",), "hires fix to this size instead of --hires SCALE (A1111's resize width/height to): 0 on one "
        "side keeps the aspect ratio, both sides cover it and crop the centre", _size_pair("--hires-size"), "WxH"))
    hires_steps: int = knob(0, Cli(("--hires-steps",), "steps of the hires pass (0: --steps): as A1111, the last N of "
                                   "int(N / denoise) steps", int, "N"))
    hires_denoise: float = knob(0.7, Cli(("--hires-denoise",), "denoising strength of the hires pass, 0.01 to 1",
                                         float, "S"))
    hires_upscaler: str = knob("Latent", Cli(
        ("--hires-upscaler",), "Latent, Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), Latent "
        "(nearest), Latent (nearest-exact): interpolate the latents; Lanczos, Nearest: decode, resize, encode",
        metavar="NAME"))
    hires_sampler: SamplerChoice | str | None = knob(None, Cli(("--hires-sampler",), "sampler of the hires pass "
                                                               "(default: --sampler)"))
    hires_prompt: str = knob("", Cli(("--hires-prompt",), "prompt of the hires pass (default: the prompt)"))
    hires_negative_prompt: str = knob("", Cli(("--hires-negative",), "negative prompt of the hires pass (default: "
                                                                     "the negative prompt)"))
    clip_skip: int | None = knob(None, Cli(("--clip-skip",), "text-encoder layer, A1111 numbering (1 = last)", int))
    vae_tile: int | None = knob(None, Cli(("--vae-tile",), "decode (and encode) in N-pixel tiles; 0 = never "
                                          "(default: when memory is short)", int, "N"))
    vae: str | None = knob(None, Cli(("--vae",), "decode (and encode) with this VAE instead of the model's: a file in "
                                     "the original layout (encoder./decoder. keys, with or without first_stage_model.) "
                                     "or a diffusers AutoencoderKL folder", metavar="FILE"))
    decoder: str = knob("vae", Cli(("--decoder",), "latents → pixels: vae (the model's or --vae's), tiny:PATH (a TAESD "
                                   "decoder: taesd_decoder.safetensors or a diffusers AutoencoderTiny folder) or tiny "
                                   "(the taesd_decoder.safetensors beside the model's weights)",
                                   metavar="vae|tiny[:PATH]"))
    attention_slice: int | None = knob(None, Cli(("--attention-slice",), "compute attention N query rows at a time; "
                                                 "0 = never (default: when memory is short)", int, "N"))
    loras: tuple[LoraRequest, ...] = knob((), Cli(
        ("--lora",), "apply a LoRA/LyCORIS/peft adapter with text-encoder weight W (default 1) and U-Net weight "
        "UNET_W (default W); repeatable; FILE may be a name in --lora-dir", _lora, "FILE[:W[:UNET_W]]", repeat=True))
    lora_dir: str | None = knob(None, Cli(("--lora-dir",), "folder searched for <lora:NAME:W> prompt tags and --lora "
                                          "names (default: the embedded model's demo adapters, e.g. pink)",
                                          metavar="DIR"))
    embeddings_dir: str | None = knob(None, Cli(
        ("--embeddings-dir",), "textual-inversion embeddings (.pt, .bin, .safetensors; searched recursively, like "
        "A1111's embeddings folder) used where a prompt names a file's stem (default: none)", metavar="DIR"))
    embeddings: tuple[str, ...] = knob((), Cli(("--embedding",), "a textual-inversion embedding file, used where a "
                                               "prompt names its stem; repeatable", metavar="FILE", repeat=True))
    strict_loras: bool = knob(False, Cli(("--strict",), "refuse a LoRA file with keys that fit no module of the "
                                         "model (default: leave them out and name them on stderr)", switch=True))
    control: tuple[Control, ...] = knob((), Cli(
        ("--control",), "steer with a ControlNet: model=PATH|embedded,image=IMG[,scale=1][,pre=map|invert|canny]"
        "[,low=100,high=200][,start=0][,end=1][,resize=resize|crop|fill|none][,guess=false]; repeat for several",
        parse_control_spec, "SPEC", repeat=True))

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        _text("prompt", self.prompt)
        _text("negative_prompt", self.negative_prompt)
        if not isinstance(self.strict_loras, bool):
            raise ConfigError(f"strict_loras must be true or false (got {self.strict_loras!r})")
        _integer("steps", self.steps, 1, 1000)
        _integer("batch", self.batch, 1, 4096)
        resize = self.seed_resize
        if resize is not None and (not isinstance(resize, tuple | list) or len(resize) != 2):
            raise ConfigError(f"seed_resize {resize!r} must be (width, height)")
        set_("seed_resize", resize and tuple(resize))
        for name, value in zip(("width", "height", "seed_resize width", "seed_resize height"),
                               (self.width, self.height, *(resize or (None, None))), strict=True):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value % 8
                                      or not 8 <= value <= 1 << 20):
                raise ConfigError(f"{name} {value!r} must be a positive multiple of 8 pixels")
        _integer("clip_skip", self.clip_skip, 1, 1000, optional=True)
        for name in ("vae_tile", "attention_slice"):
            _integer(name, getattr(self, name), 0, 1 << 20, optional=True)
        _number("guidance", self.guidance, optional=True)
        _number("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        _number("strength", self.strength, 0.0, 1.0)
        _number("variation_strength", self.variation_strength, 0.0, 1.0)
        _integer("deepcache", self.deepcache, 0, 1000)
        set_("guidance_interval", _interval(self.guidance_interval))
        _number("eta", self.eta, 0.0, 1.0, optional=True)
        set_("schedule", parse_schedule(self.schedule))
        if isinstance(self.sampler, str):
            set_("sampler", parse_sampler(self.sampler, self.schedule))
        elif self.sampler is not None and not isinstance(self.sampler, SamplerChoice):
            raise ConfigError(f"sampler {self.sampler!r} must be a sampler name")
        elif self.sampler is not None and self.schedule not in ("automatic", self.sampler.schedule):
            set_("sampler", parse_sampler(self.sampler.base, self.schedule))
        if self.sampler is not None:
            set_("schedule", self.sampler.schedule)
        if self.eta is not None and self.sampler is not None and not self.sampler.takes_eta:
            raise ConfigError(f"eta applies to ddim, euler-a, tcd and the ancestral and SDE samplers, "
                              f"not {self.sampler.name}")
        seed = secrets.randbelow(2**32) if self.seed is None else self.seed
        _integer("seed", seed, 0, SEED_LIMIT - self.batch)
        set_("seed", seed)
        if self.variation_seed is None and self.variation_strength > 0:
            set_("variation_seed", secrets.randbelow(2**32))
        _integer("variation_seed", self.variation_seed, 0, SEED_LIMIT - self.batch, optional=True)
        if self.mask is not None and self.init_image is None:
            raise ImageError("a mask needs an init image to inpaint")
        set_("init_image", _image("init_image", self.init_image))
        set_("mask", _image("mask", self.mask))
        set_("lora_dir", _path("lora_dir", self.lora_dir))
        set_("vae", _path("vae", self.vae))
        set_("embeddings_dir", _path("embeddings_dir", self.embeddings_dir))
        if isinstance(self.embeddings, str | os.PathLike) or not isinstance(self.embeddings, tuple | list):
            raise ConfigError(f"embeddings {self.embeddings!r} must be a list of files")
        set_("embeddings", tuple(_path("embedding", e) for e in self.embeddings))
        set_("loras", tuple(resolve_request(r, self.lora_dir) for r in self.loras))
        set_("control", tuple(_absolute(c) for c in self.control))
        set_("decoder", _decoder(self.decoder))
        self._check_hires()

    def _check_hires(self) -> None:
        """Check and normalise the hires fields; each error names its flag."""
        size = self.hires_size
        _number("hires_scale (--hires)", self.hires_scale, 1.0, MAX_SCALE, optional=True)
        if size is not None and (not isinstance(size, tuple | list) or len(size) != 2 or size[0] == size[1] == 0
                                 or not all(isinstance(v, int) and not isinstance(v, bool) and v % 8 == 0
                                            and 0 <= v <= MAX_SIDE for v in size)):
            raise ConfigError(f"hires size {size!r} (--hires-size) must be WIDTHxHEIGHT in multiples of 8 pixels up "
                              f"to {MAX_SIDE}, one of them 0 to keep the aspect ratio")
        object.__setattr__(self, "hires_size", size and tuple(size))
        _integer("hires_steps (--hires-steps)", self.hires_steps, 0, 1000)
        _number("hires_denoise (--hires-denoise)", self.hires_denoise, 0.01, 1.0)
        upscalers = {name.lower(): name for name in (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)}
        name = self.hires_upscaler.strip().lower() if isinstance(self.hires_upscaler, str) else None
        if name not in upscalers:
            raise ConfigError(f"unknown hires upscaler {self.hires_upscaler!r} (--hires-upscaler); known: "
                              f"{', '.join(upscalers.values())} (upscaler models such as ESRGAN are not supported)")
        object.__setattr__(self, "hires_upscaler", upscalers[name])
        if isinstance(self.hires_sampler, str):
            try:
                object.__setattr__(self, "hires_sampler", parse_sampler(self.hires_sampler))
            except SamplerError as exc:
                raise SamplerError(f"hires sampler (--hires-sampler): {exc}") from None
        elif self.hires_sampler is not None and not isinstance(self.hires_sampler, SamplerChoice):
            raise ConfigError(f"hires sampler {self.hires_sampler!r} (--hires-sampler) must be a sampler name")
        if self.hires_scale is not None or size is not None:
            total = hires_schedule(self.hires_steps or self.steps, self.hires_denoise)[0]
            if total > 1000:
                raise ConfigError(f"hires steps {self.hires_steps or self.steps} at denoise {self.hires_denoise} "
                                  f"(--hires-steps, --hires-denoise) make a schedule of {total} steps (N / denoise); "
                                  "at most 1000")
            if self.width is not None and self.height is not None:
                hires_size(self.width, self.height, self.hires_scale, self.hires_size, 8)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values of every field (the PNG recipe); in-memory images or ControlNet units raise ConfigError."""
        return {f.name: _encode(f.name, getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "recipe") -> GenerationRequest:
        """The request :meth:`to_dict` wrote; a key that is no field or a bad value raises ConfigError naming it."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, Mapping) or set(data) - names:
            unknown = sorted(set(data) - names) if isinstance(data, Mapping) else data
            raise ConfigError(f"{source}: not a generation request (unknown keys {unknown})")
        try:
            values = {k: _decode(k, v) for k, v in data.items()}
            if isinstance(values.get("sampler"), str) and "schedule" not in values \
                    and split_sampler_name(values["sampler"])[1] is None:
                values["schedule"] = "uniform"  # recipes before schedules: a bare name meant the model's timesteps
            return cls(**values)
        except ConfigError as exc:
            raise type(exc)(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: bad generation request ({exc})") from None

    def single(self, i: int) -> GenerationRequest:
        """Image i of this batch as a request of its own: batch 1, seed (and variation seed) + i."""
        variation = None if self.variation_seed is None else self.variation_seed + i
        return self.replace(seed=self.seed + i, variation_seed=variation, batch=1)

    def noise_seeds(self, factor: int) -> Seeds:
        """The batch's starting-noise randomness for a VAE of downscale ``factor``: fresh generators seeded
        ``seed + i``, the variation seed and strength, and ``seed_resize`` in latent cells."""
        generators = [torch.Generator("cpu").manual_seed(self.seed + i) for i in range(self.batch)]
        resize = self.seed_resize and (self.seed_resize[1] // factor, self.seed_resize[0] // factor)
        return Seeds(generators, self.variation_seed or 0, self.variation_strength, resize)

    def replace(self, **changes: Any) -> GenerationRequest:
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)


def _text(name: str, value: Any) -> None:
    """A prompt must be text that UTF-8 can hold: a lone surrogate (what Python makes of bytes on the command line
    that are not UTF-8) is refused rather than replaced, so the recorded prompt is the one that was encoded."""
    label = name.replace("_", " ")
    if not isinstance(value, str):
        raise ConfigError(f"{label} {value!r} must be text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{label} holds {value[exc.start]!r} at character {exc.start}, a lone surrogate, not text "
                          "(bytes that are not UTF-8 on the command line?)") from None


def _integer(name: str, value: Any, low: int, high: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name.replace('_', ' ')} {value!r} must be an integer from {low} to {high}")


def _number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        bounds = "a finite number" if math.isinf(low) else f"a number within [{low}, {high}]"
        raise ConfigError(f"{name.replace('_', ' ')} {value!r} must be {bounds}")


def _interval(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ConfigError(f"guidance interval {value!r} must be two noise levels (LOW, HIGH)")
    for number in value:
        _number("guidance interval", number, 0.0)
    if value[0] >= value[1]:
        raise ConfigError(f"guidance interval {tuple(value)!r}: LOW must be below HIGH")
    return float(value[0]), float(value[1])


def _image(name: str, value: ImageSource | None) -> Image.Image | str | None:
    if isinstance(value, Image.Image):
        return value
    if value is not None and not isinstance(value, str | os.PathLike):
        raise ConfigError(f"{name.replace('_', ' ')} {value!r:.100} must be a file path or a PIL image, not "
                          f"{type(value).__name__}")
    return _path(name, value)


def _path(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise ConfigError(f"{name} {value!r} must be a file or folder path")
    return str(Path(value).absolute())


def _decoder(value: Any) -> str:
    if value in ("vae", "tiny"):
        return value
    if isinstance(value, str) and value.startswith("tiny:") and value[5:]:
        return "tiny:" + _path("decoder", value[5:])
    raise ConfigError(f"decoder {value!r} must be vae, tiny or tiny:PATH")


def _absolute(control: Control) -> Control:
    if not isinstance(control, ControlSpec):
        if isinstance(control, ControlUnit):
            return control
        raise ConfigError(f"control entries must be ControlSpec or ControlUnit, not {type(control).__name__}")
    image = control.image if isinstance(control.image, Image.Image) else str(Path(control.image).absolute())
    return dataclasses.replace(control, model=controlnet_source(control.model), image=image)


def _encode(name: str, value: Any) -> Any:
    if isinstance(value, SamplerChoice):
        return value.name
    if isinstance(value, Image.Image) or (name == "control" and any(
            isinstance(c, ControlUnit) or isinstance(c.image, Image.Image) for c in value)):
        raise ConfigError(f"{name} holds an in-memory object, which a recipe cannot record; pass files instead")
    if name == "loras":
        return [[str(r.path), r.te_multiplier, r.unet_multiplier] for r in value]
    if name == "control":
        return [dataclasses.asdict(c) for c in value]
    if name == "embeddings":
        return list(value)
    return value


def _decode(name: str, value: Any) -> Any:
    if name == "loras":
        if not isinstance(value, list) or not all(_lora_entry(entry) for entry in value):
            raise ConfigError(f"loras {value!r:.200} must be a list of [file, text-encoder weight, U-Net weight]")
        return tuple(LoraRequest(Path(p), te, unet) for p, te, unet in value)
    if name == "control":
        if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
            raise ConfigError(f"control {value!r:.200} must be a list of ControlNet settings (objects)")
        for entry in value:
            for key, item in entry.items():
                _control_value(key, item)
        try:
            return tuple(ControlSpec(**entry) for entry in value)
        except TypeError as exc:
            raise ConfigError(f"control {value!r:.200}: {exc}") from None
    return value


_CONTROL_TEXT = ("model", "image", "pre", "resize")


def _control_value(key: str, value: Any) -> None:
    """A recorded ControlNet setting of the right kind: text, true/false for ``guess``, else a finite number (or
    null for the canny thresholds ``low``/``high``)."""
    if key in _CONTROL_TEXT:
        if not isinstance(value, str):
            raise ConfigError(f"control {key}={value!r} must be text")
    elif key == "guess":
        if not isinstance(value, bool):
            raise ConfigError(f"control guess={value!r} must be true or false")
    elif not (value is None and key in ("low", "high")):
        _number(f"control {key}", value)


def _lora_entry(entry: Any) -> bool:
    """Whether a recipe's LoRA entry is ``[file, te, unet]`` with a file name and two numbers."""
    return (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
            and all(isinstance(w, int | float) and not isinstance(w, bool) for w in entry[1:]))
