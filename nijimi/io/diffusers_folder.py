"""diffusers folders: one reader/writer for every :class:`~nijimi.io.components.Component`, and whole SD pipelines.

A component folder holds ``config.json`` and its weights (``diffusion_pytorch_model.safetensors``, for a text encoder
``model.safetensors``), also as ``*.fp16.safetensors`` variants, sharded (``*.safetensors.index.json``) or ``.bin``
(read only by the weights-only unpickler); keys and config are translated by the component's table and translators.
A pipeline folder holds ``model_index.json`` and one component folder each::

    unet/          config.json, diffusion_pytorch_model.safetensors   (diffusers UNet2DConditionModel)
    vae/           config.json, diffusion_pytorch_model.safetensors   (diffusers AutoencoderKL)
    text_encoder/  config.json, model.safetensors                      (transformers CLIPTextModel)
    tokenizer/     vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/     scheduler_config.json

Folders are written whole into a hidden temp sibling, then renamed into place (:func:`atomic_folder`). Folders nijimi
writes carry additions the diffusers and transformers loaders ignore: nijimi's config as ``"_nijimi_config"`` (in
``model_index.json``, or a lone component's ``config.json``), and ``text_encoder/nijimi_text_extra.safetensors`` with
the text encoder's tensors a ``CLIPTextModel`` has no place for (SD 2.x's last OpenCLIP layer, which SD skips, and
its projection), so single file → folder → single file is lossless.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import importlib.resources
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.errors import CheckpointError, ConfigError, OutputExistsError
from nijimi.io import files, safetensors
from nijimi.io.components import AUTOENCODER, TEXT_ENCODER, UNET, Component, config_from_json
from nijimi.io.foreign_config import check_foreign_config
from nijimi.io.limits import read_json
from nijimi.models.ldm import SD1_PAD_TOKEN_ID, SD2_PAD_TOKEN_ID, LatentDiffusion, ModelConfig
from nijimi.text.tokenizer import BOS_TOKEN, EOS_TOKEN, VOCAB_FILE, byte_symbols

NIJIMI_CONFIG_KEY = "_nijimi_config"
DIFFUSERS_LAYOUT_VERSION = "0.30.0"
"""The diffusers release whose folder layout ``model_index.json`` says it follows (its pipelines require the key)."""
TEXT_EXTRA_FILE = "nijimi_text_extra.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".fp16.safetensors", ".safetensors.index.json", ".fp16.safetensors.index.json",
                    ".bin", ".fp16.bin", ".bin.index.json", ".fp16.bin.index.json")
_CLIP_VOCAB_SIZE = 49408
_N_SPECIAL = 2
_FORMAT_METADATA = {"format": "pt"}


def _read_json(path: Path, foreign: str | None = None) -> dict:
    """The JSON object in ``path`` (bounded in size and depth, :func:`~nijimi.io.limits.read_json`); ``foreign``: the
    class of a diffusers / transformers config, whose keys are then type-checked
    (:func:`~nijimi.io.foreign_config.check_foreign_config`)."""
    data = read_json(path, missing="missing (needed in a diffusers folder)")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if foreign is not None:
        check_foreign_config(data, str(path), foreign)
    return data


# ---- one component -------------------------------------------------------------------------------------------------

def component_config(folder: Path, component: Component, override: Any = None) -> tuple[Any, str]:
    """The config of a component folder and where it came from: ``override`` (``"override"``), nijimi's own entry in
    ``config.json`` (``"metadata"``) or the translated ``config.json`` (``"diffusers"``)."""
    path = folder / "config.json"
    data = _read_json(path, foreign=component.class_name)
    if data.get("_class_name", component.class_name) != component.class_name:
        raise CheckpointError(f"{path}: not a {component.class_name} config (_class_name {data['_class_name']!r})")
    if override is not None:
        return override, "override"
    if NIJIMI_CONFIG_KEY in data:
        return config_from_json(component.config, data[NIJIMI_CONFIG_KEY], str(path), NIJIMI_CONFIG_KEY), "metadata"
    try:
        return component.config_from_foreign(data), "diffusers"
    except ConfigError as e:
        raise CheckpointError(f"{path}: unsupported diffusers {component.class_name}: {e}") from None


def _weights(folder: Path, component: Component) -> dict[str, torch.Tensor]:
    """All tensors of a component folder (full precision first, then fp16; safetensors before .bin), joining the
    shards an ``*.index.json`` lists."""
    path = next((folder / (component.weights + s) for s in _WEIGHT_SUFFIXES
                 if (folder / (component.weights + s)).is_file()), None)
    if path is None:
        raise CheckpointError(f"{folder}: no weights file ({component.weights}.safetensors, "
                              f"{component.weights}.fp16.safetensors or {component.weights}.bin)")
    if not path.name.endswith(".index.json"):
        return files.load_state_dict(path)[0]
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: no weight_map")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(files.load_state_dict(folder / shard)[0])
    return out


def read_component(folder: Path, component: Component, config: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """(stored tensors, native state dict) of a component folder whose architecture is ``config``."""
    stored = _weights(folder, component)
    try:
        return stored, component.table(config).to_native(stored)
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save(tensors: Mapping[str, torch.Tensor], path: Path, half: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.save_file({k: v.half() if half and v.is_floating_point() else v for k, v in tensors.items()},
                          path, _FORMAT_METADATA)


def write_component(folder: Path, component: Component, config: Any, native: Mapping[str, torch.Tensor],
                    half: bool, extra: Mapping[str, object] | None = None) -> None:
    """Write ``native`` (the network's state dict) as a component folder: renamed weights (float16 if ``half``) and
    ``config.json`` with ``extra`` entries added."""
    _save(component.table(config).to_foreign(native), folder / f"{component.weights}.safetensors", half)
    _write_json(folder / "config.json", {**component.config_to_foreign(config), **(extra or {})})


@contextlib.contextmanager
def atomic_folder(folder: Path, marker: str, overwrite: bool = True) -> Iterator[Path]:
    """Yield a hidden temp sibling of ``folder`` to fill; on success it replaces ``folder`` whole, on error it goes.

    With ``overwrite`` an existing ``folder`` is replaced only if it is empty or holds ``marker`` (a folder of the
    same kind). Without, ``folder`` must not exist (``OutputExistsError``): it is claimed first by creating it empty
    (``mkdir`` fails on an existing name, so of two writers exactly one wins), and the filled temp folder is renamed
    onto that empty claim, which POSIX ``rename`` replaces atomically and which fails if anything was put into it.
    """
    if overwrite and folder.exists() and not (folder.is_dir() and (not any(folder.iterdir())
                                                                   or (folder / marker).is_file())):
        raise CheckpointError(f"{folder}: exists and is not an empty or diffusers folder; refusing to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        try:
            folder.mkdir()
        except FileExistsError:
            raise OutputExistsError(f"{folder} exists; use --overwrite to replace it") from None
    temp = folder.with_name(f".{folder.name}.{os.urandom(4).hex()}.tmp")
    temp.mkdir()
    try:
        yield temp
        if overwrite:
            _move_into_place(temp, folder)
        else:
            os.replace(temp, folder)
    except BaseException as e:
        shutil.rmtree(temp, ignore_errors=True)
        if not overwrite:
            with contextlib.suppress(OSError):
                folder.rmdir()  # our claim, unless something was put into it
            if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputExistsError(f"{folder}: another process wrote into it meanwhile; left as it is") from None
        raise


def _move_into_place(temp: Path, folder: Path) -> None:
    if not folder.exists():
        os.replace(temp, folder)
        return
    old = folder.with_name(f".{folder.name}.{os.urandom(4).hex()}.old")
    os.replace(folder, old)
    try:
        os.replace(temp, folder)
    except OSError:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- whole pipelines -----------------------------------------------------------------------------------------------

def _parts(config: ModelConfig) -> tuple[tuple[Component, Any], ...]:
    return (UNET, config.unet), (AUTOENCODER, config.vae), (TEXT_ENCODER, config.text)


def read_config(folder: Path) -> tuple[ModelConfig, str]:
    """The folder's :class:`ModelConfig` and where it came from (``"metadata"``: nijimi's own entry in
    ``model_index.json``; ``"diffusers"``: the components' config files). The schedule always comes from
    ``scheduler/scheduler_config.json`` (SD's own when the folder has none)."""
    index = _read_json(folder / "model_index.json")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    try:
        stored = _read_json(scheduler, "scheduler") if scheduler.exists() else None
        schedule = NoiseSchedule.from_diffusers_config(stored) if stored is not None else None
        if NIJIMI_CONFIG_KEY in index:
            config = config_from_json(ModelConfig, index[NIJIMI_CONFIG_KEY], str(folder / "model_index.json"),
                                      NIJIMI_CONFIG_KEY)
            return dataclasses.replace(config, schedule=schedule or config.schedule), "metadata"
        unet, vae, text = (component_config(folder / c.name, c)[0] for c in (UNET, AUTOENCODER, TEXT_ENCODER))
        family = "sd2" if text.activation == "gelu" else "sd1"
        pad = _pad_token_id(folder / "tokenizer", SD2_PAD_TOKEN_ID if family == "sd2" else SD1_PAD_TOKEN_ID)
        return ModelConfig(unet, vae, text, family, pad, schedule or NoiseSchedule.sd()), "diffusers"
    except ConfigError as e:
        raise CheckpointError(f"{folder}: unsupported diffusers model: {e}") from None


def _pad_token_id(tokenizer: Path, default: int) -> int:
    """The id of the tokenizer's pad token (``special_tokens_map.json`` looked up in ``vocab.json``)."""
    special, vocab = tokenizer / "special_tokens_map.json", tokenizer / "vocab.json"
    if not special.exists() or not vocab.exists():
        return default
    pad = _read_json(special).get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    ids = _read_json(vocab)
    if pad is None:
        return default
    if not isinstance(pad, str) or pad not in ids or type(ids[pad]) is not int:
        raise CheckpointError(f"{special}: pad token {pad!r:.80} is not a token of {vocab.name}")
    return ids[pad]


def read_weights(folder: Path, config: ModelConfig) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """(every stored tensor, the native :class:`LatentDiffusion` state dict) of a diffusers folder."""
    extra = folder / TEXT_ENCODER.name / TEXT_EXTRA_FILE
    tail = files.load_state_dict(extra)[0] if extra.is_file() else {}
    native = {TEXT_ENCODER.prefix + k: v for k, v in tail.items()}
    stored = list(tail.values())
    for component, part in _parts(config):
        tensors, renamed = read_component(folder / component.name, component, part)
        native.update({component.prefix + k: v for k, v in renamed.items()})
        stored += tensors.values()
    return stored, native


def write(model: LatentDiffusion, folder: Path, half: bool, overwrite: bool = True) -> None:
    """Write ``model`` as a diffusers folder, whole (:func:`atomic_folder`; with ``overwrite`` an existing ``folder``
    is replaced only if it is empty or a diffusers folder, with ``model_index.json``; without, it must not exist)."""
    cfg, sd = model.config, model.state_dict()
    pixels = cfg.unet.sample_size * cfg.vae.downscale_factor
    with atomic_folder(folder, "model_index.json", overwrite) as temp:
        for component, part in _parts(cfg):
            native = {k[len(component.prefix):]: v for k, v in sd.items() if k.startswith(component.prefix)}
            extra = {"sample_size": pixels} if component is AUTOENCODER else None
            write_component(temp / component.name, component, part, native, half, extra)
            tail = {k: native[k] for k in component.table(part).native_extra if k in native}
            if tail:
                _save(tail, temp / component.name / TEXT_EXTRA_FILE, half)
        for name, content in tokenizer_files(cfg.pad_token_id, cfg.text.max_positions, cfg.text.vocab_size).items():
            (temp / "tokenizer").mkdir(exist_ok=True)
            (temp / "tokenizer" / name).write_text(content, encoding="utf-8")
        _write_json(temp / "scheduler" / "scheduler_config.json",
                    {"_class_name": "DDIMScheduler", **cfg.schedule.to_diffusers_config()})
        _write_json(temp / "model_index.json", _model_index(cfg))


def _model_index(cfg: ModelConfig) -> dict:
    return {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_LAYOUT_VERSION,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        NIJIMI_CONFIG_KEY: cfg.to_dict(),
    }


def clip_vocabulary() -> tuple[list[str], list[str]]:
    """(tokens in id order, merge lines) of the CLIP BPE shipped in ``nijimi/data`` (see ``nijimi.text.tokenizer``):
    256 byte symbols, the same with ``</w>``, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``."""
    with importlib.resources.files("nijimi").joinpath("data", VOCAB_FILE).open("rb") as raw:
        lines = gzip.decompress(raw.read()).decode("utf-8").split("\n")
    symbols = [symbol for _, symbol in byte_symbols()]
    merges = lines[1 : _CLIP_VOCAB_SIZE - 2 * len(symbols) - _N_SPECIAL + 1]
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return tokens, merges


def tokenizer_files(pad_token_id: int, max_length: int, vocab_size: int = _CLIP_VOCAB_SIZE) -> dict[str, str]:
    """File name → text of a transformers ``CLIPTokenizer`` folder for nijimi's tokenizer with this padding."""
    if vocab_size != _CLIP_VOCAB_SIZE:
        raise ConfigError(f"cannot write a CLIP tokenizer for vocabulary size {vocab_size} "
                          f"(CLIP has {_CLIP_VOCAB_SIZE})")
    tokens, merges = clip_vocabulary()
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
               "pad_token": tokens[pad_token_id]}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **special}
    return {
        "vocab.json": json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
    }
