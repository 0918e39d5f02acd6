"""Adapters on live layers: :class:`AdaptedLayer` wraps a Linear, Conv2d, LayerNorm or GroupNorm (the same object,
its weight never copied) and stacks any number of named :class:`LayerAdapter` s on it, each with a multiplier.

The effective weight is ``W + Σᵢ mᵢ · ΔWᵢ(W)`` (each ΔW computed on the unmodified base weight, so the stack is
order-free) and the effective bias ``b + Σᵢ mᵢ · Δbᵢ``. They are also exposed as the wrapper's ``weight`` and
``bias`` attributes, so code that reads a layer's weight directly (the ``proj_in``/``proj_out`` of
:class:`~nijimi.models.layers.SpatialTransformer`, GEGLU's ``proj``) sees the adapted weight as well.

Two ways to compute the same output: the base layer's own forward run with the effective weight (one product per
call: the cheap path for inference), or, while gradients are recorded and every active adapter is a plain LoRA,
the low-rank path ``base(x) + m·s·up(down(x))`` (LoRA paper, arXiv 2106.09685, §4.1), which trains without forming
a full-size weight gradient. Merging adds the update into the base weight in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nijimi.adapters import deltas
from nijimi.adapters.weights import ModuleWeights
from nijimi.errors import CheckpointError, ConfigError

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
"""Layers the low-rank kinds adapt."""
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm)
"""Layers the ``norm`` kind adapts (their gain and shift)."""


class LayerAdapter(nn.Module):
    """One adapter's tensors on one layer, as parameters named like the file's tensors, and its ``multiplier``.

    Floating-point tensors become parameters (trainable or frozen), flags (IA³'s ``on_input``) buffers.
    """

    def __init__(self, weights: ModuleWeights, multiplier: float = 1.0, trainable: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.kind, self.alpha, self.scale = weights.kind, weights.alpha, weights.scale
        self.effective_scale = weights.effective_scale
        """``scale``, else ``alpha / rank``, else 1 (see :attr:`ModuleWeights.effective_scale`)."""
        self.names = tuple(weights.tensors)
        for name, tensor in weights.tensors.items():
            if tensor.is_floating_point():
                value = tensor if dtype is None else tensor.to(dtype)
                self.register_parameter(name, nn.Parameter(value, requires_grad=trainable))
            else:
                self.register_buffer(name, tensor)
        self.multiplier = float(multiplier)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors by file name."""
        return {name: getattr(self, name) for name in self.names}

    def weights(self) -> ModuleWeights:
        """A detached copy as format-neutral :class:`ModuleWeights`."""
        tensors = {name: t.detach().clone() for name, t in self.tensors().items()}
        return ModuleWeights(self.kind, tensors, self.alpha, self.scale)

    @property
    def plain_lora(self) -> bool:
        """A LoRA without DoRA: its output can be computed through the low-rank path."""
        return self.kind == "lora" and "dora_scale" not in self.names

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW on ``weight`` (its dtype), scale and DoRA included; the DoRA norm is detached while training."""
        tensors = {k: v.to(weight.dtype) if v.is_floating_point() else v for k, v in self.tensors().items()}
        return deltas.module_delta(self.kind, tensors, weight, self.effective_scale, self.alpha,
                                   detach_norm=self.training)

    def bias_delta(self) -> torch.Tensor | None:
        """Δb (full, norm kinds) or None."""
        return deltas.bias_delta(self.kind, self.tensors(), self.effective_scale)

    def lowrank_output(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """``s · up(down(x))`` (with the Tucker ``mid`` between for a convolution), shaped like ``base(x)``."""
        down, up, mid = self.lora_down, self.lora_up, getattr(self, "lora_mid", None)
        if isinstance(base, nn.Linear):
            h = F.linear(F.linear(x, down.reshape(down.shape[0], -1)), up.reshape(up.shape[0], -1))
            return h * self.effective_scale
        spatial = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
        if mid is None:
            h = F.conv2d(x, down.reshape(down.shape[0], base.in_channels, *base.kernel_size), **spatial)
        else:
            h = F.conv2d(F.conv2d(x, down.reshape(*down.shape[:2], 1, 1)), mid, **spatial)
        return F.conv2d(h, up.reshape(*up.shape[:2], 1, 1)) * self.effective_scale


class AdaptedLayer(nn.Module):
    """A layer with adapters: ``base`` (the original module) and ``adapters`` (name → :class:`LayerAdapter`)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, WEIGHT_LAYERS + NORM_LAYERS):
            raise ConfigError(f"cannot adapt a {type(base).__name__}: only Linear, Conv2d, LayerNorm and GroupNorm")
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise ConfigError(f"cannot adapt a Conv2d with groups={base.groups}, padding_mode={base.padding_mode!r}")
        self.base = base
        self.adapters = nn.ModuleDict()
        self.merged: dict[str, tuple[float, torch.Tensor | None]] = {}
        """Merged adapter name → (multiplier it was merged with, the ΔW added when it must be kept)."""

    def active(self) -> list[LayerAdapter]:
        """Adapters that are neither merged nor at multiplier 0, in insertion order."""
        return [a for name, a in self.adapters.items() if name not in self.merged and a.multiplier != 0.0]

    def _bias_deltas(self, adapters: list[LayerAdapter]) -> torch.Tensor | None:
        pairs = [(a.multiplier, a.bias_delta()) for a in adapters]
        terms = [m * d for m, d in pairs if d is not None]
        return sum(terms) if terms else None

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``W + Σ m·ΔW`` in the base weight's dtype (the base weight if nothing is active)."""
        active = self.active()
        if not active:
            return self.base.weight
        acc = self._acc_weight()
        return (acc + sum(a.multiplier * a.delta(acc) for a in active)).to(self.base.weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        """The effective bias ``b + Σ m·Δb``."""
        b = self.base.bias
        delta = self._bias_deltas(self.active())
        if delta is None:
            return b
        if b is None:
            raise CheckpointError(f"an adapter changes the bias of a {type(self.base).__name__} that has none")
        return (b + delta).to(b.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same input and output shapes as ``base``."""
        active = self.active()
        if not active:
            return self.base(x)
        if torch.is_grad_enabled() and all(a.plain_lora for a in active) and isinstance(self.base, WEIGHT_LAYERS):
            out = self.base(x)
            for adapter in active:
                out = out + adapter.multiplier * adapter.lowrank_output(x, self.base)
            return out
        weight, bias = self.weight, self.bias
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        return torch.func.functional_call(self.base, params, (x,))  # the base's own forward (e.g. its im2col path)

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        """Add the named (unmerged) adapters' updates into the base weight and bias in place."""
        todo = [n for n in names if n in self.adapters and n not in self.merged]
        acc = self._acc_weight()  # every update is computed on the weight before this merge, as the forward does
        per_adapter = {n: self.adapters[n].multiplier * self.adapters[n].delta(acc) for n in todo}
        bias_delta = self._bias_deltas([self.adapters[n] for n in todo])
        for name, delta in per_adapter.items():
            self.base.weight.add_(delta.to(self.base.weight.dtype))
            adapter = self.adapters[name]
            keep = adapter.kind in deltas.WEIGHT_DEPENDENT_KINDS or "dora_scale" in adapter.names
            self.merged[name] = (adapter.multiplier, delta if keep else None)
        if bias_delta is not None:
            self.base.bias.add_(bias_delta.to(self.base.bias.dtype))

    @torch.no_grad()
    def unmerge(self, names: list[str]) -> None:
        """Subtract the named merged adapters' updates again (with the multiplier they were merged with)."""
        for name in [n for n in names if n in self.merged]:
            multiplier, kept = self.merged.pop(name)
            adapter = self.adapters[name]
            delta = kept if kept is not None else multiplier * adapter.delta(self._acc_weight())
            self.base.weight.sub_(delta.to(self.base.weight.dtype))
            bias_delta = adapter.bias_delta()
            if bias_delta is not None:
                self.base.bias.sub_((multiplier * bias_delta).to(self.base.bias.dtype))

    def _acc_weight(self) -> torch.Tensor:
        w = self.base.weight
        return w.to(torch.promote_types(w.dtype, torch.float32))
