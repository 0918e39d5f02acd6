"""ControlNet files: original single files (lllyasviel's layout) and diffusers ``ControlNetModel`` folders.

Original files (``.safetensors``, or ``.pth``/``.ckpt`` read by the weights-only unpickler) hold the ControlNet under
``control_model.`` (v1.0 files also carry a whole SD model next to it, which is skipped) or the same keys bare
(e.g. ``control_v11p_sd15_canny``, thibaud's SD 2.1 ControlNets). Those keys *are* the module tree of
:class:`~nijimi.models.controlnet.ControlNetModel`, so loading is one strict ``load_state_dict``. The architecture
is read from the shapes: hint channels from ``input_hint_block.0.weight``, the encoder as for a U-Net, and the family
from the attention projections (SD 2.x: linear ``proj_in``, 64-wide heads; SD 1.x: 1×1 convolutions, 8 heads).
Files nijimi writes carry their :class:`ControlNetConfig` as JSON in the safetensors metadata.

diffusers folders hold ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or the ``.fp16`` / ``.bin``
variants), renamed by the table in ``nijimi.io.keys``; nijimi's own folders add ``"_nijimi_config"`` to
``config.json`` (diffusers ignores keys starting with ``_``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from nijimi.errors import CheckpointError, ConfigError, NijimiError
from nijimi.io import files, keys, safetensors
from nijimi.io.checkpoint import check_state_dict
from nijimi.io.detect import UNET_PREFIX, infer_unet_config
from nijimi.models.controlnet import ControlNetConfig, ControlNetModel

CONTROL_PREFIX = "control_model."
"""Prefix of the ControlNet's keys in original files (``cldm.ControlLDM.control_model``)."""
CONFIG_METADATA_KEY = "nijimi_controlnet_config"
"""safetensors ``__metadata__`` key holding the JSON :meth:`ControlNetConfig.to_dict` of files nijimi writes."""
NIJIMI_CONFIG_KEY = "_nijimi_config"
"""``config.json`` key holding the same in diffusers folders nijimi writes."""
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_SHOWN = 5


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
            parts.append(f"{len(self.ignored)} keys outside {CONTROL_PREFIX!r} ignored")
        return "; ".join(parts)


# ---- detection ----------------------------------------------------------------------------------------------------

def split_original(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> tuple[dict, bool, list[str]]:
    """An original file's tensors → (ControlNet state dict without ``control_model.``, whether the keys had that
    prefix, the other keys). Raises :class:`CheckpointError` when the file holds no original-layout ControlNet."""
    if any(k.startswith(CONTROL_PREFIX) for k in sd):
        native = {k[len(CONTROL_PREFIX):]: v for k, v in sd.items() if k.startswith(CONTROL_PREFIX)}
        return native, True, [k for k in sd if not k.startswith(CONTROL_PREFIX)]
    if "input_hint_block.0.weight" in sd:
        return dict(sd), False, []
    if "difference" in sd:
        raise CheckpointError(f"{source}: a 'difference' ControlNet (weights relative to a base U-Net) is not "
                              "supported; use the full ControlNet file")
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        raise CheckpointError(f"{source}: holds diffusers ControlNetModel keys; load its folder (with "
                              f"{DIFFUSERS_CONFIG}) instead of the weights file")
    groups = sorted({k.split(".", 1)[0] for k in sd})[:8]
    raise CheckpointError(f"{source}: not a ControlNet: no {CONTROL_PREFIX!r} keys and no 'input_hint_block.0.weight' "
                          f"(top-level key groups: {groups})")


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
        return _load_diffusers(path, config, dtype)
    sd, metadata = files.load_state_dict(path)
    native, prefixed, ignored = split_original(sd, str(path))
    if config is not None:
        source = "override"
    elif CONFIG_METADATA_KEY in metadata:
        config, source = _config_from_json(metadata[CONFIG_METADATA_KEY], f"{path} metadata"), "metadata"
    else:
        config, source = detect_controlnet({k: tuple(v.shape) for k, v in native.items()}, str(path)), "detected"
    model = build_controlnet(native, config, dtype, str(path))
    report = ControlNetLoadReport(str(path), "original", config, source, _dtype_names(native.values()), prefixed,
                                  tuple(ignored))
    return model, report


def _config_from_json(text: str | dict, source: str) -> ControlNetConfig:
    try:
        return ControlNetConfig.from_dict(json.loads(text) if isinstance(text, str) else text)
    except (ValueError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{source}: invalid nijimi ControlNet config: {e}") from None


def _dtype_names(tensors) -> tuple[str, ...]:
    return tuple(sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()}))


