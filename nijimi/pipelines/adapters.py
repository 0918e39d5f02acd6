"""Adapters at generation time, and the file operations behind ``nijimi lora``.

A generation with LoRAs (``--lora FILE[:W[:UNET_W]]`` options and A1111 ``<lora:NAME:W>`` tags in the prompt):
:func:`apply_loras` reads each adapter, puts them all on the model with their multipliers, merges them into the
weights in one pass (each update computed on the original weights, so the order does not matter) and takes the
wrappers off again, so sampling runs at the base model's speed. It returns the prompt without its tags and an
``undo`` that copies the saved original weights back — bit for bit, in any dtype (subtracting the update again would
round). A1111 keeps the same backup of each changed weight.

How a pipeline uses it (``Pipeline.generate``)::

    applied = apply_loras(self, loras, prompt, lora_dir)   # clears self.conditioner.cache if the text encoder changed
    try:
        ... generate from applied.prompt ...
    finally:
        applied.undo()                                     # and clears the cache again
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from nijimi.adapters.fewstep import FewStep, few_step_adapter
from nijimi.adapters.formats import LoadedAdapter, read_adapter, save_adapter
from nijimi.adapters.inject import adapted_layers, apply_adapter, merge_adapters, remove_adapter
from nijimi.adapters.modules import AdaptedLayer
from nijimi.adapters.tags import parse_lora_option, parse_lora_tags, resolve_lora
from nijimi.adapters.tools import extract_lora, resize_lora
from nijimi.adapters.weights import Adapter
from nijimi.diffusion.choice import SamplerChoice, parse_sampler
from nijimi.embedded import ADAPTERS, embedded_path
from nijimi.errors import CheckpointError, ConfigError
from nijimi.io.checkpoint import load_model
from nijimi.io.files import check_output
from nijimi.io.keys.adapters import part_of
from nijimi.models.ldm import LatentDiffusion, ModelConfig
from nijimi.train.finetune import load_base


class LoraRequest(NamedTuple):
    """One adapter to apply: its file and A1111's text-encoder and U-Net multipliers."""

    path: Path
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0


def lora_requests(options: Sequence[str], lora_dir: str | os.PathLike | None = None) -> list[LoraRequest]:
    """``--lora`` options (``FILE[:WEIGHT[:UNET_WEIGHT]]``) → requests (:func:`resolve_request`)."""
    return [resolve_request(LoraRequest(*parse_lora_option(option)), lora_dir) for option in options]


def resolve_request(request: LoraRequest | tuple, lora_dir: str | os.PathLike | None = None) -> LoraRequest:
    """The request with its file as an absolute path: a name that is not an existing path is looked up in
    ``lora_dir`` (:func:`~nijimi.adapters.tags.resolve_lora`), by default the embedded model's demo adapters
    (:data:`nijimi.embedded.ADAPTERS`). Non-finite multipliers raise ConfigError."""
    path, te, unet = request
    if not all(math.isfinite(w) for w in (te, unet)):
        raise ConfigError(f"LoRA {path}: weights must be finite numbers, got {te}, {unet}")
    path = Path(path)
    if not path.exists():
        path = resolve_lora(str(path), ADAPTERS if lora_dir is None else lora_dir)
    return LoraRequest(path.resolve(), float(te), float(unet))


@dataclass
class AppliedLoras:
    """What :func:`apply_loras` did: the ``prompt`` without its tags, the adapters applied (zero multipliers left
    out), whether the text encoder's weights changed, the keys/modules left out of each file that had any (path →
    key → why), and ``undo`` (call once; later calls do nothing)."""

    prompt: str
    applied: list[LoraRequest]
    text_encoder_changed: bool
    unmatched: dict[Path, dict[str, str]] = field(default_factory=dict)
    undo: Callable[[], None] = lambda: None


def _model_and_cache(target) -> tuple[LatentDiffusion, dict | None]:
    """A pipeline's model and prompt cache (``pipe.conditioner.cache``), or a bare model and None."""
    if isinstance(target, LatentDiffusion):
        return target, None
    return target.model, target.conditioner.cache


def _active(adapter: Adapter, te: float, unet: float) -> Adapter:
    """The modules whose multiplier is not 0 (so a zero multiplier changes no weight at all)."""
    keep = {path: w for path, w in adapter.modules.items() if {"text": te, "unet": unet}.get(part_of(path), 1.0)}
    return Adapter(keep, dict(adapter.metadata))


def _base_layer(model: nn.Module, path: str) -> nn.Module:
    layer = model.get_submodule(path)
    return layer.base if isinstance(layer, AdaptedLayer) else layer


