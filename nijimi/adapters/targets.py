"""Which layers get an adapter, and the initial weights of a new (trainable) adapter.

Targets are chosen by preset or by glob patterns over module paths (``*attn2.to_k``). Presets, over the U-Net and
the text encoder (never the VAE):

- ``attn``: attention projections — U-Net ``attn1``/``attn2`` ``to_q, to_k, to_v, to_out.0``; text encoder
  ``self_attn`` ``q_proj, k_proj, v_proj, out_proj``;
- ``attn+ff``: also the U-Net feed-forward (``ff.net.0.proj``, ``ff.net.2``) and ``proj_in``/``proj_out``, and the text
  encoder MLP (``fc1``, ``fc2``) — kohya sd-scripts' default LoRA targets (192 + 72 modules for SD 1.5);
- ``all-linear``: every Linear (and 1×1 convolution) except the unused ``text_projection``;
- ``all``: also every other convolution of the U-Net except ``conv_in``/``conv_out`` (ResBlock, skip, down- and
  up-sampling convolutions: kohya's LoCon ``conv_dim`` targets).

New weights follow peft's initialisation, so a fresh adapter changes nothing: LoRA ``down`` He-uniform
(``U(±1/√fan_in)``), ``up`` zero; LoHa ``w2_b`` zero, the rest He-uniform; LoKr ``w1`` zero, ``w2`` He-uniform; DoRA's
magnitude the row norms of the base weight.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nijimi.adapters import deltas
from nijimi.adapters.modules import NORM_LAYERS, WEIGHT_LAYERS, AdaptedLayer
from nijimi.adapters.weights import ModuleWeights
from nijimi.errors import ConfigError
from nijimi.io.keys.adapters import part_of
from nijimi.models.ldm import VAE_PREFIX

PRESETS = ("attn", "attn+ff", "all-linear", "all")
TRAINABLE_KINDS = ("lora", "loha", "lokr")
_ATTN = re.compile(r"(^|\.)(attn[12]\.to_(q|k|v|out\.0)|self_attn\.(q|k|v|out)_proj)$")
_FF = re.compile(r"(^|\.)(ff\.net\.(0\.proj|2)|proj_(in|out)|mlp\.fc[12])$")
_NOT_LINEAR = re.compile(r"(^|\.)text_projection$")
_NOT_CONV = re.compile(r"(^|\.)(input_blocks\.0\.0|out\.2)$")


def named_layers(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Every sub-module with its path; an :class:`AdaptedLayer` shows as its base layer, its insides hidden."""
    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, AdaptedLayer):
            yield path, child.base
        else:
            yield path, child
            yield from named_layers(child, path + ".")


def _is_linear(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1))


def _preset_match(preset: str, path: str, layer: nn.Module) -> bool:
    if preset == "attn":
        return bool(_ATTN.search(path))
    if preset == "attn+ff":
        return bool(_ATTN.search(path) or _FF.search(path))
    if _is_linear(layer):
        return not _NOT_LINEAR.search(path)
    return preset == "all" and isinstance(layer, nn.Conv2d) and not _NOT_CONV.search(path)


def select_targets(model: nn.Module, targets: str | Sequence[str], parts: Sequence[str] = ("unet", "text"),
                   layer_types: tuple[type, ...] = WEIGHT_LAYERS) -> list[str]:
    """Module paths of ``model`` chosen by a preset name or a list of glob patterns, in model order.

    ``parts`` limits a :class:`~nijimi.models.ldm.LatentDiffusion` to its U-Net (``"unet"``) and/or text encoder
    (``"text"``); a bare U-Net or encoder is taken whole. Only layers of ``layer_types`` count. A pattern that matches
    no such layer, or an unknown preset, raises :class:`ConfigError`.
    """
    unknown_parts = set(parts) - {"unet", "text"}
    if unknown_parts:
        raise ConfigError(f"unknown model parts {sorted(unknown_parts)}; choose from 'unet', 'text'")
    layers = [(path, layer) for path, layer in named_layers(model) if isinstance(layer, layer_types)
              and not path.startswith(VAE_PREFIX) and part_of(path) in (*parts, None)]
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise ConfigError(f"unknown target preset {targets!r}; choose one of {', '.join(PRESETS)} or give patterns")
        return [path for path, layer in layers if _preset_match(targets, path, layer)]
    chosen = []
    for pattern in targets:
        hits = [path for path, _ in layers if fnmatch.fnmatchcase(path, pattern)]
        if not hits:
            raise ConfigError(f"target pattern {pattern!r} matches no adaptable layer")
        chosen.extend(hits)
    order = {path: i for i, (path, _) in enumerate(layers)}
    return sorted(set(chosen), key=order.__getitem__)


@dataclass(frozen=True)
class AdapterSpec:
    """A new adapter to train: ``kind`` (lora, loha, lokr), ``rank`` and ``alpha`` (scale = alpha / rank; None means
    alpha = rank), ``targets`` (a preset or glob patterns) in ``parts`` of the model.

    ``conv_rank``/``conv_alpha``: rank and alpha for k×k convolutions (default: ``rank``/``alpha``, kohya's
    ``conv_dim``/``conv_alpha``). ``dora``: add DoRA's magnitude (arXiv 2402.09353). ``tucker``: factor k×k
    convolutions with a Tucker core (LyCORIS ``use_tucker``; peft's ``use_effective_conv2d``). ``factor`` and
    ``decompose_both``: LoKr's Kronecker split and whether its first factor is low-rank too.
    """

    kind: str = "lora"
    rank: int = 4
    alpha: float | None = None
    targets: str | tuple[str, ...] = "attn+ff"
    parts: tuple[str, ...] = ("unet", "text")
    conv_rank: int | None = None
    conv_alpha: float | None = None
    dora: bool = False
    tucker: bool = False
    factor: int = -1
    decompose_both: bool = False

    def __post_init__(self) -> None:
        if self.kind not in TRAINABLE_KINDS:
            raise ConfigError(f"AdapterSpec.kind must be one of {TRAINABLE_KINDS}, got {self.kind!r}")
        for name in ("rank", "conv_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"AdapterSpec.{name} must be ≥ 1, got {value}")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))

    def rank_alpha(self, layer: nn.Module) -> tuple[int, float]:
        """(rank, alpha) for a layer: the conv pair for convolutions larger than 1×1."""
        if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) and self.conv_rank is not None:
            return self.conv_rank, float(self.conv_alpha if self.conv_alpha is not None else self.conv_rank)
        return self.rank, float(self.alpha if self.alpha is not None else self.rank)


