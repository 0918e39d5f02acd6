"""Whole-model checkpoints: load a single file or a diffusers folder as a :class:`LatentDiffusion`, save, convert.

Single files (``.safetensors``, or ``.ckpt`` read by the weights-only unpickler) use the original CompVis key tree,
which *is* our module tree (``nijimi.models.ldm``); SD 2.x files keep their text encoder in OpenCLIP's layout and are
renamed by ``nijimi.io.keys``. A load opens the file and parses its header once; what model a foreign file holds is
read from its keys and shapes before any tensor byte is touched (``nijimi.io.detect``); nijimi's own files carry their
:class:`ModelConfig` as JSON in the safetensors metadata.

Diffusers folders (``model_index.json`` with ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``) are read component
by component (``nijimi.io.diffusers_folder``, from the ``nijimi.io.components`` descriptors); the schedule comes from
``scheduler/scheduler_config.json``.

Loading never holds two copies of the weights: the model is built on the ``meta`` device and the tensors of the
memory-mapped file are assigned into it (``load_state_dict(assign=True)``); only dtype conversions and OpenCLIP's
fused q/k/v projections are copied. The check of every weight (finite floats) reads the whole file; its pages are then
handed back (:func:`~nijimi.io.safetensors.release_pages`), so a loaded model holds resident only what it has run
since (a txt2img run never touches the VAE encoder, nor most rows of the token embedding).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from nijimi.errors import CheckpointError, ConfigError, OutputExistsError
from nijimi.io import diffusers_folder, files, safetensors
from nijimi.io.components import AUTOENCODER, TEXT_ENCODER, UNET, build_strict, config_from_json, dtype_names
from nijimi.io.detect import (
    detect_single_file,
    probe_v_prediction,
    read_sidecar_yaml,
    sidecar_yaml,
    text_layout,
    with_v_prediction,
)
from nijimi.io.keys.clip import OPENCLIP_PREFIX, clip_native_key, text_encoder_openclip_table
from nijimi.io.keys.unet import unet_ema_table
from nijimi.models.ldm import TEXT_PREFIX, UNET_PREFIX, LatentDiffusion, ModelConfig

CONFIG_METADATA_KEY = "nijimi_config"
"""safetensors ``__metadata__`` key holding the JSON :meth:`ModelConfig.to_dict` of files nijimi writes."""

# Keys real single files carry besides the three networks, dropped without comment: the EMA copy of the U-Net,
# the DDPM schedule buffers of CompVis' LatentDiffusion, CLIP's position_ids buffer, and the autoencoder's training
# loss (LPIPS and discriminator) that some files keep.
_KNOWN_EXTRAS = re.compile(
    r"model_ema\..*|betas|alphas_cumprod(_prev)?|sqrt_(one_minus_)?alphas_cumprod|log_one_minus_alphas_cumprod|"
    r"sqrt_recip(m1)?_alphas_cumprod|posterior_(variance|log_variance_clipped|mean_coef[12])|logvar|lvlb_weights|"
    r"scale_factor|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids|first_stage_model\.loss\..*"
)
_SHOWN = 5


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_model` found and decided.

    ``layout``: ``"single"`` or ``"diffusers"``. ``config_source``: ``"metadata"`` (nijimi's own file),
    ``"detected"`` (keys and shapes), ``"diffusers"`` (the folder's config files) or ``"override"``.
    ``prediction_source``: ``"metadata"``, ``"override"``, ``"yaml"`` (side-car or given yaml), ``"probe"``
    (SD 2.x probe), ``"scheduler"`` (diffusers scheduler config) or ``"default"`` (ε, nothing says otherwise).
    ``stored_dtypes``: dtypes of the stored weights. ``ignored``: known extra keys dropped; ``unknown``: other
    keys outside the three networks, dropped and named here. ``ema``: the U-Net's EMA weights were used.
    """

    path: str
    layout: str
    config: ModelConfig
    config_source: str
    prediction_source: str
    stored_dtypes: tuple[str, ...]
    ignored: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    ema: bool = False

    def summary(self) -> str:
        """One line for a user: what was loaded and how it was recognised."""
        parts = [f"{self.path}: {self.layout} {self.config.family} model", f"config from {self.config_source}",
                 f"{self.config.prediction_type} ({self.prediction_source})", f"stored {'/'.join(self.stored_dtypes)}"]
        if self.ema:
            parts.append("EMA weights")
        if self.ignored:
            parts.append(f"{len(self.ignored)} known extra keys ignored")
        if self.unknown:
            parts.append(f"{len(self.unknown)} unknown keys ignored: {', '.join(self.unknown[:_SHOWN])}")
        return "; ".join(parts)


