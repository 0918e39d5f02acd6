"""Standalone VAE files (``--vae``): another autoencoder for a model's latent space.

Two layouts: a single file in the original layout (``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``post_quant_conv.*``, with or without the ``first_stage_model.`` prefix; the ``model_ema.*`` and ``loss.*`` keys some
files keep are ignored, as A1111 does, any other key is refused) and a diffusers ``AutoencoderKL`` folder
(``config.json`` and ``diffusion_pytorch_model.*``, read as :mod:`nijimi.io.diffusers_folder` reads a pipeline's
``vae/``). A single file's architecture is read off its shapes (:func:`~nijimi.io.detect.infer_vae_config`); its norm
groups, which shapes do not show, are the model's. The latent scaling factor is always the model's: the swapped VAE
decodes the latents the model's U-Net makes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from nijimi.errors import CheckpointError, ConfigError
from nijimi.io import files, safetensors
from nijimi.io.components import AUTOENCODER, build_strict
from nijimi.io.detect import infer_vae_config
from nijimi.io.diffusers_folder import component_config, read_component
from nijimi.models.vae import VAE, VAEConfig

_IGNORED = re.compile(r"(model_ema|loss)\..*")


def load_vae(path: str | os.PathLike, like: VAEConfig) -> VAE:
    """The VAE at ``path`` (see the module docstring), float32, in eval mode, with ``like``'s scaling factor.

    Raises :class:`ConfigError` naming the file when its latent channels or downscale factor differ from ``like``'s,
    :class:`CheckpointError` for something that is no VAE or whose weights do not fit (keys and shapes by name).
    """
    path = Path(path)
    if path.is_dir():
        config = component_config(path, AUTOENCODER)[0]
        native = read_component(path, AUTOENCODER, config)[1]
    else:
        files.regular_file(path, "VAE", missing="no such VAE file or folder")
        native = _original_keys(files.load_state_dict(path)[0])
        try:
            shapes = {AUTOENCODER.prefix + k: tuple(v.shape) for k, v in native.items()}
            config = dataclasses.replace(infer_vae_config(shapes), norm_groups=like.norm_groups)
        except (KeyError, ValueError, ConfigError) as e:
            raise CheckpointError(f"{path}: not an SD VAE in the original layout: {e}") from None
    found, wanted = (config.z_channels, config.downscale_factor), (like.z_channels, like.downscale_factor)
    if found != wanted:
        raise ConfigError(f"{path}: a VAE of {found[0]} latent channels and factor {found[1]}; this model's latents "
                          f"need {wanted[0]} channels and factor {wanted[1]}")
    config = dataclasses.replace(config, scaling_factor=like.scaling_factor)
    vae = build_strict(VAE, config, native, torch.float32, str(path))
    safetensors.release_pages(native.values())  # checked, not yet used: only what runs comes back
    return vae


def _original_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A single file's tensors under ``VAE``'s own keys: the ``first_stage_model.`` prefix dropped, EMA and training
    loss keys left out."""
    stripped = {k.removeprefix(AUTOENCODER.prefix): v for k, v in sd.items()}
    return {k: v for k, v in stripped.items() if not _IGNORED.fullmatch(k)}
