"""Adapter tools behind ``nijimi lora …``: extract a LoRA from two models, resize one, describe one.

Extraction and resizing use the truncated SVD, the best rank-r approximation in the Frobenius norm (Eckart–Young):
``ΔW ≈ U_r S_r V_rᵀ``, stored as ``up = U_r √S_r``, ``down = √S_r V_rᵀ`` (convolution weights flattened to
``(out, in·kh·kw)`` first), as LoRA (arXiv 2106.09685) factors of a kohya-layout file.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from nijimi.adapters.formats import file_modules, peft_weights_file, read_adapter
from nijimi.adapters.targets import named_layers, select_targets
from nijimi.adapters.weights import SCALARS, Adapter, ModuleWeights, kind_of
from nijimi.errors import CheckpointError, ConfigError
from nijimi.io import files
from nijimi.io.keys.adapters import KOHYA_OFT, KOHYA_TEXT, KOHYA_UNET, PEFT_TEXT, PEFT_UNET
from nijimi.models.ldm import LatentDiffusion, ModelConfig

_LONG_METADATA = 200  # characters of a metadata value shown before it is cut


def _lowrank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, r), down (r, in·…)) of the rank-``rank`` truncated SVD of ``delta`` viewed as a matrix."""
    matrix = delta.reshape(delta.shape[0], -1).float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def lora_from_delta(delta: torch.Tensor, rank: int, scale: float = 1.0) -> ModuleWeights:
    """A kohya-layout LoRA approximating ``delta`` (out, in[, kh, kw]) at ``rank`` with the given ``scale``
    (alpha = scale · rank): Linear ``down (r, in)``, ``up (out, r)``; convolution ``down (r, in, kh, kw)``,
    ``up (out, r, 1, 1)``."""
    up, down = _lowrank(delta / scale, rank)
    r = down.shape[0]
    if delta.ndim == 4:
        up, down = up.reshape(*up.shape, 1, 1), down.reshape(r, *delta.shape[1:])
    return ModuleWeights("lora", {"lora_down": down.contiguous(), "lora_up": up.contiguous()}, alpha=scale * r)


def extract_lora(base: nn.Module, tuned: nn.Module, rank: int, targets: str | Sequence[str] = "attn+ff",
                 conv_rank: int | None = None, parts: Sequence[str] = ("unet", "text"),
                 min_diff: float = 0.0) -> Adapter:
    """A LoRA from the weight difference of two models of the same architecture (kohya's ``extract_lora``).

    For every selected layer, ``tuned.weight − base.weight`` is truncated by SVD to ``rank`` (``conv_rank`` for
    convolutions larger than 1×1); layers whose difference is at most ``min_diff`` everywhere are left out. Paths are
    relative to the models (pass two :class:`~nijimi.models.ldm.LatentDiffusion` for a file-ready adapter).
    """
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ConfigError(f"extract rank must be ≥ 1, got rank={rank}, conv_rank={conv_rank}")
    base_layers, tuned_layers = dict(named_layers(base)), dict(named_layers(tuned))
    modules = {}
    for path in select_targets(base, targets, parts):
        layer, other = base_layers[path], tuned_layers.get(path)
        if other is None or other.weight.shape != layer.weight.shape:
            raise CheckpointError(f"{path}: the tuned model has no layer of shape {tuple(layer.weight.shape)} there")
        delta = (other.weight.detach().float() - layer.weight.detach().float())
        if delta.abs().max() <= min_diff:
            continue
        kxk = delta.ndim == 4 and math.prod(delta.shape[2:]) > 1
        modules[path] = lora_from_delta(delta, conv_rank if kxk and conv_rank is not None else rank)
    return Adapter(modules)


def module_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Native module path → weight shape for every layer of a model of ``config`` (built on the meta device)."""
    with torch.device("meta"):
        model = LatentDiffusion(config)
    return {path: layer.weight.shape for path, layer in named_layers(model)
            if isinstance(getattr(layer, "weight", None), nn.Parameter)}


def _lora_shape(weights: ModuleWeights) -> torch.Size | None:
    """The target weight shape a LoRA's own tensors reveal (None for other kinds)."""
    if weights.kind != "lora":
        return None
    t = weights.tensors
    out = t["lora_up"].shape[0]
    if "lora_mid" in t:
        return torch.Size((out, t["lora_down"].shape[1], *t["lora_mid"].shape[2:]))
    return torch.Size((out, *t["lora_down"].shape[1:]))