# ---- loading ------------------------------------------------------------------------------------------------------

def load_model(path: str | os.PathLike, config: ModelConfig | str | os.PathLike | None = None,
               dtype: torch.dtype | None = torch.float32, ema: bool = False) -> tuple[LatentDiffusion, LoadReport]:
    """Load a Stable Diffusion model from a single file (``.safetensors``/``.ckpt``) or a diffusers folder.

    ``config`` overrides detection: a :class:`ModelConfig`, a preset name (``"sd21_v"`` …) or the path of an LDM
    inference ``.yaml`` (its ``parameterization``; the shapes still come from the file). ``dtype``: the floating
    dtype of the returned weights (float32 by default; ``None`` keeps them as stored). ``ema``: use a single file's
    EMA copy of the U-Net (``model_ema.*``). The model is returned in eval mode on the CPU.

    Raises :class:`CheckpointError` naming the file and the problem (unreadable file, unknown architecture,
    missing/unexpected keys, mismatched shapes, non-float weights).
    """
    path = Path(path)
    if dtype is not None and not dtype.is_floating_point:
        raise ConfigError(f"load_model: dtype must be a floating dtype or None, got {dtype}")
    if path.is_dir():
        if ema:
            raise ConfigError(f"{path}: a diffusers folder holds no EMA copy; ema=True is for single files")
        return _load_diffusers(path, config, dtype)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return _load_single(path, config, dtype, ema)


@dataclass(frozen=True)
class _Choice:
    config: ModelConfig
    layout: str
    config_source: str
    prediction_source: str


def _choose_config(path: Path, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str],
                   override: ModelConfig | str | os.PathLike | None) -> _Choice:
    """The config of a single file: an override config; else nijimi's metadata or detection, with the prediction
    type from a given yaml, else the side-car yaml, else the metadata or (SD 2.x) the probe."""
    layout = text_layout(shapes) or "clip"
    config = _override_config(override)
    if config is not None:
        return _Choice(config, layout, "override", "override")
    if CONFIG_METADATA_KEY in metadata:
        key = CONFIG_METADATA_KEY
        config = config_from_json(ModelConfig, metadata[key], str(path), f"{key} metadata")
        source, prediction_source = "metadata", "metadata"
    else:
        config = detect_single_file(shapes, str(path))
        probe = config.family == "sd2" and config.unet.in_channels == 4
        source, prediction_source = "detected", "probe" if probe else "default"
    yaml = Path(override) if override is not None else sidecar_yaml(path)
    prediction = read_sidecar_yaml(yaml) if yaml is not None else None
    if prediction == "v_prediction":
        config, prediction_source = with_v_prediction(config), "yaml"
    elif prediction == "epsilon":
        config, prediction_source = config.with_prediction_type("epsilon"), "yaml"
    return _Choice(config, layout, source, prediction_source)


def _override_config(override: ModelConfig | str | os.PathLike | None) -> ModelConfig | None:
    """The :class:`ModelConfig` an override names (itself or a preset); None for no override or a yaml path."""
    if isinstance(override, ModelConfig):
        return override
    if isinstance(override, str) and not override.lower().endswith((".yaml", ".yml")):
        return ModelConfig.preset(override)
    return None


