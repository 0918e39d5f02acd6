"""Adapter files: kohya sd-scripts / LyCORIS and diffusers / peft layouts, read and written, auto-detected.

- ``kohya``: one safetensors (or torch) file; keys ``<module name>.<tensor>`` with the module names of
  :mod:`nijimi.io.keys.adapters` (``lora_unet_…``, ``lora_te_…``; kohya's OFT ``oft_unet_…``), tensors
  ``lora_down.weight``, ``lora_up.weight``, ``lora_mid.weight``, ``alpha``, ``hada_w1_a`` …, ``lokr_w1`` …,
  ``diff``/``diff_b``, IA³ ``weight``/``on_input``, ``w_norm``/``b_norm``, GLoRA ``a1.weight`` …, OFT
  ``oft_blocks``/``oft_diag``, ``scale``, ``dora_scale``; training metadata ``ss_*`` in the header.
- ``peft``: keys ``unet.<diffusers path>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.`` for the text encoder;
  a peft folder's ``base_model.model.`` or no prefix), DoRA's ``lora_magnitude_vector``, LoHa/LoKr tensors by their
  LyCORIS names; alpha and rank from ``adapter_config.json`` (``r``, ``lora_alpha``/``alpha``, ``rank_pattern``,
  ``alpha_pattern``, ``use_rslora``) or diffusers' ``lora_adapter_metadata`` header entry. Older diffusers names
  (``processor.to_q_lora.down.weight``, ``lora_linear_layer.up.weight``, ``lora.down.weight``) are read too.

Keys that name no module of the model, or whose tensors make no known adapter kind, are reported by name
(:class:`LoadedAdapter`); ``strict=True`` refuses them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nijimi.adapters.weights import SCALARS, TENSOR_NAMES, Adapter, ModuleWeights, kind_of
from nijimi.errors import CheckpointError, ConfigError
from nijimi.io import files, safetensors
from nijimi.io.keys.adapters import (
    PEFT_TEXT,
    PEFT_UNET,
    NameTables,
    kohya_key,
    kohya_split,
    name_tables,
    peft_natives,
    peft_split,
)
from nijimi.io.limits import parse_json, read_json
from nijimi.models.ldm import ModelConfig

FORMATS = ("kohya", "peft")
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
"""Weight files of a peft folder, in order of preference."""
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_METADATA = "lora_adapter_metadata"
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "oft_unet_", "lora_te1_", "lora_te2_")  # te1/te2: SDXL, reported
_PEFT_PREFIXES = ("unet.", "text_encoder.", "base_model.model.")
_PEFT_TYPES = {"lora": "LORA", "loha": "LOHA", "lokr": "LOKR"}


@dataclass
class LoadedAdapter:
    """An adapter read from a file: the :class:`Adapter` (native paths), the file ``format``, and ``unmatched``:
    file keys that were left out, each with the reason."""

    adapter: Adapter
    format: str
    unmatched: dict[str, str] = field(default_factory=dict)


def detect_format(keys: list[str] | dict) -> str:
    """``"kohya"`` or ``"peft"`` from a file's tensor names; anything else raises :class:`CheckpointError`."""
    keys = list(keys)
    if any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(k.startswith(_PEFT_PREFIXES) or peft_split(k)[1] in TENSOR_NAMES - {"weight"} for k in keys):
        return "peft"
    raise CheckpointError(f"not a LoRA/LyCORIS/peft adapter: tensor names look like {sorted(keys)[:3]}")


# ---- kohya / LyCORIS --------------------------------------------------------------------------------------------

def _split_rows(weights: ModuleWeights, part: int, parts: int) -> ModuleWeights:
    """The share of one native module in an adapter on a fused projection (rows ``part`` of ``parts`` blocks).

    Exact for the kinds whose output rows come from separate tensor rows: LoRA (``up``), LoHa (``w1_a``, ``w2_a``),
    full, IA³ on outputs, and per-row DoRA magnitudes. Other kinds raise :class:`CheckpointError`.
    """
    t = weights.tensors

    def rows(name: str) -> torch.Tensor:
        n = t[name].shape[0] // parts
        return t[name][part * n:(part + 1) * n].clone()

    by_kind = {"lora": ("lora_up",), "loha": ("hada_w1_a", "hada_w2_a"), "full": ("diff", "diff_b"),
               "ia3": ("weight",)}
    splittable = by_kind.get(weights.kind)
    dora = t.get("dora_scale")
    on_input = weights.kind == "ia3" and "on_input" in t and bool(t["on_input"].item())
    if (splittable is None or "hada_t1" in t or "hada_t2" in t or on_input
            or (dora is not None and dora[0].numel() != 1)):
        raise CheckpointError(f"a {weights.kind} adapter on a fused q|k|v projection cannot be split exactly")
    names = [n for n in (*splittable, "dora_scale") if n in t]
    tensors = {**{k: v.clone() for k, v in t.items()}, **{n: rows(n) for n in names}}
    return ModuleWeights(weights.kind, tensors, weights.alpha, weights.scale)


