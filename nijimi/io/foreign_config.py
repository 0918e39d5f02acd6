"""The types of the diffusers / transformers ``config.json`` and ``scheduler_config.json`` keys nijimi reads, checked
where such a file enters (:func:`check_foreign_config`), before the translators of ``io/keys`` compute with them.

One table serves every component: a key means the same in each file that has it. Keys not listed are not read by
nijimi (or only compared with a fixed value) and are not checked. Sizes are only typed and ≥ 1 here; whether the
network they describe fits in memory is :func:`nijimi.io.limits.check_model_fits`'s question.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from nijimi.errors import CheckpointError


def _count(v: object) -> bool:
    return type(v) is int and v >= 1


def _counts(v: object) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_count(x) for x in v)


def _offset(v: object) -> bool:
    return type(v) is int and v >= 0


def _number(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _name(v: object) -> bool:
    return type(v) is str


def _names(v: object) -> bool:
    return isinstance(v, list) and all(_name(x) for x in v)


def _flag(v: object) -> bool:
    return type(v) is bool


_KINDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "count": (_count, "an integer ≥ 1"),
    "counts": (_counts, "a non-empty list of integers ≥ 1"),
    "count or counts": (lambda v: _count(v) or _counts(v), "an integer ≥ 1 or a list of them"),
    "optional count": (lambda v: v is None or _count(v), "an integer ≥ 1 or null"),
    "optional count or counts": (lambda v: v is None or _count(v) or _counts(v), "an integer ≥ 1, a list or null"),
    "offset": (_offset, "an integer ≥ 0"),
    "number": (_number, "a finite number"),
    "name": (_name, "a string"),
    "names": (_names, "a list of strings"),
    "flag": (_flag, "true or false"),
}

FOREIGN_KEYS: dict[str, str] = {
    # diffusers UNet2DConditionModel / ControlNetModel / AutoencoderKL
    "in_channels": "count", "out_channels": "count", "block_out_channels": "counts", "layers_per_block": "count",
    "down_block_types": "names", "up_block_types": "names", "cross_attention_dim": "count or counts",
    "transformer_layers_per_block": "count or counts", "attention_head_dim": "optional count or counts",
    "num_attention_heads": "optional count or counts", "use_linear_projection": "flag", "upcast_attention": "flag",
    "norm_num_groups": "count", "dropout": "number", "sample_size": "optional count", "latent_channels": "count",
    "scaling_factor": "number", "conditioning_channels": "count", "conditioning_embedding_out_channels": "counts",
    "global_pool_conditions": "flag",
    # transformers CLIPTextModel
    "vocab_size": "count", "max_position_embeddings": "count", "hidden_size": "count", "num_hidden_layers": "count",
    "intermediate_size": "count", "hidden_act": "name", "layer_norm_eps": "number",
    # diffusers schedulers
    "num_train_timesteps": "count", "beta_schedule": "name", "beta_start": "number", "beta_end": "number",
    "prediction_type": "name", "timestep_spacing": "name", "steps_offset": "offset", "rescale_betas_zero_snr": "flag",
    "clip_sample": "flag", "clip_sample_range": "number", "_class_name": "name",
}


CLASS_KEYS: dict[str, dict[str, str]] = {"CLIPTextModel": {"num_attention_heads": "count"}}
"""Keys whose kind differs in one class's config (a CLIP text model has one head count, a U-Net one per level)."""


def check_foreign_config(data: dict, source: str, class_name: str = "") -> None:
    """Raise :class:`CheckpointError` ``"<source>: key <key> must be <kind>, got <value>"`` for the first key of a
    diffusers / transformers config dict (of ``class_name``) whose value is not of the kind :data:`FOREIGN_KEYS`
    (or :data:`CLASS_KEYS`) gives it."""
    kinds = {**FOREIGN_KEYS, **CLASS_KEYS.get(class_name, {})}
    for key, value in data.items():
        kind = kinds.get(key)
        if kind is None:
            continue
        fits, described = _KINDS[kind]
        if not fits(value):
            raise CheckpointError(f"{source}: key {key!r} must be {described}, got {value!r:.80}")