def requested_loras(loras: Sequence[LoraRequest | tuple] = (), prompt: str = "",
                    lora_dir: str | os.PathLike | None = None) -> tuple[str, list[LoraRequest]]:
    """The prompt without its ``<lora:NAME:W>`` tags, and the adapters asked for: ``loras`` (:class:`LoraRequest` s
    or ``(path, te_multiplier, unet_multiplier)`` tuples), then the tags' files (NAME looked up in ``lora_dir``, by
    default the embedded model's demo adapters)."""
    text, tags = parse_lora_tags(prompt)
    lora_dir = ADAPTERS if lora_dir is None else lora_dir
    requests = [LoraRequest(Path(p), float(te), float(unet)) for p, te, unet in loras]
    requests += [LoraRequest(resolve_lora(t.name, lora_dir), t.te_multiplier, t.unet_multiplier) for t in tags]
    return text, requests


def put_on(model: LatentDiffusion, requests: list[LoraRequest],
           strict: bool) -> tuple[list[str], list[LoraRequest], dict, bool]:
    """Read and attach every request as adapter ``nijimi_lora_<i>`` (not merged): (names, applied, unmatched,
    text changed). Files are all read before anything is attached; on any error the model is left as it was. With
    ``strict``, a key or module that fits no layer is an error. Take them off with
    :func:`~nijimi.adapters.inject.remove_adapter` of each name."""
    loaded: list[tuple[LoraRequest, LoadedAdapter, Adapter]] = []
    for request in requests:
        file = read_adapter(request.path, model.config, strict=strict)
        loaded.append((request, file, _active(file.adapter, request.te_multiplier, request.unet_multiplier)))
    names, applied, unmatched, text = [], [], {}, False
    for i, (request, file, adapter) in enumerate(loaded):
        unmatched[request.path] = dict(file.unmatched)
        if not adapter.modules:
            continue
        name = f"nijimi_lora_{i}"
        try:
            skipped = apply_adapter(model, adapter, name, 1.0, request.unet_multiplier, request.te_multiplier,
                                    strict=strict)
        except (CheckpointError, ConfigError) as e:  # nothing fits, or the name is taken: take the others off
            for earlier in names:
                remove_adapter(model, earlier)
            raise type(e)(f"{request.path}: {e}") from None
        unmatched[request.path].update(skipped)
        text = text or any(part_of(p) == "text" for p in adapter.modules if p not in skipped)
        names.append(name)
        applied.append(request)
    return names, applied, {path: keys for path, keys in unmatched.items() if keys}, text


def apply_loras(target, loras: Sequence[LoraRequest | tuple] = (), prompt: str = "",
                lora_dir: str | os.PathLike | None = None, strict: bool = False) -> AppliedLoras:
    """Merge the ``loras`` and the prompt's ``<lora:NAME:W>`` tags (NAME looked up in ``lora_dir``, by default the
    embedded model's demo adapters) into the weights of ``target`` — a :class:`~nijimi.pipelines.pipeline.Pipeline`
    or a :class:`LatentDiffusion`; see the module docstring. ``loras``: :class:`LoraRequest` s or
    ``(path, te_multiplier, unet_multiplier)`` tuples. A pipeline's prompt cache is cleared when the text encoder
    changes, and again by ``undo``. Keys of a file that fit no module of the model are left out and listed in
    ``unmatched``; with ``strict`` they raise :class:`CheckpointError` instead, before any weight changes."""
    model, cache = _model_and_cache(target)
    text, requests = requested_loras(loras, prompt, lora_dir)
    names, applied, unmatched, text_changed = put_on(model, requests, strict)
    if not names:
        return AppliedLoras(text, [], False, unmatched)
    chosen = set(names)
    with torch.no_grad():
        saved = {path: (layer.base.weight.detach().clone(),
                        None if layer.base.bias is None else layer.base.bias.detach().clone())
                 for path, layer in adapted_layers(model) if chosen & set(layer.adapters)}
    merge_adapters(model, names)
    for name in names:
        remove_adapter(model, name)
    if text_changed and cache is not None:
        cache.clear()

    def undo() -> None:
        with torch.no_grad():
            for path, (weight, bias) in saved.items():
                layer = _base_layer(model, path)
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
        saved.clear()
        if text_changed and cache is not None:
            cache.clear()

    return AppliedLoras(text, applied, text_changed, unmatched, undo)


def few_step_adapters(loras: Sequence[LoraRequest], prompt: str,
                      lora_dir: str | os.PathLike | None) -> list[tuple[Path, FewStep]]:
    """The few-step adapters (:func:`~nijimi.adapters.fewstep.few_step_adapter`) among ``loras`` and the prompt's
    ``<lora:NAME>`` tags, in that order, with their files. Tags naming no file are skipped (generating reports
    them)."""
    paths = [Path(request.path) for request in loras]
    for tag in parse_lora_tags(prompt)[1]:
        try:
            paths.append(resolve_lora(tag.name, ADAPTERS if lora_dir is None else lora_dir))
        except ConfigError:
            continue
    return [(path, adapter) for path in paths if (adapter := few_step_adapter(path)) is not None]


