"""How big a network a config asks for, estimated from its numbers alone (nothing is built).

Loaders compare the estimate with the memory there is before building a model, so a crafted config (10⁹ layers,
10⁹ channels) is refused instead of allocating until killed. The counts follow the module trees of ``models/``:
a 3×3 convolution ``c_in → c_out`` holds ``9·c_in·c_out`` weights, a transformer block over ``c`` channels with a
``d``-wide context ``18c² + 2cd`` (self-attention 4c², cross-attention 2c² + 2cd, GEGLU feed-forward 12c²), biases and
norms are left out. The estimate is within about 10 % of the real count for SD's and the tiny presets' sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from nijimi.models.controlnet import ControlNetConfig
from nijimi.models.ldm import ModelConfig
from nijimi.models.text_encoder import TextEncoderConfig
from nijimi.models.unet import UNetConfig
from nijimi.models.vae import VAEConfig


@dataclass(frozen=True)
class Size:
    """``parameters``: weights the network holds; ``blocks``: its residual/transformer blocks (Python modules, each
    costing memory of its own however narrow)."""

    parameters: int
    blocks: int

    def __add__(self, other: Size) -> Size:
        return Size(self.parameters + other.parameters, self.blocks + other.blocks)


def _res(c_in: int, c_out: int, emb: int = 0) -> Size:
    skip = c_in * c_out if c_in != c_out else 0
    return Size(9 * c_in * c_out + 9 * c_out * c_out + emb * c_out + skip, 1)


def _transformer(c: int, depth: int, context: int) -> Size:
    return Size(2 * c * c + depth * (18 * c * c + 2 * c * context), depth)


def unet_size(cfg: UNetConfig) -> Size:
    """The U-Net: per level ``num_res_blocks`` res blocks down and one more up (on the concatenated skip), a
    transformer after each where the level attends, the middle block, time embedding and the in/out convolutions."""
    emb, n = cfg.time_embed_dim, cfg.num_res_blocks
    ends = 9 * cfg.model_channels * (cfg.in_channels + cfg.out_channels)
    total = Size(cfg.model_channels * emb + emb * emb + ends, 0)
    previous = cfg.model_channels
    for level, mult in enumerate(cfg.channel_mult):
        c = cfg.model_channels * mult
        attention = _transformer(c, cfg.transformer_depth, cfg.context_dim) if level in cfg.attention_levels else None
        down, up = _res(previous, c, emb), _res(2 * c, c, emb)
        total += Size(n * down.parameters + (n + 1) * up.parameters + 18 * c * c, 2 * n + 1)
        if attention is not None:
            total += Size((2 * n + 1) * attention.parameters, (2 * n + 1) * attention.blocks)
        previous = c
    c = cfg.model_channels * cfg.channel_mult[-1]
    return total + _res(c, c, emb) + _res(c, c, emb) + _transformer(c, cfg.transformer_depth, cfg.context_dim)


def vae_size(cfg: VAEConfig) -> Size:
    """The autoencoder: encoder levels of ``num_res_blocks`` res blocks, decoder levels of one more, a middle block of
    two res blocks and an attention block on each side."""
    total, n = Size(9 * cfg.channels * (cfg.in_channels + cfg.out_channels), 0), cfg.num_res_blocks
    previous = cfg.channels
    for mult in cfg.channel_mult:
        c = cfg.channels * mult
        total += Size(n * _res(previous, c).parameters + (n + 1) * _res(c, c).parameters + 18 * c * c, 2 * n + 1)
        previous = c
    middle = _res(previous, previous) + _res(previous, previous) + Size(4 * previous * previous, 1)
    return total + middle + middle + Size(18 * previous * cfg.z_channels, 0)


def text_encoder_size(cfg: TextEncoderConfig) -> Size:
    """CLIP's text transformer: token and position embeddings, then per layer attention (4w²) and MLP (2·w·mlp)."""
    embeddings = (cfg.vocab_size + cfg.max_positions) * cfg.width
    layer = 4 * cfg.width * cfg.width + 2 * cfg.width * cfg.mlp_width
    return Size(embeddings + cfg.num_layers * layer + cfg.width * (cfg.projection_dim or 0), cfg.num_layers)


def model_size(config: object) -> Size:
    """The :class:`Size` of the network a :class:`ModelConfig`, :class:`UNetConfig`, :class:`VAEConfig`,
    :class:`TextEncoderConfig` or :class:`ControlNetConfig` describes (a ControlNet counted as its U-Net, an upper
    bound); ``Size(0, 0)`` for other configs."""
    if isinstance(config, ModelConfig):
        return unet_size(config.unet) + vae_size(config.vae) + text_encoder_size(config.text)
    if isinstance(config, ControlNetConfig):
        return unet_size(config.unet)
    sizes = {UNetConfig: unet_size, VAEConfig: vae_size, TextEncoderConfig: text_encoder_size}
    return sizes[type(config)](config) if type(config) in sizes else Size(0, 0)