def _group(sd: dict[str, torch.Tensor], split) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """File module name → tensor name → (file key, tensor)."""
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in sd.items():
        module, tensor = split(key)
        grouped.setdefault(module, {})[tensor] = (key, value)
    return grouped


def _module_weights(entries: dict[str, tuple[str, torch.Tensor]], where: str,
                    unmatched: dict[str, str]) -> ModuleWeights | None:
    """The module's weights, or None (its keys added to ``unmatched``) when its tensors make no known kind; stray
    tensors beside a complete kind are reported on their own."""
    tensors = {name: value for name, (_, value) in entries.items() if name not in SCALARS}
    kind = kind_of(set(tensors)) or kind_of(set(tensors) & TENSOR_NAMES)
    if kind is None:
        unmatched.update({key: f"tensors {sorted(tensors)} of {where} make no known adapter kind"
                          for key, _ in entries.values()})
        return None
    known = {name: v for name, v in entries.items() if name in TENSOR_NAMES or name in SCALARS}
    unmatched.update({key: f"unknown tensor {name!r} of {where}" for name, (key, _) in entries.items()
                      if name not in known})
    return ModuleWeights.from_flat({name: value for name, (_, value) in known.items()}, where)


def _read(sd: dict[str, torch.Tensor], fmt: str, tables: NameTables,
          peft_configs: dict[str, dict]) -> tuple[dict[str, ModuleWeights], dict[str, str]]:
    """kohya / LyCORIS or diffusers / peft tensors → (native path → weights, unmatched key → reason)."""
    modules: dict[str, ModuleWeights] = {}
    unmatched: dict[str, str] = {}
    kohya = fmt == "kohya"
    for name, entries in _group(sd, kohya_split if kohya else peft_split).items():
        natives = tables.kohya.natives_of.get(name) if kohya else peft_natives(name, tables)
        if natives is None:
            unmatched.update({key: f"module {name!r} is not in the model" for key, _ in entries.values()})
            continue
        weights = _module_weights(entries, name, unmatched)
        if weights is None:
            continue
        if not kohya:
            prefix = next((p for p in (PEFT_UNET, PEFT_TEXT) if name.startswith(p)), "")
            cfg = peft_configs.get(prefix, peft_configs.get(""))
            weights = _apply_peft_alpha(weights, None if "alpha" in entries else cfg, name[len(prefix):])
        try:
            modules.update({path: weights if len(natives) == 1 else _split_rows(weights, i, len(natives))
                            for i, path in enumerate(natives)})
        except CheckpointError as e:
            unmatched.update({key: f"{name}: {e}" for key, _ in entries.values()})
    return modules, unmatched


def kohya_state_dict(adapter: Adapter, tables: NameTables) -> dict[str, torch.Tensor]:
    """An adapter (native paths) as kohya / LyCORIS tensors."""
    unknown = sorted(set(adapter.modules) - set(tables.kohya.foreign_of))
    if unknown:
        raise CheckpointError(f"{len(unknown)} adapter modules have no kohya name in this model, e.g. {unknown[:3]}")
    return {kohya_key(tables.kohya.foreign_of[path], name): t for path, weights in adapter.modules.items()
            for name, t in weights.flat().items()}


def _layer_ranks(adapter: Adapter, conv: bool) -> tuple[int | None, float | None]:
    """The most common (rank, alpha) over modules on k×k convolutions (``conv``) or on the others."""
    pairs = Counter((w.rank, w.alpha) for w in adapter.modules.values()
                    if w.rank is not None and _is_kxk(w) == conv)
    return pairs.most_common(1)[0][0] if pairs else (None, None)


