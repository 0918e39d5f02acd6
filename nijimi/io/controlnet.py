"""ControlNet files: original single files (lllyasviel's layout) and diffusers ``ControlNetModel`` folders.

Original files (``.safetensors``, or ``.pth``/``.ckpt`` read by the weights-only unpickler) hold the ControlNet under
``control_model.`` (v1.0 files also carry a whole SD model next to it, which is skipped) or the same keys bare
(e.g. ``control_v11p_sd15_canny``, thibaud's SD 2.1 ControlNets). Those keys *are* the module tree of
:class:`~nijimi.models.controlnet.ControlNetModel`, so loading is one strict ``load_state_dict``. The architecture
is read from the shapes: hint channels from ``input_hint_block.0.weight``, the encoder as for a U-Net, and the family
from the attention projections (SD 2.x: linear ``proj_in``, 64-wide heads; SD 1.x: 1×1 convolutions, 8 heads).
Files nijimi writes carry their :class:`ControlNetConfig` as JSON in the safetensors metadata.

diffusers folders are read and written by :mod:`nijimi.io.diffusers_folder` from the :data:`CONTROLNET` descriptor;
nijimi's own folders carry their config as ``"_nijimi_config"`` in ``config.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from nijimi.errors import CheckpointError, ConfigError
from nijimi.io import diffusers_folder, files, safetensors
from nijimi.io.components import CONTROLNET, build_strict, config_from_json, dtype_names
from nijimi.io.detect import infer_unet_config
from nijimi.models.controlnet import ControlNetConfig, ControlNetModel
from nijimi.models.ldm import UNET_PREFIX


@dataclass(frozen=True)
class ControlNetLoadReport:
    """What :func:`load_controlnet` found.

    ``layout``: ``"original"`` or ``"diffusers"``. ``config_source``: ``"metadata"`` (nijimi's own file or folder),
    ``"detected"`` (an original file's shapes), ``"diffusers"`` (``config.json``) or ``"override"``.
    ``prefixed``: an original file's keys were under ``control_model.``. ``ignored``: other keys of the file
    (a whole SD model in v1.0 files), not loaded. ``stored_dtypes``: dtypes of the stored weights.
    """

    path: str
    layout: str
    config: ControlNetConfig
    config_source: str
    stored_dtypes: tuple[str, ...]
    prefixed: bool = False
    ignored: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """``"sd2"`` for a ControlNet of an SD 2.x-style U-Net (linear projections), else ``"sd1"``."""
        return "sd2" if self.config.unet.linear_proj else "sd1"

    def summary(self) -> str:
        """One line for a user: what was loaded and how it was recognised."""
        parts = [f"{self.path}: {self.layout} {self.family} ControlNet ({self.config.hint_channels}-channel maps)",
                 f"config from {self.config_source}", f"stored {'/'.join(self.stored_dtypes)}"]
        if self.ignored:
            parts.append(f"{len(self.ignored)} keys outside {CONTROLNET.prefix!r} ignored")
        return "; ".join(parts)


# ---- detection ----------------------------------------------------------------------------------------------------

def split_original(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> tuple[dict, bool, list[str]]:
    """An original file's tensors → (ControlNet state dict without ``control_model.``, whether the keys had that
    prefix, the other keys). Raises :class:`CheckpointError` when the file holds no original-layout ControlNet."""
    if any(k.startswith(CONTROLNET.prefix) for k in sd):
        native = {k[len(CONTROLNET.prefix):]: v for k, v in sd.items() if k.startswith(CONTROLNET.prefix)}
        return native, True, [k for k in sd if not k.startswith(CONTROLNET.prefix)]
    if "input_hint_block.0.weight" in sd:
        return dict(sd), False, []
    if "difference" in sd:
        raise CheckpointError(f"{source}: a 'difference' ControlNet (weights relative to a base U-Net) is not "
                              "supported; use the full ControlNet file")
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        raise CheckpointError(f"{source}: holds diffusers ControlNetModel keys; load its folder (with "
                              "config.json) instead of the weights file")
    groups = sorted({k.split(".", 1)[0] for k in sd})[:8]
    raise CheckpointError(f"{source}: not a ControlNet: no {CONTROLNET.prefix!r} keys and no "
                          f"'input_hint_block.0.weight' (top-level key groups: {groups})")


def detect_controlnet(shapes: Mapping[str, tuple[int, ...]], name: str = "checkpoint") -> ControlNetConfig:
    """The :class:`ControlNetConfig` of an original-layout ControlNet from ``{key: shape}`` (keys without
    ``control_model.``). Head counts follow the family (see the module docstring)."""
    try:
        hint_in = tuple(shapes["input_hint_block.0.weight"])
        indices = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("input_hint_block.")
                         and k.endswith(".weight"))
        outs = [tuple(shapes[f"input_hint_block.{i}.weight"])[0] for i in indices]
        sd2 = len(shapes["middle_block.1.proj_in.weight"]) == 2
        # A ControlNet has the U-Net's encoder keys but no output convolution: supply its channel count as is.
        unet_shapes = {UNET_PREFIX + k: v for k, v in shapes.items()}
        unet_shapes[UNET_PREFIX + "out.2.weight"] = (tuple(shapes["input_blocks.0.0.weight"])[1],)
        unet = infer_unet_config(unet_shapes, sd2)
        if len(outs) < 2 or len(outs) % 2 or indices != list(range(0, 2 * len(outs), 2)):
            raise ConfigError(f"input_hint_block convolutions at {indices} are not 0, 2, 4, …")
        return ControlNetConfig(unet, hint_in[1], tuple(outs[0:-1:2]))
    except KeyError as e:
        key = str(e.args[0]).removeprefix("missing key ").strip("'").removeprefix(UNET_PREFIX)
        raise CheckpointError(f"{name}: unknown ControlNet architecture: missing key {key!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"{name}: unknown ControlNet architecture: {e}") from None


# ---- loading ------------------------------------------------------------------------------------------------------

def load_controlnet(path: str | os.PathLike, config: ControlNetConfig | None = None,
                    dtype: torch.dtype | None = torch.float32) -> tuple[ControlNetModel, ControlNetLoadReport]:
    """Load a ControlNet from an original file or a diffusers folder, in eval mode on the CPU.

    ``config`` overrides what the file says (e.g. an SD 1.x-style ControlNet with other head counts, or
    ``global_pool=True`` for a "shuffle" file, whose original yaml holds that flag). ``dtype``: dtype of the returned
    weights (``None`` keeps them as stored). Raises :class:`CheckpointError` naming the file and the problem.
    """
    path = Path(path)
    if path.is_dir():
        config, source = diffusers_folder.component_config(path, CONTROLNET, config)
        stored, native = diffusers_folder.read_component(path, CONTROLNET, config)
        model = build_strict(CONTROLNET.module, config, native, dtype, str(path))
        return model, ControlNetLoadReport(str(path), "diffusers", config, source, dtype_names(stored.values()))
    sd, metadata = files.load_state_dict(path)
    native, prefixed, ignored = split_original(sd, str(path))
    if config is not None:
        source = "override"
    elif CONTROLNET.metadata_key in metadata:
        key = CONTROLNET.metadata_key
        config, source = config_from_json(ControlNetConfig, metadata[key], str(path), f"{key} metadata"), "metadata"
    else:
        config, source = detect_controlnet({k: tuple(v.shape) for k, v in native.items()}, str(path)), "detected"
    model = build_strict(CONTROLNET.module, config, native, dtype, str(path))
    report = ControlNetLoadReport(str(path), "original", config, source, dtype_names(native.values()), prefixed,
                                  tuple(ignored))
    return model, report


# ---- saving -------------------------------------------------------------------------------------------------------

def save_original(model: ControlNetModel, path: str | os.PathLike, half: bool = False,
                  overwrite: bool = True) -> None:
    """Write ``model`` as one original-layout ``.safetensors`` file (keys under ``control_model.``, which both
    AUTOMATIC1111 and diffusers' ``from_single_file`` recognise), atomically, with its config in the metadata; an
    existing ``path`` is replaced only if ``overwrite`` (else ``OutputExistsError``)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"{path}: ControlNet files are written as .safetensors; choose a name ending in it")
    tensors = {CONTROLNET.prefix + k: v.half() if half and v.is_floating_point() else v
               for k, v in model.state_dict().items()}
    meta = {"format": "pt", CONTROLNET.metadata_key: json.dumps(model.config.to_dict(), sort_keys=True)}
    safetensors.save_file(tensors, path, meta, overwrite)


def save_diffusers(model: ControlNetModel, folder: str | os.PathLike, half: bool = False) -> None:
    """Write ``model`` as a diffusers ``ControlNetModel`` folder (``config.json`` with nijimi's config under
    ``"_nijimi_config"``, ``diffusion_pytorch_model.safetensors``), whole and atomically: an existing ``folder`` is
    replaced only if it is empty or holds a ``config.json``."""
    with diffusers_folder.atomic_folder(Path(folder), "config.json") as temp:
        diffusers_folder.write_component(temp, CONTROLNET, model.config, model.state_dict(), half,
                                         {diffusers_folder.NIJIMI_CONFIG_KEY: model.config.to_dict()})