def _load_single(path: Path, override: ModelConfig | str | os.PathLike | None, dtype: torch.dtype | None,
                 ema: bool) -> tuple[LatentDiffusion, LoadReport]:
    sd, metadata = files.load_state_dict(path)  # the one open and header parse of this load (tensors memory-mapped)
    choice = _choose_config(path, {k: tuple(v.shape) for k, v in sd.items()}, metadata, override)
    native, ignored, unknown = single_to_native(sd, choice.config, choice.layout, str(path), ema)
    model = build_strict(LatentDiffusion, choice.config, native, dtype, str(path))
    safetensors.release_pages(sd.values())
    if choice.prediction_source == "probe" and probe_v_prediction(model.unet):
        model.set_config(with_v_prediction(model.config))
    report = LoadReport(str(path), "single", model.config, choice.config_source, choice.prediction_source,
                        dtype_names(sd.values()), tuple(ignored), tuple(unknown), ema)
    return model, report


def single_to_native(sd: Mapping[str, torch.Tensor], config: ModelConfig, layout: str, source: str = "checkpoint",
                     ema: bool = False) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """A single file's tensors → (native state dict of :class:`LatentDiffusion`, ignored extras, unknown keys).

    ``layout`` is the text-encoder layout of the file (``"clip"`` or ``"openclip"``, :func:`detect.text_layout`);
    it must be the one ``config.family`` stores. No tensor is copied except OpenCLIP's split q/k/v projections.
    """
    expected = "openclip" if config.family == "sd2" else "clip"
    if layout != expected:
        prefixes = {"clip": TEXT_PREFIX, "openclip": OPENCLIP_PREFIX}
        raise CheckpointError(f"{source}: a {config.family} model keeps its text encoder under "
                              f"{prefixes[expected]!r}, but the file has it under {prefixes[layout]!r}")
    own = (UNET.prefix, AUTOENCODER.prefix, TEXT_ENCODER.prefix)
    native, text, ignored, unknown = {}, {}, [], []
    for key, tensor in sd.items():
        if _KNOWN_EXTRAS.fullmatch(key):
            ignored.append(key)
        elif layout == "openclip" and key.startswith(OPENCLIP_PREFIX):
            text[key[len(OPENCLIP_PREFIX):]] = tensor
        elif key.startswith(TEXT_PREFIX):
            native[TEXT_PREFIX + clip_native_key(key[len(TEXT_PREFIX):])] = tensor
        elif key.startswith(own):
            native[key] = tensor
        else:
            unknown.append(key)
    if layout == "openclip":
        if config.text.projection_dim is None:
            dropped = [k for k in ("text_projection", "logit_scale") if text.pop(k, None) is not None]
            ignored += [OPENCLIP_PREFIX + k for k in dropped]
        try:
            renamed = text_encoder_openclip_table(config.text).to_native(text)
            native.update({TEXT_PREFIX + k: v for k, v in renamed.items()})
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
    if ema:
        native.update(_ema_unet(sd, config, source))
    return native, ignored, unknown