def _is_kxk(weights: ModuleWeights) -> bool:
    t = weights.tensors
    spatial = [v.shape[2:] for k, v in t.items() if v.ndim == 4 and k != "dora_scale"]
    return any(math.prod(s) > 1 for s in spatial)


def _number(x: float | None) -> str:
    return "None" if x is None else (str(int(x)) if float(x).is_integer() else str(x))


def kohya_metadata(adapter: Adapter, config: ModelConfig, output_name: str | None = None) -> dict[str, str]:
    """The ``ss_*`` entries kohya sd-scripts writes and A1111 reads: network module, dim, alpha and args, SD version.

    The adapter's own metadata is kept; these entries are recomputed from the tensors.
    """
    kinds = Counter(w.kind for w in adapter.modules.values())
    plain = set(kinds) <= {"lora"} and not any(w.dora or "lora_mid" in w.tensors for w in adapter.modules.values())
    rank, alpha = _layer_ranks(adapter, conv=False)
    conv_rank, conv_alpha = _layer_ranks(adapter, conv=True)
    args: dict[str, str] = {}
    if not plain:
        algo = kinds.most_common(1)[0][0]
        args["algo"] = {"lora": "locon", "oft": "diag-oft"}.get(algo, algo)
        if any(w.dora for w in adapter.modules.values()):
            args["dora_wd"] = "True"
    if conv_rank is not None:
        conv_alpha = conv_alpha if conv_alpha is not None else conv_rank
        args.update(conv_dim=_number(conv_rank), conv_alpha=_number(conv_alpha))
    meta = dict(adapter.metadata)
    meta.update(ss_network_module="networks.lora" if plain else "lycoris.kohya", ss_network_dim=_number(rank),
                ss_network_alpha=_number(alpha if alpha is not None else rank), ss_network_args=json.dumps(args))
    if output_name is not None:
        meta.setdefault("ss_output_name", output_name)
    if config.family in ("sd1", "sd2"):
        version = "sd_v2" if config.family == "sd2" else "sd_v1"
        meta["ss_v2"] = str(config.family == "sd2")
        meta["ss_base_model_version"] = version + ("_v" if config.prediction_type == "v_prediction" else "")
    return meta


# ---- diffusers / peft ---------------------------------------------------------------------------------------------

def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's rank/alpha pattern lookup: the first pattern ``p`` with ``module`` matching ``(.*\\.)?(p)$``."""
    for pattern, value in patterns.items():
        try:
            if re.fullmatch(rf"(.*\.)?({pattern})", module):
                return value
        except re.error as e:
            raise CheckpointError(f"peft rank/alpha pattern {pattern!r} is not a regular expression: {e}") from None
    return default


def _peft_configs(metadata: dict[str, str], config: dict | None) -> dict[str, dict]:
    """Model part prefix (``"unet."``, ``"text_encoder."``, ``""``) → its peft config dict."""
    configs = {"": config} if config else {}
    raw = metadata.get(DIFFUSERS_METADATA)
    if raw:
        packed = parse_json(raw, f"header entry {DIFFUSERS_METADATA!r} is not JSON")
        if not isinstance(packed, dict):
            raise CheckpointError(f"header entry {DIFFUSERS_METADATA!r} is not a JSON object: {raw[:80]!r}")
        for prefix in (PEFT_UNET, PEFT_TEXT):
            part = {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}
            if part:
                configs[prefix] = part
    return configs


def _apply_peft_alpha(weights: ModuleWeights, config: dict | None, module: str) -> ModuleWeights:
    """Turn peft's DoRA magnitude ((out,) or (1, out, 1, 1)) into the (out, 1, …) layout, and the module's ``alpha / r``
    from a peft ``config`` (``rank_pattern``/``alpha_pattern`` for ``module``, its path within the model part; ``√r``
    with ``use_rslora``) into alpha over the tensors' rank (or an explicit scale for a rank-less LoKr)."""
    if weights.kind == "lora" and weights.dora:
        ndim = weights.tensors["lora_down"].ndim
        weights.tensors["dora_scale"] = weights.tensors["dora_scale"].reshape(-1, *[1] * (ndim - 1))
    if config and "r" in config:
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module,
                               config.get("lora_alpha", config.get("alpha", r)))
        divisor = math.sqrt(r) if config.get("use_rslora") else r
        if weights.rank is None:
            weights.scale = alpha / divisor
        else:
            weights.alpha = alpha if divisor == weights.rank else alpha / divisor * weights.rank
    return weights


