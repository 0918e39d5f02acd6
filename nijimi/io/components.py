"""Each network described once, as a :class:`Component`, and the one strict builder every loader uses.

A component says what module and config class the network is, where an original single file keeps it, how its keys
and its config JSON translate to diffusers' / transformers' folder, and where nijimi keeps its own config. The model
loader (:mod:`nijimi.io.checkpoint`), the ControlNet loader (:mod:`nijimi.io.controlnet`) and the diffusers-folder
reader/writer (:mod:`nijimi.io.diffusers_folder`) all work from these descriptors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nijimi.errors import CheckpointError, ConfigError, NijimiError
from nijimi.io import files
from nijimi.io.keys import clip, controlnet, unet, vae
from nijimi.io.keys.table import RenameTable
from nijimi.io.limits import check_model_fits, parse_json
from nijimi.models.controlnet import ControlNetConfig, ControlNetModel
from nijimi.models.ldm import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from nijimi.models.text_encoder import TextEncoder, TextEncoderConfig
from nijimi.models.unet import UNetConfig, UNetModel
from nijimi.models.vae import VAE, VAEConfig

_SHOWN = 5


@dataclass(frozen=True)
class Component:
    """One network: ``module`` and ``config`` classes; ``prefix`` of its keys in an original single file; ``table``
    (config → :class:`RenameTable` to the folder's keys); ``config_to_foreign`` / ``config_from_foreign`` (the
    folder's ``config.json``); ``metadata_key`` (safetensors metadata key of nijimi's config JSON in a file holding
    the network alone; None for the parts of a whole model, whose config is the model's); ``name`` (its sub-folder in
    a diffusers pipeline folder), ``class_name`` (its diffusers/transformers class) and ``weights`` (file stem)."""

    name: str
    module: type[nn.Module]
    config: type
    prefix: str
    table: Callable[[Any], RenameTable]
    config_to_foreign: Callable[[Any], dict]
    config_from_foreign: Callable[[dict], Any]
    metadata_key: str | None
    class_name: str
    weights: str = "diffusion_pytorch_model"


UNET = Component("unet", UNetModel, UNetConfig, UNET_PREFIX, unet.unet_key_table, unet.unet_config_to_diffusers,
                 unet.unet_config_from_diffusers, None, "UNet2DConditionModel")
AUTOENCODER = Component("vae", VAE, VAEConfig, VAE_PREFIX, vae.vae_key_table, vae.vae_config_to_diffusers,
                        vae.vae_config_from_diffusers, None, "AutoencoderKL")
TEXT_ENCODER = Component("text_encoder", TextEncoder, TextEncoderConfig, TEXT_PREFIX,
                         clip.text_encoder_transformers_table, clip.text_encoder_config_to_transformers,
                         clip.text_encoder_config_from_transformers, None, "CLIPTextModel", "model")
CONTROLNET = Component("controlnet", ControlNetModel, ControlNetConfig, "control_model.",
                       controlnet.controlnet_key_table, controlnet.controlnet_config_to_diffusers,
                       controlnet.controlnet_config_from_diffusers, "nijimi_controlnet_config", "ControlNetModel")


def config_from_json(config_class: type, data: str | dict, source: str, key: str) -> Any:
    """``config_class.from_dict`` of nijimi's config JSON (text, bounded by :func:`~nijimi.io.limits.parse_json`, or
    parsed) stored under ``key``; a bad one (wrong type or range of any value) raises :class:`CheckpointError` naming
    ``source`` and ``key``."""
    parsed = parse_json(data, f"{source}: invalid {key}") if isinstance(data, str) else data
    try:
        return config_class.from_dict(parsed)
    except (ValueError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{source}: invalid {key}: {e}") from None


def dtype_names(tensors: Iterable[torch.Tensor]) -> tuple[str, ...]:
    """The floating dtypes among ``tensors``, by name (``("float16",)``), for load reports."""
    return tuple(sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()}))


def state_dict_problems(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """How ``sd`` does not fit ``expected`` (a model's state dict), one phrase each: missing and unexpected keys (the
    first few by name, with counts), mismatched shapes (key and both shapes); empty when it fits."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:_SHOWN]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:_SHOWN]}")
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches, e.g. {'; '.join(shapes[:_SHOWN])}")
    return problems


def check_state_dict(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one :class:`CheckpointError` if ``sd`` does not fit ``expected`` (:func:`state_dict_problems`) or holds
    non-float, NaN or infinite weights (the first key)."""
    problems = state_dict_problems(sd, expected)
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model: {'; '.join(problems)}")
    files.require_finite_float(sd, source)


def build_strict(module: Callable[[Any], nn.Module], config: object, native: Mapping[str, torch.Tensor],
                 dtype: torch.dtype | None, source: str = "checkpoint") -> Any:
    """``module(config)`` holding ``native`` (its full state dict), in eval mode, built without a second copy:
    checked to fit this machine's memory (:func:`~nijimi.io.limits.check_model_fits`), made on the ``meta`` device,
    checked by :func:`check_state_dict`, then assigned the tensors (converted where ``dtype`` differs from the stored
    one; ``None`` keeps what is stored)."""
    check_model_fits(config, source)
    with torch.device("meta"):
        model = module(config)
    check_state_dict(native, model.state_dict(), source)
    converted = {k: v if dtype is None or v.dtype == dtype else v.to(dtype) for k, v in native.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise NijimiError(f"{source}: tensors left unmaterialised after loading: {left[:_SHOWN]}")
    return model.eval()
