"""VAE keys and config: native (CompVis ``first_stage_model``) ↔ diffusers ``AutoencoderKL``."""

from __future__ import annotations

import functools
import math

from nijimi.errors import ConfigError
from nijimi.io.keys.table import RenameTable, module_table, native_keys
from nijimi.models.vae import VAE, VAEConfig

# Sub-module renames inside a VAE ResnetBlock / mid AttnBlock: original name → diffusers name.
_VAE_RESNET_PARTS = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                     ("nin_shortcut", "conv_shortcut"))
_VAE_ATTN_PARTS = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
# Original 1×1 convs of the mid attention whose weights diffusers stores as Linear (out, in) matrices.
_VAE_ATTN_CONVS = ("q", "k", "v", "proj_out")

# diffusers AutoencoderKL options that every SD-style VAE has at these values (nijimi has no others).
_VAE_DIFFUSERS_FIXED = {"act_fn": "silu", "mid_block_add_attention": True, "use_quant_conv": True,
                        "use_post_quant_conv": True, "shift_factor": None, "latents_mean": None, "latents_std": None}


def _vae_module_pairs(cfg: VAEConfig) -> dict[str, str]:
    """Native module path → diffusers module path for every VAE module holding parameters.

    diffusers numbers the decoder's ``up_blocks`` in execution order, the original numbers ``up`` by resolution
    level, so ``decoder.up.{L-1-i}`` ↔ ``decoder.up_blocks.{i}``.
    """
    levels = len(cfg.channel_mult)
    pairs = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    blocks = {}
    for part in ("encoder", "decoder"):
        pairs.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.norm_out": f"{part}.conv_norm_out",
                      f"{part}.conv_out": f"{part}.conv_out"})
        blocks.update({f"{part}.mid.block_1": f"{part}.mid_block.resnets.0",
                       f"{part}.mid.block_2": f"{part}.mid_block.resnets.1"})
        pairs.update({f"{part}.mid.attn_1.{a}": f"{part}.mid_block.attentions.0.{b}" for a, b in _VAE_ATTN_PARTS})
    for level in range(levels):
        up = levels - 1 - level
        blocks.update({f"encoder.down.{level}.block.{j}": f"encoder.down_blocks.{level}.resnets.{j}"
                       for j in range(cfg.num_res_blocks)})
        blocks.update({f"decoder.up.{level}.block.{j}": f"decoder.up_blocks.{up}.resnets.{j}"
                       for j in range(cfg.num_res_blocks + 1)})
        if level < levels - 1:
            pairs[f"encoder.down.{level}.downsample.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
        if level > 0:
            pairs[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    for native, foreign in blocks.items():
        pairs.update({f"{native}.{a}": f"{foreign}.{b}" for a, b in _VAE_RESNET_PARTS})
    return pairs


@functools.lru_cache(maxsize=8)
def vae_key_table(cfg: VAEConfig) -> RenameTable:
    """``(native_key, diffusers_key)`` for every parameter of ``VAE(cfg)``, in the model's order (native keys without
    ``first_stage_model.``). The mid attention's 1×1 conv weights ``(C, C, 1, 1)`` are diffusers Linear ``(C, C)``
    weights (a reshaped view, so round trips are bit-exact)."""
    keys = native_keys(VAE, cfg)
    flat = frozenset(k for k in keys if k.endswith(tuple(f".mid.attn_1.{c}.weight" for c in _VAE_ATTN_CONVS)))
    return module_table("VAE", keys, _vae_module_pairs(cfg), flattened=flat)


def vae_config_to_diffusers(cfg: VAEConfig, sample_size: int = 512) -> dict:
    """The diffusers ``config.json`` of an ``AutoencoderKL`` with this architecture.

    ``sample_size`` (pixels) is only diffusers' default tile size for tiled decoding.
    """
    levels = len(cfg.channel_mult)
    return {
        "_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.channels * m for m in cfg.channel_mult], "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels, "norm_num_groups": cfg.norm_groups, "sample_size": sample_size,
        "scaling_factor": cfg.scaling_factor, "force_upcast": True, **_VAE_DIFFUSERS_FIXED,
    }


def vae_config_from_diffusers(d: dict) -> VAEConfig:
    """A :class:`VAEConfig` from a diffusers ``AutoencoderKL`` ``config.json`` dict (absent keys: diffusers'
    defaults). Options nijimi's VAE does not have raise :class:`ConfigError` naming them."""
    for key, value in _VAE_DIFFUSERS_FIXED.items():
        if d.get(key, value) != value:
            raise ConfigError(f"diffusers VAE option {key}={d[key]!r} is not supported (only {value!r})")
    widths = [int(c) for c in d.get("block_out_channels", (64,))]
    down = list(d.get("down_block_types", ["DownEncoderBlock2D"]))
    up = list(d.get("up_block_types", ["UpDecoderBlock2D"]))
    if down != ["DownEncoderBlock2D"] * len(widths) or up != ["UpDecoderBlock2D"] * len(widths):
        raise ConfigError(f"diffusers VAE blocks down={down} up={up} for {len(widths)} levels are not SD-like")
    base = math.gcd(*widths)
    return VAEConfig(
        in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3), channels=base,
        channel_mult=tuple(w // base for w in widths), num_res_blocks=d.get("layers_per_block", 1),
        z_channels=d.get("latent_channels", 4), norm_groups=d.get("norm_num_groups", 32),
        scaling_factor=d.get("scaling_factor", 0.18215),
    )