def _peft_tensors(name: str, weights: ModuleWeights) -> dict[str, torch.Tensor]:
    t = weights.tensors
    if weights.kind == "lora":
        if "lora_mid" in t:
            raise CheckpointError(f"{name}: peft has no Tucker LoRA (lora_mid); save as kohya")
        out = {f"{name}.lora_A.weight": t["lora_down"], f"{name}.lora_B.weight": t["lora_up"]}
        if "dora_scale" in t:
            magnitude = t["dora_scale"]
            if magnitude[0].numel() != 1:
                raise CheckpointError(f"{name}: peft stores DoRA magnitudes per output row, this one is per input")
            shape = (1, -1, 1, 1) if t["lora_down"].ndim == 4 else (-1,)
            out[f"{name}.lora_magnitude_vector"] = magnitude.reshape(shape)
        return out
    if weights.kind in _PEFT_TYPES and not weights.dora:
        return {f"{name}.{k}": v for k, v in t.items()}
    raise CheckpointError(f"{name}: a {weights.kind}{' DoRA' if weights.dora else ''} adapter has no peft layout; "
                          "save as kohya")


def _peft_rank(weights: ModuleWeights) -> int:
    """The ``r`` peft would build this module with (for a LoKr with whole factors: large enough to keep them)."""
    if weights.rank is not None:
        return weights.rank
    return max(weights.tensors["lokr_w2"].shape[:2])