def _ema_unet(sd: Mapping[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """The U-Net's EMA weights (see :func:`~nijimi.io.keys.unet.unet_ema_table`) under native keys."""
    table = unet_ema_table(config.unet)
    try:
        ema = table.to_native({k: sd[k] for _, k in table if k in sd})
    except CheckpointError as e:
        raise CheckpointError(f"{source}: ema=True but the file's EMA weights do not fit: {e}") from None
    return {UNET_PREFIX + k: v for k, v in ema.items()}


def _load_diffusers(folder: Path, override: ModelConfig | str | os.PathLike | None,
                    dtype: torch.dtype | None) -> tuple[LatentDiffusion, LoadReport]:
    config, source = diffusers_folder.read_config(folder)
    prediction_source = "scheduler"
    if _override_config(override) is not None:
        config, source, prediction_source = _override_config(override), "override", "override"
    elif override is not None:
        prediction = read_sidecar_yaml(override)
        if prediction is not None:
            config, prediction_source = config.with_prediction_type(prediction), "yaml"
    stored, native = diffusers_folder.read_weights(folder, config)
    model = build_strict(LatentDiffusion, config, native, dtype, str(folder))
    safetensors.release_pages(stored)
    report = LoadReport(str(folder), "diffusers", config, source, prediction_source, dtype_names(stored))
    return model, report


# ---- saving -------------------------------------------------------------------------------------------------------

def single_file_state_dict(model: LatentDiffusion, half: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors under single-file (CompVis) keys; SD 2.x's text encoder in OpenCLIP layout (fused
    ``in_proj``). ``half`` stores floating tensors as float16."""
    out, text = {}, {}
    for key, tensor in model.state_dict().items():
        if model.config.family == "sd2" and key.startswith(TEXT_PREFIX):
            text[key[len(TEXT_PREFIX):]] = tensor
        else:
            out[key] = tensor
    if text:
        openclip = text_encoder_openclip_table(model.config.text).to_foreign(text)
        out.update({OPENCLIP_PREFIX + k: v for k, v in openclip.items()})
    return {k: v.half() if half and v.is_floating_point() else v for k, v in out.items()}


def save_single(model: LatentDiffusion, path: str | os.PathLike, half: bool = False,
                metadata: Mapping[str, str] | None = None, overwrite: bool = True) -> None:
    """Write ``model`` as one ``.safetensors`` file in the CompVis layout, atomically; an existing ``path`` is
    replaced only if ``overwrite`` (else ``OutputExistsError``).

    The :class:`ModelConfig` goes into the metadata (key :data:`CONFIG_METADATA_KEY`) so nijimi reloads the file
    exactly; ``metadata`` (str → str) is added. ``half``: store float16.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"{path}: single files are written as .safetensors; choose a name ending in .safetensors")
    extra = dict(metadata or {})
    if CONFIG_METADATA_KEY in extra:
        raise ConfigError(f"metadata key {CONFIG_METADATA_KEY!r} is reserved for the model config")
    meta = {"format": "pt", **extra, CONFIG_METADATA_KEY: json.dumps(model.config.to_dict(), sort_keys=True)}
    safetensors.save_file(single_file_state_dict(model, half), path, meta, overwrite)


def save_diffusers(model: LatentDiffusion, folder: str | os.PathLike, half: bool = False,
                   overwrite: bool = True) -> None:
    """Write ``model`` as a diffusers ``StableDiffusionPipeline`` folder, atomically (built in a temp sibling folder,
    then renamed into place; an existing ``folder`` is replaced only if ``overwrite``, see
    :func:`~nijimi.io.diffusers_folder.atomic_folder`). ``half``: store float16. See :mod:`nijimi.io.diffusers_folder`
    for the contents."""
    diffusers_folder.write(model, Path(folder), half, overwrite)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str | None = None, half: bool = False,
            config: ModelConfig | str | os.PathLike | None = None, overwrite: bool = False) -> LoadReport:
    """``nijimi convert SRC DST [--to single|diffusers] [--half] [--overwrite]``: load ``src`` (either format) and
    write ``dst``, which must not exist unless ``overwrite`` (else ``OutputExistsError``, also when another process
    creates it meanwhile).

    ``to`` defaults to ``"single"`` when ``dst`` ends in ``.safetensors``, else ``"diffusers"``. Tensors keep their
    stored dtype unless ``half`` (float16), so single → diffusers → single is bit-exact. Returns the load report.
    """
    to = to or ("single" if str(dst).lower().endswith(".safetensors") else "diffusers")
    if to not in ("single", "diffusers"):
        raise ConfigError(f"convert: to={to!r} must be 'single' or 'diffusers'")
    if not overwrite and os.path.lexists(dst):
        raise OutputExistsError(f"{dst} exists; use --overwrite to replace it")
    model, report = load_model(src, config=config, dtype=None)
    if to == "single":
        save_single(model, dst, half=half, overwrite=overwrite)
    else:
        save_diffusers(model, dst, half=half, overwrite=overwrite)
    return report