def resize_lora(adapter: Adapter, rank: int, config: ModelConfig | None = None) -> Adapter:
    """Reduce every module to at most ``rank`` by truncated SVD of its ΔW, keeping each module's scale (kohya's
    ``resize_lora``: ``alpha_new = scale · rank``). LoHa, LoKr, Tucker LoRA and full modules become LoRA; a DoRA
    magnitude is kept; IA³, GLoRA, OFT and norm modules (not low-rank updates) are kept as they are. ``config`` gives
    the weight shapes that a LoHa/LoKr/full module's tensors do not reveal."""
    if rank < 1:
        raise ConfigError(f"resize rank must be ≥ 1, got {rank}")
    shapes = module_shapes(config) if config is not None else {}
    out = {}
    for path, weights in adapter.modules.items():
        if weights.kind not in ("lora", "loha", "lokr", "full") or (
                weights.kind == "lora" and weights.rank <= rank and "lora_mid" not in weights.tensors):
            out[path] = weights
            continue
        shape = shapes.get(path, _lora_shape(weights))
        if shape is None:
            raise ConfigError(f"{path}: the weight shape of a {weights.kind} module is needed; pass the model config")
        plain = ModuleWeights(weights.kind, {k: v for k, v in weights.tensors.items() if k != "dora_scale"},
                              weights.alpha, weights.scale)
        scale = weights.effective_scale if weights.kind == "lora" and weights.effective_scale else 1.0
        resized = lora_from_delta(plain.delta(torch.zeros(shape)), rank, scale)
        if weights.dora:
            resized.tensors["dora_scale"] = weights.tensors["dora_scale"]
        out[path] = resized
    return Adapter(out, dict(adapter.metadata))


def _part(module: str) -> str:
    if module.startswith((KOHYA_UNET, KOHYA_OFT, PEFT_UNET)):
        return "U-Net"
    if module.startswith((KOHYA_TEXT, PEFT_TEXT)):
        return "text encoder"
    return "other"


def _counts(counter: Counter) -> str:
    return ", ".join(f"{key} ×{n}" for key, n in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))))


def describe_adapter(path: str | os.PathLike, config: ModelConfig | None = None) -> str:
    """A readable summary of an adapter file: format, module count per model part, kinds, ranks, alphas, metadata
    (kohya's ``ss_*`` and any other entries); with ``config``, also how it fits that model (unmatched keys named)."""
    path = Path(path)
    sd, metadata = files.load_state_dict(peft_weights_file(path) if path.is_dir() else path)
    fmt, modules = file_modules(sd)
    kinds, ranks, alphas, parts = Counter(), Counter(), Counter(), Counter()
    for name, tensors in modules.items():
        parts[_part(name)] += 1
        kind = kind_of({k for k in tensors if k not in SCALARS})
        kinds[(kind or "unknown") + ("+dora" if "dora_scale" in tensors else "")] += 1
        if kind is not None:
            weights = ModuleWeights.from_flat(tensors, name)
            ranks[weights.rank] += 1
            alphas[weights.alpha] += 1
    lines = [f"file: {path}", f"format: {fmt}" + (f" ({metadata['ss_network_module']})"
                                                  if "ss_network_module" in metadata else ""),
             f"modules: {len(modules)} ({_counts(parts)})", f"kinds: {_counts(kinds)}",
             f"ranks: {_counts(ranks)}", f"alphas: {_counts(alphas)}"]
    if config is not None:
        loaded = read_adapter(path, config)
        lines.append(f"fits the model: {len(loaded.adapter.modules)} modules, {len(loaded.unmatched)} keys unmatched")
        lines += [f"  unmatched {key}: {why}" for key, why in list(loaded.unmatched.items())[:10]]
    if metadata:
        lines.append("metadata:")
        for key in sorted(metadata):
            value = metadata[key]
            shown = value if len(value) <= _LONG_METADATA else f"{value[:_LONG_METADATA]}… ({len(value)} characters)"
            lines.append(f"  {key}: {shown}")
    return "\n".join(lines)