def peft_state_dict(adapter: Adapter, tables: NameTables) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An adapter as diffusers / peft tensors and the ``lora_adapter_metadata`` header entry (one peft config per
    model part: ``r``/alpha of the most common module, ``rank_pattern``/``alpha_pattern`` for the others)."""
    unknown = sorted(set(adapter.modules) - set(tables.peft.foreign_of))
    if unknown:
        raise CheckpointError(f"{len(unknown)} adapter modules have no diffusers name in this model, "
                              f"e.g. {unknown[:3]}")
    tensors: dict[str, torch.Tensor] = {}
    per_part: dict[str, dict[str, ModuleWeights]] = {}
    for path, weights in adapter.modules.items():
        name = tables.peft.foreign_of[path]
        tensors.update(_peft_tensors(name, weights))
        prefix = PEFT_UNET if name.startswith(PEFT_UNET) else PEFT_TEXT
        per_part.setdefault(prefix, {})[name[len(prefix):]] = weights
    packed = {}
    for prefix, modules in per_part.items():
        packed.update({prefix + k: v for k, v in _peft_config(modules, prefix).items()})
    return tensors, {"format": "pt", DIFFUSERS_METADATA: json.dumps(packed, indent=2, sort_keys=True)}


def _peft_alpha_of(weights: ModuleWeights) -> float:
    """The ``lora_alpha`` that gives this module its scale with r = :func:`_peft_rank` (its own alpha if it has one)."""
    if weights.alpha is not None and weights.scale is None and weights.rank is not None:
        return weights.alpha
    return weights.effective_scale * _peft_rank(weights)


def _peft_config(modules: dict[str, ModuleWeights], prefix: str) -> dict:
    kinds = {w.kind for w in modules.values()}
    if len(kinds) != 1:
        raise CheckpointError(f"{prefix.rstrip('.')}: peft needs one adapter kind per model part, got {sorted(kinds)}")
    kind = kinds.pop()
    dora = {w.dora for w in modules.values()}
    if len(dora) != 1:
        raise CheckpointError(f"{prefix.rstrip('.')}: peft's use_dora holds for every module of a model part, "
                              "but only some of these modules have a DoRA magnitude; save as kohya")
    pairs = {m: (_peft_rank(w), _peft_alpha_of(w)) for m, w in modules.items()}
    r, alpha = Counter(pairs.values()).most_common(1)[0][0]
    alpha_key = "lora_alpha" if kind == "lora" else "alpha"
    config = {"peft_type": _PEFT_TYPES[kind], "r": r, alpha_key: alpha, "target_modules": sorted(modules),
              "rank_pattern": {m: p[0] for m, p in pairs.items() if p[0] != r},
              "alpha_pattern": {m: p[1] for m, p in pairs.items() if p[1] != alpha}}
    if kind == "lora":
        config["use_dora"] = dora.pop()
    return config


# ---- files ----------------------------------------------------------------------------------------------------------

def peft_weights_file(folder: Path) -> Path:
    """The weights file of a peft folder (``adapter_model.safetensors``, else ``adapter_model.bin``)."""
    found = [folder / name for name in PEFT_WEIGHTS if (folder / name).is_file()]
    if not found:
        raise CheckpointError(f"{folder}: a folder, but no peft adapter file ({' or '.join(PEFT_WEIGHTS)}) in it")
    return found[0]


def _read_files(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict | None]:
    """Tensors, header metadata and (for a peft folder, or a file with ``adapter_config.json`` beside it) the peft
    config of an adapter file or folder."""
    weights, config_path = path, path.parent / PEFT_CONFIG
    if path.is_dir():
        weights, config_path = peft_weights_file(path), path / PEFT_CONFIG
    sd, metadata = files.load_state_dict(weights)
    files.require_finite_float({k: v for k, v in sd.items() if v.is_floating_point()}, weights)
    config = None
    if config_path.is_file():
        config = read_json(config_path)
    return sd, metadata, config


def file_modules(sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """The format of a file's tensors and its modules as the file names them (module name → tensor name → tensor),
    without any model: what :func:`~nijimi.adapters.tools.describe_adapter` reports."""
    fmt = detect_format(sd)
    grouped = _group(sd, kohya_split if fmt == "kohya" else peft_split)
    return fmt, {module: {name: value for name, (_, value) in entries.items()} for module, entries in grouped.items()}


def adapter_from_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig, metadata: dict[str, str] | None = None,
                            peft_config: dict | None = None, strict: bool = False,
                            source: str = "adapter") -> LoadedAdapter:
    """An adapter from tensors already in memory (see :func:`read_adapter`)."""
    metadata = dict(metadata or {})
    fmt = detect_format(sd)
    tables = name_tables(config.unet, config.text)
    modules, unmatched = _read(sd, fmt, tables, {} if fmt == "kohya" else _peft_configs(metadata, peft_config))
    if strict and unmatched:
        listed = "; ".join(f"{k}: {why}" for k, why in list(unmatched.items())[:5])
        raise CheckpointError(f"{source}: {len(unmatched)} keys do not fit the model ({listed})")
    if not modules:
        raise CheckpointError(f"{source}: no tensor fits the model ({len(unmatched)} keys left out)")
    return LoadedAdapter(Adapter(modules, metadata), fmt, unmatched)


def read_adapter(path: str | os.PathLike, config: ModelConfig, strict: bool = False) -> LoadedAdapter:
    """Read a kohya / LyCORIS / diffusers / peft adapter (a ``.safetensors``, ``.pt``/``.ckpt``/``.bin`` file, or a
    peft folder) for a model of ``config``; the format is detected from the tensor names."""
    path = Path(path)
    sd, metadata, peft_config = _read_files(path)
    return adapter_from_state_dict(sd, config, metadata, peft_config, strict, str(path))


def save_adapter(adapter: Adapter, path: str | os.PathLike, config: ModelConfig, format: str = "kohya",
                 dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None,
                 overwrite: bool = True) -> None:
    """Write an adapter as a safetensors file in ``format`` (``kohya`` with ``ss_*`` metadata, or ``peft`` —
    diffusers' ``unet.``/``text_encoder.`` file with its ``lora_adapter_metadata``). ``dtype`` casts the
    floating-point tensors (e.g. ``torch.float16``); ``metadata`` adds header entries. An existing ``path`` is
    replaced only if ``overwrite`` (else ``OutputExistsError``)."""
    path = Path(path)
    if format not in FORMATS:
        raise ConfigError(f"unknown adapter format {format!r}; choose one of {', '.join(FORMATS)}")
    tables = name_tables(config.unet, config.text)
    if format == "kohya":
        tensors, header = kohya_state_dict(adapter, tables), kohya_metadata(adapter, config, path.stem)
    else:
        tensors, header = peft_state_dict(adapter, tables)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    safetensors.save_file(tensors, path, {**header, **(metadata or {})}, overwrite)
