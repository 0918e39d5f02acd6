"""Text-encoder keys and config: native (transformers ``CLIPTextModel`` layout, with ``text_model.``) ↔ transformers
(the diffusers ``text_encoder`` folder) and ↔ OpenCLIP (SD 2.x single files), plus the key variants files carry."""

from __future__ import annotations

import functools

from nijimi.errors import ConfigError
from nijimi.io.keys.table import RenameTable, native_keys
from nijimi.models.text_encoder import TextEncoder, TextEncoderConfig

OPENCLIP_PREFIX = "cond_stage_model.model."
"""Where SD 2.x single files keep their OpenCLIP text tower (SD 1.x: the native ``cond_stage_model.transformer.``)."""

# Native keys that old transformers files carry and nijimi drops.
_CLIP_IGNORED = frozenset({"text_model.embeddings.position_ids"})
# Encoder-layer sub-modules: native (transformers) name → OpenCLIP ``transformer.resblocks.{i}`` name. The separate
# q/k/v projections of a layer are OpenCLIP's fused ``attn.in_proj_weight`` / ``attn.in_proj_bias`` (rows q|k|v).
_CLIP_OPENCLIP_PARTS = (("layer_norm1", "ln_1"), ("self_attn.out_proj", "attn.out_proj"), ("layer_norm2", "ln_2"),
                        ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
_CLIP_OPENCLIP_TOP = (("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
                      ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
                      ("text_model.final_layer_norm.weight", "ln_final.weight"),
                      ("text_model.final_layer_norm.bias", "ln_final.bias"))


def clip_native_key(key: str) -> str:
    """A transformers CLIP key in native form: with the ``text_model.`` level (transformers ≥ 5 and some SD 1.x files
    leave it out)."""
    top = ("text_model.", "text_projection.", "logit_scale")
    return key if key.startswith(top) else "text_model." + key


def _clip_layer(key: str) -> int | None:
    """The encoder layer index of a native key, or None outside ``text_model.encoder.layers``."""
    prefix = "text_model.encoder.layers."
    return int(key[len(prefix):].split(".", 1)[0]) if key.startswith(prefix) else None


@functools.lru_cache(maxsize=8)
def text_encoder_transformers_table(cfg: TextEncoderConfig) -> RenameTable:
    """``(native_key, transformers_key)`` for the parameters a transformers ``CLIPTextModel`` keeps.

    The keys are the same (the native tree *is* transformers' ``text_model.`` layout). ``CLIPTextModel`` has no
    clip-skip, so only the layers up to the default one (``num_layers - clip_skip + 1``) are kept, and no
    projection: this is what diffusers' SD 2.x ``text_encoder`` folder holds (23 of OpenCLIP-H's 24 layers, no
    ``text_projection``/``logit_scale``), whose last hidden state equals the native encoder's default output. The
    other native keys are the table's ``native_extra``; foreign keys may leave out ``text_model.``.
    """
    used = cfg.num_layers - cfg.clip_skip + 1
    keys = native_keys(TextEncoder, cfg)
    kept = tuple((k, k) for k in keys if k.startswith("text_model.") and (_clip_layer(k) or 0) < used)
    return RenameTable("text encoder", "transformers", kept, native_extra=frozenset(keys) - {k for k, _ in kept},
                       foreign_extra=_CLIP_IGNORED, alias=clip_native_key)


@functools.lru_cache(maxsize=8)
def text_encoder_openclip_table(cfg: TextEncoderConfig) -> RenameTable:
    """``(native_key, openclip_key)`` for every parameter, OpenCLIP keys as in an SD 2.x single file after
    ``cond_stage_model.model.``. The q, k, v rows of a layer map to the same fused ``in_proj`` key, in that order;
    ``text_projection.weight`` (``(proj, width)``) is OpenCLIP's ``text_projection`` (``(width, proj)``) transposed.
    """
    table = list(_CLIP_OPENCLIP_TOP)
    for i in range(cfg.num_layers):
        native, foreign = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        for param in ("weight", "bias"):
            table += [(f"{native}.self_attn.{p}_proj.{param}", f"{foreign}.attn.in_proj_{param}") for p in "qkv"]
            table += [(f"{native}.{a}.{param}", f"{foreign}.{b}.{param}") for a, b in _CLIP_OPENCLIP_PARTS]
    if cfg.projection_dim is not None:
        table += [("text_projection.weight", "text_projection"), ("logit_scale", "logit_scale")]
    return RenameTable("text encoder", "OpenCLIP", tuple(table), transposed=frozenset({"text_projection.weight"}))


def text_encoder_config_to_transformers(cfg: TextEncoderConfig) -> dict:
    """The ``config.json`` of the transformers ``CLIPTextModel`` that :func:`text_encoder_transformers_table` fills:
    ``num_hidden_layers`` counts only the layers up to the default one (23 for OpenCLIP-H, as in diffusers)."""
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width, "intermediate_size": cfg.mlp_width,
        "projection_dim": cfg.projection_dim or cfg.width, "num_hidden_layers": cfg.num_layers - cfg.clip_skip + 1,
        "num_attention_heads": cfg.num_heads, "max_position_embeddings": cfg.max_positions,
        "hidden_act": cfg.activation, "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "initializer_range": 0.02,
        "initializer_factor": 1.0, "pad_token_id": 1, "bos_token_id": cfg.vocab_size - 2,
        "eos_token_id": cfg.vocab_size - 1,
    }


def text_encoder_config_from_transformers(d: dict) -> TextEncoderConfig:
    """A :class:`TextEncoderConfig` from a transformers ``CLIPTextConfig`` dict (absent keys: transformers'
    defaults), used at its last layer and without projection parameters."""
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ConfigError(f"transformers CLIP hidden_act={act!r} is not supported (only quick_gelu, gelu)")
    if d.get("layer_norm_eps", 1e-5) != 1e-5:
        raise ConfigError(f"transformers CLIP layer_norm_eps={d['layer_norm_eps']} is not supported (only 1e-05)")
    return TextEncoderConfig(
        vocab_size=d.get("vocab_size", 49408), max_positions=d.get("max_position_embeddings", 77),
        width=d.get("hidden_size", 512), num_layers=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 8), mlp_width=d.get("intermediate_size", 2048), activation=act,
    )
