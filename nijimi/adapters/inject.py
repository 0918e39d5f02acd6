"""Putting adapters on a model and taking them off: inject new trainable ones, apply loaded ones with multipliers,
stack several, merge into the base weights and unmerge, save what was trained.

Every adapter has a name (``"default"`` unless given); the layers it sits on are found by module path relative to
the model passed in. A :class:`~nijimi.models.ldm.LatentDiffusion` takes an :class:`~nijimi.adapters.weights.Adapter`
read from a file as it is (paths ``model.diffusion_model.…`` / ``cond_stage_model.transformer.…``), with separate
U-Net and text-encoder multipliers as A1111's ``<lora:name:te:unet>``; a bare U-Net takes paths relative to itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from nijimi.adapters import deltas
from nijimi.adapters.modules import AdaptedLayer, LayerAdapter
from nijimi.adapters.targets import AdapterSpec, new_weights, norm_or_weight_layer, select_targets
from nijimi.adapters.weights import Adapter, ModuleWeights
from nijimi.errors import CheckpointError, ConfigError
from nijimi.io.keys.adapters import part_of


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """Every :class:`AdaptedLayer` of ``model`` with its path."""
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield path, module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in adapted_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def _check_name(model: nn.Module, name: str) -> None:
    """A new adapter's name: not empty, no dots, not a ModuleDict attribute, not on the model yet."""
    if name in adapter_names(model):
        raise ConfigError(f"the model already has an adapter named {name!r}; remove it or choose another name")
    if not name or "." in name:
        raise ConfigError(f"adapter name must be non-empty and without dots, got {name!r}")
    if hasattr(nn.ModuleDict, name):
        raise ConfigError(f"adapter name {name!r} is reserved (a method of torch's ModuleDict); choose another")


def _layer(model: nn.Module, path: str) -> nn.Module | None:
    """The layer at ``path`` (the base of an adapted one), or None when there is none."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module.base if isinstance(module, AdaptedLayer) else module


def _attach(model: nn.Module, path: str, name: str, adapter: LayerAdapter) -> None:
    """Wrap the layer at ``path`` (once) and add ``adapter`` to it under ``name``."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layer = getattr(parent, child)
    if not isinstance(layer, AdaptedLayer):
        layer = AdaptedLayer(layer)
        setattr(parent, child, layer)
    weight = layer.base.weight
    layer.adapters[name] = adapter.to(weight.device)


def _misfit(weights: ModuleWeights, layer: nn.Module | None) -> str | None:
    """Why the adapter cannot sit on ``layer`` (None: it fits). ΔW is computed on the meta device (shapes only)."""
    if layer is None:
        return "the module is not in the model"
    if not norm_or_weight_layer(layer, weights.kind):
        return f"a {weights.kind} adapter cannot sit on a {type(layer).__name__}"
    shapes = {k: tuple(v.shape) for k, v in weights.tensors.items()}
    meta = {k: v.to("meta") if v.is_floating_point() else v for k, v in weights.tensors.items()}
    try:
        deltas.module_delta(weights.kind, meta, torch.empty(layer.weight.shape, device="meta"), 1.0, weights.alpha)
    except (RuntimeError, CheckpointError) as e:
        return f"{weights.kind} adapter {shapes} does not fit the weight {tuple(layer.weight.shape)}: {e}"
    bias = weights.bias_delta()
    if bias is not None and (layer.bias is None or bias.numel() != layer.bias.numel()):
        have = None if layer.bias is None else tuple(layer.bias.shape)
        return f"{weights.kind} adapter {shapes} changes a bias of shape {have}"
    return None


def _multiplier(path: str, multiplier: float, unet: float | None, text: float | None) -> float:
    part = part_of(path)
    if part == "unet" and unet is not None:
        return unet
    if part == "text" and text is not None:
        return text
    return multiplier


