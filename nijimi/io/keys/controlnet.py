"""ControlNet keys and config: native (lllyasviel's ``control_model.`` tree) ↔ diffusers ``ControlNetModel``."""

from __future__ import annotations

import functools

from nijimi.errors import ConfigError
from nijimi.io.keys.table import RenameTable, module_table, native_keys
from nijimi.io.keys.unet import unet_config_from_diffusers, unet_config_to_diffusers, unet_module_pairs
from nijimi.models.controlnet import ControlNetConfig, ControlNetModel

# diffusers ControlNetModel options nijimi's ControlNet has at these values, besides the U-Net's fixed ones.
_CONTROLNET_DIFFUSERS_FIXED = {"controlnet_conditioning_channel_order": "rgb", "encoder_hid_dim_type": None,
                               "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None}
# Entries of a U-Net config.json that a ControlNetModel does not take.
_UNET_ONLY_DIFFUSERS_KEYS = ("_class_name", "sample_size", "out_channels", "up_block_types", "dropout",
                             "center_input_sample", "dual_cross_attention", "time_cond_proj_dim",
                             "time_embedding_type", "conv_in_kernel", "conv_out_kernel")


def _controlnet_module_pairs(cfg: ControlNetConfig) -> dict[str, str]:
    """Native module path → diffusers module path: the U-Net encoder's renames plus the hint encoder
    (``input_hint_block.{first, …, last}`` ↔ ``controlnet_cond_embedding.{conv_in, blocks.k, conv_out}``) and the
    zero convolutions (``zero_convs.{i}.0`` ↔ ``controlnet_down_blocks.{i}``, ``middle_block_out.0`` ↔
    ``controlnet_mid_block``)."""
    pairs = unet_module_pairs(cfg.unet)
    first, *middle, last = (f"input_hint_block.{i}" for i in cfg.hint_conv_indices)
    pairs.update({first: "controlnet_cond_embedding.conv_in", last: "controlnet_cond_embedding.conv_out"})
    pairs.update({native: f"controlnet_cond_embedding.blocks.{k}" for k, native in enumerate(middle)})
    blocks = len(cfg.unet.channel_mult) * (cfg.unet.num_res_blocks + 1)
    pairs.update({f"zero_convs.{i}.0": f"controlnet_down_blocks.{i}" for i in range(blocks)})
    pairs["middle_block_out.0"] = "controlnet_mid_block"
    return pairs


@functools.lru_cache(maxsize=8)
def controlnet_key_table(cfg: ControlNetConfig) -> RenameTable:
    """``(native_key, diffusers_key)`` for every parameter of ``ControlNetModel(cfg)``, in the model's order.

    Native keys are the original file's keys after ``control_model.``.
    """
    return module_table("ControlNet", native_keys(ControlNetModel, cfg), _controlnet_module_pairs(cfg))


def controlnet_config_to_diffusers(cfg: ControlNetConfig) -> dict:
    """The diffusers ``config.json`` of a ``ControlNetModel`` with this architecture."""
    unet = {k: v for k, v in unet_config_to_diffusers(cfg.unet).items() if k not in _UNET_ONLY_DIFFUSERS_KEYS}
    return {"_class_name": "ControlNetModel", **unet, "conditioning_channels": cfg.hint_channels,
            "conditioning_embedding_out_channels": list(cfg.hint_widths), "global_pool_conditions": cfg.global_pool,
            **_CONTROLNET_DIFFUSERS_FIXED}


def controlnet_config_from_diffusers(d: dict) -> ControlNetConfig:
    """A :class:`ControlNetConfig` from a diffusers ``ControlNetModel`` ``config.json`` dict (absent keys: diffusers'
    defaults). Options nijimi's ControlNet does not have raise :class:`ConfigError` naming them."""
    for key, value in _CONTROLNET_DIFFUSERS_FIXED.items():
        if d.get(key, value) != value:
            raise ConfigError(f"diffusers ControlNet option {key}={d[key]!r} is not supported (only {value!r})")
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down)]
    unet = unet_config_from_diffusers({**d, "down_block_types": down, "up_block_types": up,
                                       "out_channels": d.get("in_channels", 4)})
    widths = d.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    return ControlNetConfig(unet, d.get("conditioning_channels", 3), tuple(widths),
                            d.get("global_pool_conditions", False))
