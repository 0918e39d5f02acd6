"""diffusers ``StableDiffusionPipeline`` folders: read their config and weights, write them.

A folder holds ``model_index.json`` and one sub-folder per component::

    unet/          config.json, diffusion_pytorch_model.safetensors   (diffusers UNet2DConditionModel)
    vae/           config.json, diffusion_pytorch_model.safetensors   (diffusers AutoencoderKL)
    text_encoder/  config.json, model.safetensors                      (transformers CLIPTextModel)
    tokenizer/     vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/     scheduler_config.json

Weights may also be ``*.fp16.safetensors`` variants, sharded (``*.safetensors.index.json``) or ``.bin`` (read only
by the weights-only unpickler). Renames come from ``nijimi.io.keys``.

Folders nijimi writes carry two additions the diffusers and transformers loaders ignore: the :class:`ModelConfig`
as ``"_nijimi_config"`` in ``model_index.json``, and ``text_encoder/nijimi_text_extra.safetensors`` with the text
encoder's tensors a ``CLIPTextModel`` has no place for (SD 2.x's last OpenCLIP layer, which SD skips, and its
projection), so single file → folder → single file is lossless.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import json
import os
import shutil
from pathlib import Path

import torch

from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.errors import CheckpointError, ConfigError
from nijimi.io import files, keys, safetensors
from nijimi.io.detect import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from nijimi.models.ldm import SD1_PAD_TOKEN_ID, SD2_PAD_TOKEN_ID, LatentDiffusion, ModelConfig
from nijimi.text.tokenizer import BOS_TOKEN, EOS_TOKEN, VOCAB_FILE, byte_symbols

NIJIMI_CONFIG_KEY = "_nijimi_config"
DIFFUSERS_LAYOUT_VERSION = "0.30.0"
"""The diffusers release whose folder layout ``model_index.json`` says it follows (its pipelines require the key)."""
TEXT_EXTRA_FILE = "nijimi_text_extra.safetensors"
_WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_CLIP_VOCAB_SIZE = 49408
_N_SPECIAL = 2
_FORMAT_METADATA = {"format": "pt"}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (needed in a diffusers folder)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ---- reading ------------------------------------------------------------------------------------------------------

def read_config(folder: Path) -> tuple[ModelConfig, str]:
    """The folder's :class:`ModelConfig` and where it came from (``"metadata"``: nijimi's own entry in
    ``model_index.json``; ``"diffusers"``: the components' config files). The schedule always comes from
    ``scheduler/scheduler_config.json`` (SD's own when the folder has none)."""
    index = _read_json(folder / "model_index.json")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    try:
        schedule = NoiseSchedule.from_diffusers_config(_read_json(scheduler)) if scheduler.exists() else None
        if NIJIMI_CONFIG_KEY in index:
            config = ModelConfig.from_dict(index[NIJIMI_CONFIG_KEY])
            return dataclasses.replace(config, schedule=schedule or config.schedule), "metadata"
        unet = keys.unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
        vae = keys.vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"))
        text = keys.text_encoder_config_from_transformers(_read_json(folder / "text_encoder" / "config.json"))
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
    if pad not in ids:
        raise CheckpointError(f"{special}: pad token {pad!r} is not in {vocab.name}")
    return ids[pad]


def _weights_file(component: Path) -> Path:
    """The weights of a component folder: full precision first, then the fp16 variant; safetensors before .bin."""
    name = _WEIGHT_NAMES[component.name]
    for suffix in (".safetensors", ".fp16.safetensors", ".safetensors.index.json", ".fp16.safetensors.index.json",
                   ".bin", ".fp16.bin", ".bin.index.json", ".fp16.bin.index.json"):
        candidate = component / (name + suffix)
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{component}: no weights file ({name}.safetensors, {name}.fp16.safetensors or {name}.bin)")


def _component_weights(component: Path) -> dict[str, torch.Tensor]:
    """All tensors of a component folder, joining shards listed by an ``*.index.json``."""
    path = _weights_file(component)
    if not path.name.endswith(".index.json"):
        return files.load_state_dict(path)[0]
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: no weight_map")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(files.load_state_dict(component / shard)[0])
    return out


def read_weights(folder: Path, config: ModelConfig) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """(every stored tensor, the native :class:`LatentDiffusion` state dict) of a diffusers folder."""
    parts = {name: _component_weights(folder / name) for name in _WEIGHT_NAMES}
    extra = folder / "text_encoder" / TEXT_EXTRA_FILE
    tail = files.load_state_dict(extra)[0] if extra.is_file() else {}
    renames = ((UNET_PREFIX, "unet", keys.unet_from_diffusers, config.unet),
               (VAE_PREFIX, "vae", keys.vae_from_diffusers, config.vae),
               (CLIP_PREFIX, "text_encoder", keys.text_encoder_from_transformers, config.text))
    native = {}
    for prefix, name, rename, cfg in renames:
        try:
            native.update({prefix + k: v for k, v in rename(parts[name], cfg).items()})
        except CheckpointError as e:
            raise CheckpointError(f"{folder / name}: {e}") from None
    native.update({CLIP_PREFIX + k: v for k, v in tail.items()})
    stored = [t for part in parts.values() for t in part.values()] + list(tail.values())
    return stored, native


# ---- writing ------------------------------------------------------------------------------------------------------

def write(model: LatentDiffusion, folder: Path, half: bool) -> None:
    """Write ``model`` as a diffusers folder: built in a hidden temp sibling, then renamed over ``folder``.

    An existing ``folder`` is replaced only if it is empty or a diffusers folder (has ``model_index.json``).
    """
    if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or
                                                     (folder / "model_index.json").is_file())):
        raise CheckpointError(f"{folder}: exists and is not an empty or diffusers folder; refusing to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = folder.with_name(f".{folder.name}.{os.urandom(4).hex()}.tmp")
    temp.mkdir()
    try:
        _write_contents(model, temp, half)
        _move_into_place(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
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


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save(tensors: dict[str, torch.Tensor], path: Path, half: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.save_file({k: v.half() if half and v.is_floating_point() else v for k, v in tensors.items()},
                          path, _FORMAT_METADATA)


def _write_contents(model: LatentDiffusion, folder: Path, half: bool) -> None:
    cfg = model.config
    sd = model.state_dict()
    part = {prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            for prefix in (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)}
    _save(keys.unet_to_diffusers(part[UNET_PREFIX], cfg.unet), folder / "unet" / "diffusion_pytorch_model.safetensors",
          half)
    _write_json(folder / "unet" / "config.json", keys.unet_config_to_diffusers(cfg.unet))
    _save(keys.vae_to_diffusers(part[VAE_PREFIX], cfg.vae), folder / "vae" / "diffusion_pytorch_model.safetensors",
          half)
    pixels = cfg.unet.sample_size * cfg.vae.downscale_factor
    _write_json(folder / "vae" / "config.json", keys.vae_config_to_diffusers(cfg.vae, sample_size=pixels))
    text = part[CLIP_PREFIX]
    _save(keys.text_encoder_to_transformers(text, cfg.text), folder / "text_encoder" / "model.safetensors", half)
    used = {native for native, _ in keys.text_encoder_transformers_table(cfg.text)}
    tail = {k: v for k, v in text.items() if k not in used}
    if tail:
        _save(tail, folder / "text_encoder" / TEXT_EXTRA_FILE, half)
    _write_json(folder / "text_encoder" / "config.json", keys.text_encoder_config_to_transformers(cfg.text))
    for name, content in tokenizer_files(cfg.pad_token_id, cfg.text.max_positions, cfg.text.vocab_size).items():
        (folder / "tokenizer").mkdir(exist_ok=True)
        (folder / "tokenizer" / name).write_text(content, encoding="utf-8")
    _write_json(folder / "scheduler" / "scheduler_config.json",
                {"_class_name": "DDIMScheduler", **cfg.schedule.to_diffusers_config()})
    _write_json(folder / "model_index.json", _model_index(cfg))


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