def build_controlnet(native: Mapping[str, torch.Tensor], config: ControlNetConfig, dtype: torch.dtype | None,
                     source: str = "checkpoint") -> ControlNetModel:
    """A :class:`ControlNetModel` holding ``native`` (its full state dict), built on the ``meta`` device and
    assigned the tensors (converted where ``dtype`` differs; ``None`` keeps what is stored). Missing, unexpected
    and mis-shaped keys raise one :class:`CheckpointError` naming them."""
    with torch.device("meta"):
        model = ControlNetModel(config)
    check_state_dict(native, model.state_dict(), source)
    converted = {k: v if dtype is None or v.dtype == dtype else v.to(dtype) for k, v in native.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    left = [name for name, t in model.named_parameters() if t.is_meta]
    if left:
        raise NijimiError(f"{source}: tensors left unmaterialised after loading: {left[:_SHOWN]}")
    return model.eval()


def _read_config_json(folder: Path) -> dict:
    path = folder / DIFFUSERS_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a diffusers ControlNet folder needs it)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON: {e}") from None
    if not isinstance(data, dict) or data.get("_class_name", "ControlNetModel") != "ControlNetModel":
        found = data.get("_class_name") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: not a ControlNetModel config (_class_name {found!r})")
    return data


def _load_diffusers(folder: Path, override: ControlNetConfig | None,
                    dtype: torch.dtype | None) -> tuple[ControlNetModel, ControlNetLoadReport]:
    data = _read_config_json(folder)
    if override is not None:
        config, source = override, "override"
    elif NIJIMI_CONFIG_KEY in data:
        config, source = _config_from_json(data[NIJIMI_CONFIG_KEY], str(folder / DIFFUSERS_CONFIG)), "metadata"
    else:
        try:
            config, source = keys.controlnet_config_from_diffusers(data), "diffusers"
        except ConfigError as e:
            raise CheckpointError(f"{folder / DIFFUSERS_CONFIG}: unsupported diffusers ControlNet: {e}") from None
    weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no weights file ({', '.join(DIFFUSERS_WEIGHTS)})")
    stored, _ = files.load_state_dict(weights)
    try:
        native = keys.controlnet_from_diffusers(stored, config)
    except CheckpointError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    model = build_controlnet(native, config, dtype, str(weights))
    return model, ControlNetLoadReport(str(folder), "diffusers", config, source, _dtype_names(stored.values()))


# ---- saving -------------------------------------------------------------------------------------------------------

def _tensors(model: ControlNetModel, half: bool) -> dict[str, torch.Tensor]:
    return {k: v.half() if half and v.is_floating_point() else v for k, v in model.state_dict().items()}


def save_original(model: ControlNetModel, path: str | os.PathLike, half: bool = False) -> None:
    """Write ``model`` as one original-layout ``.safetensors`` file (keys under ``control_model.``, which both
    AUTOMATIC1111 and diffusers' ``from_single_file`` recognise), atomically, with its config in the metadata."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"{path}: ControlNet files are written as .safetensors; choose a name ending in it")
    tensors = {CONTROL_PREFIX + k: v for k, v in _tensors(model, half).items()}
    meta = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(model.config.to_dict(), sort_keys=True)}
    safetensors.save_file(tensors, path, meta)


def save_diffusers(model: ControlNetModel, folder: str | os.PathLike, half: bool = False) -> None:
    """Write ``model`` as a diffusers ``ControlNetModel`` folder (``config.json`` with nijimi's config under
    ``"_nijimi_config"``, ``diffusion_pytorch_model.safetensors``); each file is written atomically."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder; refusing to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = keys.controlnet_to_diffusers(_tensors(model, half), model.config)
    safetensors.save_file(tensors, folder / DIFFUSERS_WEIGHTS[0], {"format": "pt"})
    config = {**keys.controlnet_config_to_diffusers(model.config), NIJIMI_CONFIG_KEY: model.config.to_dict()}
    with files.atomic_write(folder / DIFFUSERS_CONFIG, "w") as file:
        file.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


def convert_controlnet(src: str | os.PathLike, dst: str | os.PathLike, to: str | None = None,
                       half: bool = False) -> ControlNetLoadReport:
    """Load a ControlNet (either layout) and write it to ``dst`` as ``to`` = ``"original"`` (default when ``dst``
    ends in ``.safetensors``) or ``"diffusers"``. Tensors keep their stored dtype unless ``half``, so original →
    diffusers → original is bit-exact. Returns the load report."""
    to = to or ("original" if str(dst).lower().endswith(".safetensors") else "diffusers")
    if to not in ("original", "diffusers"):
        raise ConfigError(f"convert ControlNet: to={to!r} must be 'original' or 'diffusers'")
    model, report = load_controlnet(src, dtype=None)
    (save_original if to == "original" else save_diffusers)(model, dst, half)
    return report
