"""TAESD, the tiny autoencoder of Stable Diffusion's latent space (madebyollin/taesd; diffusers' ``AutoencoderTiny``).

A stand-in for the LDM VAE (:mod:`nijimi.models.vae`) distilled onto the same latents: no attention, no norms, only
3×3 convs, ReLUs and residual :class:`Block` s over ``channels`` (64) features, with ``len(blocks) - 1`` stride-2
stages (3 for SD: ``f = 8``). About 1.2 M parameters per half: a small fraction of the cost of SD's VAE.

Conventions, with how the two published forms differ:

- Latents are the diffusion model's, already multiplied by the VAE's ``scaling_factor``: TAESD applies no factor
  (diffusers' AutoencoderTiny configs say ``scaling_factor = 1``). The decoder starts with a soft clamp,
  ``tanh(z / 3) · 3``.
- Images: raw TAESD encodes from and decodes to [0, 1]; diffusers' EncoderTiny / DecoderTiny convert from and to
  [-1, 1] inside ``forward``. :meth:`TAESD.encode_latents` / :meth:`TAESD.decode_latents` use [-1, 1], like the VAE's.
- ``latent_magnitude = 3`` and ``latent_shift = 0.5`` only map latents to [0, 1] (``z / 6 + 0.5``) for storing them
  as 8-bit images; decoding does not use them.

The module tree is the published key tree: :class:`TinyEncoder`'s state dict is ``taesd_encoder.safetensors``
(``0.weight``, ``1.conv.0.weight``, ``2.weight`` …) and :class:`TinyDecoder`'s is ``taesd_decoder.safetensors``
(``1.weight``, ``3.conv.0.weight``, ``7.weight`` …; position 0 is the weightless clamp), so each loads with one
strict ``load_state_dict``; :mod:`nijimi.io.taesd` renames diffusers' folder keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nijimi.errors import ConfigError


@dataclass(frozen=True)
class TAESDConfig:
    """Shape of a tiny autoencoder: ``blocks[i]`` residual blocks at resolution stage ``i`` of the encoder (full
    resolution first); the decoder runs the stages in reverse."""

    latent_channels: int = 4
    channels: int = 64
    blocks: tuple[int, ...] = (1, 3, 3, 3)

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(int(n) for n in self.blocks))
        if not self.blocks or min(self.blocks) < 1 or min(self.latent_channels, self.channels) < 1:
            raise ConfigError(f"TAESDConfig needs positive sizes and block counts, got {self}")

    @classmethod
    def sd(cls) -> TAESDConfig:
        """The published TAESD of SD 1.x / 2.x (``taesd``) and SDXL (``taesdxl``): f = 8, 4 latent channels."""
        return cls()

    @classmethod
    def tiny(cls) -> TAESDConfig:
        """A narrow f = 4 autoencoder for factor-4 VAEs such as the embedded model's."""
        return cls(channels=32, blocks=(1, 2, 2))

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent cell along each side: ``2^(stages - 1)``."""
        return 2 ** (len(self.blocks) - 1)


def _conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """The decoder's first layer: ``tanh(z / 3) · 3`` squashes latents into (-3, 3) smoothly."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z: (B, C, h, w) -> (B, C, h, w)``."""
        return torch.tanh(z / 3) * 3


class Block(nn.Module):
    """``relu(x + conv.4(relu(conv.2(relu(conv.0(x))))))``: three 3×3 convs with a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, H, W) -> (B, C, H, W)``."""
        return F.relu(self.conv(x) + x)


class TinyEncoder(nn.Sequential):
    """Image in [0, 1] ``(B, 3, H, W)`` → latents ``(B, latent_channels, H/f, W/f)``: a conv, then per stage a
    bias-free stride-2 conv (not at the first) and its blocks, then a conv to the latent channels."""

    def __init__(self, cfg: TAESDConfig) -> None:
        c = cfg.channels
        layers: list[nn.Module] = [_conv(3, c)]
        for stage, count in enumerate(cfg.blocks):
            layers += [_conv(c, c, stride=2, bias=False)] if stage else []
            layers += [Block(c) for _ in range(count)]
        super().__init__(*layers, _conv(c, cfg.latent_channels))


class TinyDecoder(nn.Sequential):
    """Latents ``(B, latent_channels, h, w)`` → image in about [0, 1] ``(B, 3, h·f, w·f)``: clamp, conv, ReLU, then
    per stage (deepest first) its blocks and, except after the last, a nearest ×2 upsample and a bias-free conv;
    then a conv to RGB."""

    def __init__(self, cfg: TAESDConfig) -> None:
        c, counts = cfg.channels, cfg.blocks[::-1]
        layers: list[nn.Module] = [Clamp(), _conv(cfg.latent_channels, c), nn.ReLU()]
        for stage, count in enumerate(counts):
            layers += [Block(c) for _ in range(count)]
            layers += [nn.Upsample(scale_factor=2), _conv(c, c, bias=False)] if stage < len(counts) - 1 else []
        super().__init__(*layers, _conv(c, 3))


class TAESD(nn.Module):
    """The ``encoder`` and ``decoder`` halves; a half that was not loaded is None (each published file holds one)."""

    def __init__(self, cfg: TAESDConfig, encoder: bool = True, decoder: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = TinyEncoder(cfg) if encoder else None
        self.decoder = TinyDecoder(cfg) if decoder else None

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``(B, 3, H, W)``, ``H, W`` multiples of f → latents ``(B, latent_channels, H/f, W/f)``
        on the diffusion model's scale."""
        f = self.config.downscale_factor
        if self.encoder is None or x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % f or x.shape[3] % f:
            raise ConfigError(f"TAESD encode needs an encoder and (B, 3, H, W) images with H, W multiples of {f}, "
                              f"got {tuple(x.shape)}{'' if self.encoder else ' and no encoder'}")
        return self.encoder((x + 1) / 2)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, latent_channels, h, w)`` on the diffusion model's scale → images ``(B, 3, h·f, w·f)`` in
        about [-1, 1]."""
        c = self.config.latent_channels
        if self.decoder is None or latents.ndim != 4 or latents.shape[1] != c:
            raise ConfigError(f"TAESD decode needs a decoder and (B, {c}, h, w) latents, got "
                              f"{tuple(latents.shape)}{'' if self.decoder else ' and no decoder'}")
        return self.decoder(latents) * 2 - 1