def _uniform(shape: tuple[int, ...], gen: torch.Generator | None) -> torch.Tensor:
    """He-uniform with a = √5 (PyTorch's and peft's default): ``U(−1/√fan_in, 1/√fan_in)``, fan_in = prod(shape[1:])."""
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return (torch.rand(shape, generator=gen) * 2.0 - 1.0) * bound


def _lora(out: int, inp: int, kernel: tuple[int, ...], r: int, conv: bool, tucker: bool,
          gen) -> dict[str, torch.Tensor]:
    """kohya's layouts: Linear (r, in) / (out, r); convolution (r, in, kh, kw) / (out, r, 1, 1)."""
    if tucker and kernel:
        return {"lora_down": _uniform((r, inp, 1, 1), gen), "lora_mid": _uniform((r, r, *kernel), gen),
                "lora_up": torch.zeros(out, r, 1, 1)}
    if conv:
        return {"lora_down": _uniform((r, inp, *(kernel or (1, 1))), gen), "lora_up": torch.zeros(out, r, 1, 1)}
    return {"lora_down": _uniform((r, inp), gen), "lora_up": torch.zeros(out, r)}


def _loha(out: int, inp: int, kernel: tuple[int, ...], r: int, tucker: bool, gen) -> dict[str, torch.Tensor]:
    if tucker and kernel:
        return {"hada_t1": _uniform((r, r, *kernel), gen), "hada_t2": _uniform((r, r, *kernel), gen),
                "hada_w1_a": _uniform((r, out), gen), "hada_w1_b": _uniform((r, inp), gen),
                "hada_w2_a": _uniform((r, out), gen), "hada_w2_b": torch.zeros(r, inp)}
    flat = inp * math.prod(kernel)
    return {"hada_w1_a": _uniform((out, r), gen), "hada_w1_b": _uniform((r, flat), gen),
            "hada_w2_a": _uniform((out, r), gen), "hada_w2_b": torch.zeros(r, flat)}


def _lokr(out: int, inp: int, kernel: tuple[int, ...], r: int, spec: AdapterSpec, gen) -> dict[str, torch.Tensor]:
    out_l, out_k = deltas.factorization(out, spec.factor)
    in_m, in_n = deltas.factorization(inp, spec.factor)
    t: dict[str, torch.Tensor] = {}
    if spec.decompose_both and r < max(out_l, in_m) / 2:
        t.update(lokr_w1_a=torch.zeros(out_l, r), lokr_w1_b=_uniform((r, in_m), gen))
    else:
        t["lokr_w1"] = torch.zeros(out_l, in_m)
    if r >= max(out_k, in_n) / 2:
        t["lokr_w2"] = _uniform((out_k, in_n, *kernel), gen)
    elif spec.tucker and kernel:
        t.update(lokr_t2=_uniform((r, r, *kernel), gen), lokr_w2_a=_uniform((r, out_k), gen),
                 lokr_w2_b=_uniform((r, in_n), gen))
    else:
        t.update(lokr_w2_a=_uniform((out_k, r), gen), lokr_w2_b=_uniform((r, in_n * math.prod(kernel)), gen))
    return t


def new_weights(spec: AdapterSpec, layer: nn.Module, generator: torch.Generator | None = None) -> ModuleWeights:
    """Initial float32 weights of a ``spec`` adapter for a Linear or Conv2d ``layer`` (see the module docstring)."""
    if not isinstance(layer, WEIGHT_LAYERS):
        raise ConfigError(f"a {spec.kind} adapter needs a Linear or Conv2d layer, got {type(layer).__name__}")
    out, inp = layer.weight.shape[:2]
    kernel = tuple(layer.kernel_size) if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) else ()
    rank, alpha = spec.rank_alpha(layer)
    if spec.kind == "lora":
        tensors = _lora(out, inp, kernel, rank, isinstance(layer, nn.Conv2d), spec.tucker, generator)
    elif spec.kind == "loha":
        tensors = _loha(out, inp, kernel, rank, spec.tucker, generator)
    else:
        tensors = _lokr(out, inp, kernel, rank, spec, generator)
    if spec.dora:
        tensors["dora_scale"] = deltas.column_norm(layer.weight.detach().float().cpu(), per_output=True)
    weights = ModuleWeights(spec.kind, tensors, alpha)
    if weights.rank is None and alpha != rank:  # a LoKr with both factors whole keeps alpha / rank explicitly
        weights.scale = alpha / rank
    return weights


def norm_or_weight_layer(layer: nn.Module, kind: str) -> bool:
    """Whether an adapter of ``kind`` can sit on ``layer`` (``norm`` on norm layers, the rest on Linear/Conv2d)."""
    return isinstance(layer, NORM_LAYERS if kind == "norm" else WEIGHT_LAYERS)