def inject(model: nn.Module, spec: AdapterSpec, name: str = "default",
           generator: torch.Generator | None = None) -> list[str]:
    """Add a new trainable adapter to the layers ``spec`` selects; freeze every other parameter of ``model``.

    Returns the adapted module paths. The adapter starts as the identity (see :mod:`nijimi.adapters.targets`); its
    parameters are :func:`adapter_parameters`; base weights are never modified by training.
    """
    _check_name(model, name)
    paths = select_targets(model, spec.targets, spec.parts)
    if not paths:
        raise ConfigError(f"no layer of the model matches the targets {spec.targets!r} in parts {spec.parts}")
    model.requires_grad_(False)
    for path in paths:
        weights = new_weights(spec, _layer(model, path), generator)
        _attach(model, path, name, LayerAdapter(weights, trainable=True))
    return paths


def apply_adapter(model: nn.Module, adapter: Adapter, name: str = "default", multiplier: float = 1.0,
                  unet_multiplier: float | None = None, te_multiplier: float | None = None,
                  dtype: torch.dtype = torch.float32, strict: bool = True) -> dict[str, str]:
    """Put a loaded adapter on ``model``, frozen, its tensors cast to ``dtype``.

    ``unet_multiplier`` / ``te_multiplier`` override ``multiplier`` for modules under the U-Net / text encoder.
    Modules the model lacks, or that do not fit their layer, raise :class:`CheckpointError` naming them before
    anything changes; with ``strict=False`` they are left out instead. Returns the modules left out → why.
    """
    _check_name(model, name)
    skipped = {p: why for p, w in adapter.modules.items() if (why := _misfit(w, _layer(model, p))) is not None}
    if strict and skipped:
        listed = "; ".join(f"{p}: {why}" for p, why in list(skipped.items())[:5])
        raise CheckpointError(f"{len(skipped)} adapter modules do not fit the model ({listed})")
    if len(skipped) == len(adapter.modules):
        raise CheckpointError(f"no module of the adapter fits the model ({len(skipped)} left out)")
    for path, weights in adapter.modules.items():
        if path not in skipped:
            value = _multiplier(path, multiplier, unet_multiplier, te_multiplier)
            _attach(model, path, name, LayerAdapter(weights, value, dtype=dtype))
    return skipped


def _selected(model: nn.Module, names: list[str] | None) -> list[str]:
    have = adapter_names(model)
    unknown = sorted(set(names or []) - set(have))
    if unknown:
        raise ConfigError(f"no adapter named {unknown} on the model (have {have})")
    return have if names is None else list(names)


def merge_adapters(model: nn.Module, names: list[str] | None = None) -> None:
    """Add the adapters' updates (all, or ``names``) into the base weights in place; they stop costing anything at
    inference and are undone by :func:`unmerge_adapters`. The updates are computed on the weights before this merge,
    as the live stack computes them; adapters left unmerged whose ΔW depends on W (DoRA, IA³, GLoRA, OFT) see the
    merged weights from then on."""
    chosen = _selected(model, names)
    for _, layer in adapted_layers(model):
        layer.merge(chosen)


def unmerge_adapters(model: nn.Module, names: list[str] | None = None) -> None:
    """Take merged updates (all, or ``names``) out of the base weights again."""
    chosen = _selected(model, names)
    for _, layer in adapted_layers(model):
        layer.unmerge(chosen)


def remove_adapter(model: nn.Module, name: str | None = None) -> None:
    """Take adapter ``name`` (None: all) off the model; a layer left without adapters becomes its plain base layer
    again. A merged adapter stays merged: merge then remove bakes it into the weights."""
    chosen = set(_selected(model, None if name is None else [name]))
    for path, layer in list(adapted_layers(model)):
        for adapter_name in [n for n in layer.adapters if n in chosen]:
            layer.merged.pop(adapter_name, None)
            del layer.adapters[adapter_name]
        if not layer.adapters:
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, layer.base)


def get_adapter(model: nn.Module, name: str = "default") -> Adapter:
    """A detached copy of adapter ``name`` as an :class:`Adapter` (paths relative to ``model``), ready to save."""
    _selected(model, [name])
    return Adapter({path: layer.adapters[name].weights() for path, layer in adapted_layers(model)
                    if name in layer.adapters})






def adapter_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` (None: of every adapter), for the optimizer."""
    chosen = set(_selected(model, None if name is None else [name]))
    return [p for _, layer in adapted_layers(model) for n, adapter in layer.adapters.items() if n in chosen
            for p in adapter.parameters()]
