"""Module names of adapter files, as rename tables built by rule from the model config and the network tables.

An adapter addresses a *module* (a weight's owner), not a parameter. Native module paths are the single-file key
tree: ``model.diffusion_model.<U-Net path>`` and ``cond_stage_model.transformer.<text-encoder path>``. Foreign names:

- kohya sd-scripts / LyCORIS: ``lora_unet_`` + the *diffusers* U-Net path with dots as underscores
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``), ``lora_te_`` + the transformers
  text-encoder path (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, for SD 2.x too; trainers running
  transformers 5, whose ``CLIPTextModel`` lost the ``text_model`` level, write ``lora_te_encoder_layers_0_…``);
- A1111's CompVis names ``lora_unet_`` + the native path (``lora_unet_input_blocks_1_1_proj_in``) and OpenCLIP names
  ``lora_te_model_transformer_resblocks_0_attn_in_proj`` — the fused q|k|v projection, one row block per native
  q/k/v module (a :class:`Slot` with ``parts = 3``), ``…_mlp_c_fc`` and so on;
- diffusers / peft: ``unet.<diffusers path>`` and ``text_encoder.<transformers path>``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from nijimi.io.keys.clip import text_encoder_openclip_table
from nijimi.io.keys.table import native_keys
from nijimi.io.keys.unet import unet_key_table
from nijimi.models.ldm import TEXT_PREFIX, UNET_PREFIX
from nijimi.models.text_encoder import TextEncoder, TextEncoderConfig
from nijimi.models.unet import UNetConfig

KOHYA_UNET, KOHYA_TEXT, KOHYA_OPENCLIP = "lora_unet_", "lora_te_", "lora_te_model_"
PEFT_UNET, PEFT_TEXT = "unet.", "text_encoder."


@dataclass(frozen=True)
class Slot:
    """Where a file's module lands: a native module ``path`` and, for a fused projection, which of ``parts`` equal
    row blocks of the fused weight belongs to it (``part`` 0, 1, 2 = q, k, v)."""

    path: str
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class NameTables:
    """Foreign module name → native slots, and native path → preferred foreign name, for kohya and peft files."""

    kohya: dict[str, tuple[Slot, ...]]
    peft: dict[str, str]
    kohya_of: dict[str, str]
    peft_of: dict[str, str]


def _module(key: str) -> str | None:
    """The module owning a weight key (``a.b.weight`` → ``a.b``; OpenCLIP ``attn.in_proj_weight`` → ``attn.in_proj``),
    None for parameters that are no module's weight (embeddings tables, biases, scalars)."""
    for ending in (".weight", "_weight"):
        if key.endswith(ending):
            return key[: -len(ending)]
    return None


def unet_modules(cfg: UNetConfig) -> dict[str, str]:
    """Native U-Net module path (no prefix) → diffusers module path, for every module with a weight."""
    pairs = ((_module(native), _module(foreign)) for native, foreign in unet_key_table(cfg))
    return {native: foreign for native, foreign in pairs if native is not None}


def text_modules(cfg: TextEncoderConfig) -> list[str]:
    """Native text-encoder module paths (no prefix) that own a weight, in model order."""
    return [key.removesuffix(".weight") for key in native_keys(TextEncoder, cfg) if key.endswith(".weight")]


def openclip_modules(cfg: TextEncoderConfig) -> dict[str, list[str]]:
    """OpenCLIP module path → the native module paths it holds (three for a fused ``attn.in_proj``: q, k, v)."""
    out: dict[str, list[str]] = {}
    for native, foreign in text_encoder_openclip_table(cfg):
        module, native_module = _module(foreign), _module(native)
        if module is not None and native_module is not None and native.endswith(".weight"):
            out.setdefault(module, []).append(native_module)
    return out


@functools.lru_cache(maxsize=8)
def name_tables(unet_cfg: UNetConfig, text_cfg: TextEncoderConfig) -> NameTables:
    """Every foreign module name of a model with these parts, both directions (see the module docstring)."""
    kohya: dict[str, tuple[Slot, ...]] = {}
    peft: dict[str, str] = {}
    kohya_of: dict[str, str] = {}
    peft_of: dict[str, str] = {}
    for native, diffusers in unet_modules(unet_cfg).items():
        path = UNET_PREFIX + native
        kohya_of[path] = KOHYA_UNET + diffusers.replace(".", "_")
        kohya[kohya_of[path]] = (Slot(path),)
        kohya[KOHYA_UNET + native.replace(".", "_")] = (Slot(path),)
        peft_of[path] = PEFT_UNET + diffusers
        peft[peft_of[path]] = path
    for native in text_modules(text_cfg):
        path = TEXT_PREFIX + native
        kohya_of[path] = KOHYA_TEXT + native.replace(".", "_")
        kohya[kohya_of[path]] = (Slot(path),)
        kohya[KOHYA_TEXT + native.removeprefix("text_model.").replace(".", "_")] = (Slot(path),)
        peft_of[path] = PEFT_TEXT + native
        peft[peft_of[path]] = path
    for module, natives in openclip_modules(text_cfg).items():
        slots = tuple(Slot(TEXT_PREFIX + n, i, len(natives)) for i, n in enumerate(natives))
        kohya[KOHYA_OPENCLIP + module.replace(".", "_")] = slots
    return NameTables(kohya, peft, kohya_of, peft_of)


def part_of(path: str) -> str | None:
    """``"unet"`` or ``"text"`` for a native module path under the U-Net or the text encoder, else None."""
    if path.startswith(UNET_PREFIX):
        return "unet"
    if path.startswith(TEXT_PREFIX):
        return "text"
    return None
