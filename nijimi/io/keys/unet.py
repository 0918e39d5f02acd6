"""U-Net keys and config: native (CompVis) ↔ diffusers ``UNet2DConditionModel``, and the EMA copy's key variant."""

from __future__ import annotations

import functools

from nijimi.errors import ConfigError
from nijimi.io.keys.table import RenameTable, module_table, native_keys
from nijimi.models.unet import UNetConfig, UNetModel

# ResBlock sub-modules: original name → diffusers ResnetBlock2D name. Transformer sub-trees are named alike in both.
_UNET_RESNET_PARTS = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                      ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))

# diffusers UNet2DConditionModel options that every SD 1.x/2.x U-Net has at these values (nijimi has no others).
_UNET_DIFFUSERS_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": 1e-5,
    "only_cross_attention": False, "dual_cross_attention": False, "resnet_time_scale_shift": "default",
    "class_embed_type": None, "num_class_embeds": None, "addition_embed_type": None, "encoder_hid_dim": None,
    "time_cond_proj_dim": None, "time_embedding_type": "positional", "conv_in_kernel": 3, "conv_out_kernel": 3,
}


def unet_module_pairs(cfg: UNetConfig) -> dict[str, str]:
    """Native module path → diffusers module path, for every module that holds parameters, from the config's shape."""
    pairs = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.1": "mid_block.attentions.0"}
    resnets = {"middle_block.0": "mid_block.resnets.0", "middle_block.2": "mid_block.resnets.1"}
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    for level in range(levels):
        for j in range(n):
            block = f"input_blocks.{1 + level * (n + 1) + j}"
            resnets[f"{block}.0"] = f"down_blocks.{level}.resnets.{j}"
            if level in cfg.attention_levels:
                pairs[f"{block}.1"] = f"down_blocks.{level}.attentions.{j}"
        if level < levels - 1:
            pairs[f"input_blocks.{1 + level * (n + 1) + n}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
    for up in range(levels):
        level = levels - 1 - up
        attention = level in cfg.attention_levels
        for j in range(n + 1):
            block = f"output_blocks.{up * (n + 1) + j}"
            resnets[f"{block}.0"] = f"up_blocks.{up}.resnets.{j}"
            if attention:
                pairs[f"{block}.1"] = f"up_blocks.{up}.attentions.{j}"
        if level > 0:
            upsample = f"output_blocks.{up * (n + 1) + n}.{2 if attention else 1}.conv"
            pairs[upsample] = f"up_blocks.{up}.upsamplers.0.conv"
    for native, foreign in resnets.items():
        pairs.update({f"{native}.{a}": f"{foreign}.{b}" for a, b in _UNET_RESNET_PARTS})
    return pairs


@functools.lru_cache(maxsize=8)
def unet_key_table(cfg: UNetConfig) -> RenameTable:
    """``(native_key, diffusers_key)`` for every parameter of ``UNetModel(cfg)``, in the model's order."""
    return module_table("U-Net", native_keys(UNetModel, cfg), unet_module_pairs(cfg))


@functools.lru_cache(maxsize=8)
def unet_ema_table(cfg: UNetConfig) -> RenameTable:
    """``(native_key, EMA key)``: CompVis single files keep the U-Net's EMA copy of ``model.diffusion_model.a.b`` as
    ``model_ema.diffusion_modelab``."""
    pairs = tuple((k, "model_ema.diffusion_model" + k.replace(".", "")) for k in native_keys(UNetModel, cfg))
    return RenameTable("U-Net", "EMA", pairs)


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """The diffusers ``config.json`` of a ``UNet2DConditionModel`` with this architecture."""
    levels = range(len(cfg.channel_mult))
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    heads = cfg.num_heads if cfg.num_heads is not None else [cfg.heads_for(c)[0] for c in channels]
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if lv in cfg.attention_levels else "DownBlock2D" for lv in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if lv in cfg.attention_levels else "UpBlock2D"
                           for lv in reversed(levels)],
        "block_out_channels": channels, "layers_per_block": cfg.num_res_blocks,
        # diffusers' "attention_head_dim" is really the number of heads (its documented historical misnomer).
        "attention_head_dim": heads, "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": cfg.transformer_depth, "use_linear_projection": cfg.linear_proj,
        "upcast_attention": cfg.upcast_attention, "norm_num_groups": cfg.norm_groups, "dropout": cfg.dropout,
        **_UNET_DIFFUSERS_FIXED,
    }


def unet_config_from_diffusers(d: dict) -> UNetConfig:
    """A :class:`UNetConfig` from a diffusers ``UNet2DConditionModel`` ``config.json`` dict (absent keys: defaults)."""
    for key, value in _UNET_DIFFUSERS_FIXED.items():
        if d.get(key, value) != value:
            raise ConfigError(f"diffusers U-Net option {key}={d[key]!r} is not supported (only {value!r})")
    channels = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(d.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    attention = [t == "CrossAttnDownBlock2D" for t in down]
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if len(down) != len(channels) or set(down) - {"CrossAttnDownBlock2D", "DownBlock2D"} or up != expected_up:
        raise ConfigError(f"diffusers U-Net blocks down={down} up={up} for {len(channels)} levels are not SD-like")
    for key in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim"):
        if not isinstance(d.get(key, 1), int):
            raise ConfigError(f"diffusers U-Net option {key}={d[key]!r}: only one value for all blocks is supported")
    if any(c % channels[0] for c in channels):
        raise ConfigError(f"diffusers U-Net block_out_channels={channels} are not multiples of the first")
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), model_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels), num_res_blocks=d.get("layers_per_block", 2),
        attention_levels=tuple(lv for lv, a in enumerate(attention) if a),
        **_unet_heads_from_diffusers(d.get("num_attention_heads") or d.get("attention_head_dim", 8), channels),
        context_dim=d.get("cross_attention_dim", 1280), transformer_depth=d.get("transformer_layers_per_block", 1),
        linear_proj=d.get("use_linear_projection", False), upcast_attention=d.get("upcast_attention", False),
        norm_groups=d.get("norm_num_groups", 32), dropout=d.get("dropout", 0.0), sample_size=d.get("sample_size") or 64,
    )


def _unet_heads_from_diffusers(heads: int | list[int], channels: list[int]) -> dict:
    """diffusers per-level head counts → ``num_heads`` (same everywhere) or ``head_dim`` (same head width)."""
    if isinstance(heads, int) or len(set(heads)) == 1:
        return {"num_heads": heads if isinstance(heads, int) else heads[0], "head_dim": None}
    widths = {c // h for c, h in zip(channels, heads, strict=True) if c % h == 0}
    if len(widths) != 1 or any(c % h for c, h in zip(channels, heads, strict=True)):
        raise ConfigError(f"diffusers U-Net heads {heads} for channels {channels}: neither one count nor one width")
    return {"num_heads": None, "head_dim": widths.pop()}