def few_step_notes(adapters: Sequence[tuple[Path, FewStep]], sampler: SamplerChoice | None) -> list[str]:
    """One line for each of ``adapters`` (:func:`few_step_adapters`) whose authors' sampler is not ``sampler``
    (None: the default): what it is and the flags of their recipe."""
    picked = f"--sampler {sampler.name}" if sampler else "the default sampler"
    return [f"{path.name} looks like a {adapter.kind}; its authors sample it with {adapter.flags} (this run: {picked})"
            for path, adapter in adapters if sampler != parse_sampler(adapter.sampler)]


# ---- nijimi lora extract | resize | info --------------------------------------------------------------------------

def _float_dtype(loaded: LoadedAdapter) -> torch.dtype:
    """The dtype of an adapter's stored tensors (float32 when mixed)."""
    dtypes = {t.dtype for w in loaded.adapter.modules.values() for t in w.tensors.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _candidate_configs() -> list[ModelConfig]:
    """Models an adapter file may be for, when none is named: the embedded model (if built), SD 1.x, SD 2.x."""
    configs = [ModelConfig.sd15(), ModelConfig.sd21()]
    try:
        path = embedded_path()
    except CheckpointError:
        return configs
    return [load_model(path)[0].config, *configs]


def adapter_model_config(path: str | os.PathLike, base: str | None = None) -> tuple[ModelConfig, LoadedAdapter]:
    """The config of the model an adapter file is for — ``base``'s (a model file, folder or ``"embedded"``), else the
    first of the embedded model, SD 1.x and SD 2.x that every module of the file fits by name and shape — and the
    adapter read for it."""
    if base is not None:
        config = load_base(base).config
        return config, read_adapter(path, config)
    for config in _candidate_configs():
        try:
            loaded = read_adapter(path, config, strict=True)
            with torch.device("meta"):
                apply_adapter(LatentDiffusion(config), loaded.adapter, strict=True)
        except CheckpointError:
            continue
        return config, loaded
    raise ConfigError(f"{path}: cannot tell which model this adapter is for (not the embedded model, SD 1.x or "
                      "SD 2.x); name it with --base MODEL")


def _check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


@dataclass(frozen=True)
class Extraction:
    """What ``nijimi lora extract`` keeps of ``tuned − base``: rank ``rank`` (``conv_rank`` for convolutions larger
    than 1×1), the ``targets`` layers of the U-Net (and of the text encoder with ``text_encoder``), layers that differ
    by more than ``min_diff`` (:func:`~nijimi.adapters.tools.extract_lora`)."""

    rank: int
    conv_rank: int | None = None
    targets: str | Sequence[str] = "attn+ff"
    text_encoder: bool = True
    min_diff: float = 0.0


def extract_adapter_file(base: str, tuned: str, out: str | os.PathLike, what: Extraction, format: str = "kohya",
                         overwrite: bool = False) -> Adapter:
    """``nijimi lora extract``: a LoRA of ``tuned − base`` as ``what`` says, written to ``out``. Models of different
    architectures raise :class:`CheckpointError` naming the first layer that differs."""
    out = _check_out(out, overwrite)
    base_model, tuned_model = load_base(base), load_base(tuned)
    parts = ("unet", "text") if what.text_encoder else ("unet",)
    adapter = extract_lora(base_model, tuned_model, what.rank, what.targets, what.conv_rank, parts, what.min_diff)
    if not adapter.modules:
        raise ConfigError(f"{tuned} does not differ from {base} in the targeted layers ({what.targets}); nothing to "
                          "extract")
    comment = f"extracted by nijimi from {Path(tuned).name} - {Path(base).name}, rank {what.rank}"
    save_adapter(adapter, out, base_model.config, format, metadata={"ss_training_comment": comment},
                 overwrite=overwrite)
    return adapter


def resize_adapter_file(path: str | os.PathLike, rank: int, out: str | os.PathLike, base: str | None = None,
                        format: str | None = None, overwrite: bool = False) -> Adapter:
    """``nijimi lora resize``: every module of the file cut to at most ``rank`` by SVD
    (:func:`~nijimi.adapters.tools.resize_lora`), saved to ``out`` in ``format`` (default: the file's) and the file's
    float dtype, its metadata kept."""
    out = _check_out(out, overwrite)
    config, loaded = adapter_model_config(path, base)
    resized = resize_lora(loaded.adapter, rank, config)
    save_adapter(resized, out, config, format or loaded.format, dtype=_float_dtype(loaded), overwrite=overwrite)
    return resized

