"""Module names of adapter files, as rename tables built by rule from the model config and the network tables.

An adapter addresses a *module* (a weight's owner), not a parameter. Native module paths are the single-file key
tree: ``model.diffusion_model.<U-Net path>`` and ``cond_stage_model.transformer.<text-encoder path>``. Foreign names:

- kohya sd-scripts / LyCORIS: ``lora_unet_`` + the *diffusers* U-Net path with dots as underscores
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``), ``lora_te_`` + the transformers
  text-encoder path (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, for SD 2.x too; trainers running
  transformers 5, whose ``CLIPTextModel`` lost the ``text_model`` level, write ``lora_te_encoder_layers_0_…``);
- A1111's CompVis names ``lora_unet_`` + the native path (``lora_unet_input_blocks_1_1_proj_in``) and OpenCLIP names
  ``lora_te_model_transformer_resblocks_0_attn_in_proj`` — the fused q|k|v projection, one row block per native
  q/k/v module (three natives of one name in the table), ``…_mlp_c_fc`` and so on; kohya's OFT ``oft_unet_…``;
- diffusers / peft: ``unet.<diffusers path>`` and ``text_encoder.<transformers path>`` (also without ``text_model.``).

Each table is a :class:`~nijimi.io.keys.table.RenameTable` of ``(native module path, file module name)``: a path's
first name is the one written, the others are read too. The tensor names inside a module are split off by
:func:`kohya_split` / :func:`peft_split`, which also read the older spellings.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from nijimi.io.keys.clip import text_encoder_openclip_table
from nijimi.io.keys.table import RenameTable, native_keys
from nijimi.io.keys.unet import unet_key_table
from nijimi.models.ldm import TEXT_PREFIX, UNET_PREFIX
from nijimi.models.text_encoder import TextEncoder, TextEncoderConfig
from nijimi.models.unet import UNetConfig

KOHYA_UNET, KOHYA_OFT, KOHYA_TEXT, KOHYA_OPENCLIP = "lora_unet_", "oft_unet_", "lora_te_", "lora_te_model_"
PEFT_UNET, PEFT_TEXT = "unet.", "text_encoder."
# kohya tensor names stored with a ".weight" ending (they were nn.Linear/Conv2d weights in the trainer).
_WEIGHT_SUFFIXED = frozenset({"lora_down", "lora_up", "lora_mid", "a1", "a2", "b1", "b2"})
_KOHYA_ALIASES = {"lora_A": "lora_down", "lora_B": "lora_up"}
_PEFT_ENDINGS = {".lora_A.weight": "lora_down", ".lora_B.weight": "lora_up", ".lora_magnitude_vector": "dora_scale",
                 ".lora_magnitude_vector.weight": "dora_scale", ".lora.down.weight": "lora_down",
                 ".lora.up.weight": "lora_up", ".lora_linear_layer.down.weight": "lora_down",
                 ".lora_linear_layer.up.weight": "lora_up", ".alpha": "alpha"}
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


@dataclass(frozen=True)
class NameTables:
    """The module-name tables of one model: ``kohya`` (kohya sd-scripts / LyCORIS / A1111) and ``peft``."""

    kohya: RenameTable
    peft: RenameTable


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


@functools.lru_cache(maxsize=8)
def name_tables(unet_cfg: UNetConfig, text_cfg: TextEncoderConfig) -> NameTables:
    """Every foreign module name of a model with these parts (see the module docstring)."""
    kohya, peft = [], []
    for native, diffusers in unet_modules(unet_cfg).items():
        path, underscored = UNET_PREFIX + native, diffusers.replace(".", "_")
        kohya += [(path, KOHYA_UNET + underscored), (path, KOHYA_UNET + native.replace(".", "_")),
                  (path, KOHYA_OFT + underscored)]
        peft.append((path, PEFT_UNET + diffusers))
    for native in text_modules(text_cfg):
        path, short = TEXT_PREFIX + native, native.removeprefix("text_model.")
        kohya += [(path, KOHYA_TEXT + native.replace(".", "_")), (path, KOHYA_TEXT + short.replace(".", "_"))]
        peft += [(path, PEFT_TEXT + native), (path, PEFT_TEXT + short)]
    for foreign, natives in text_encoder_openclip_table(text_cfg).natives_of.items():
        module = _module(foreign)  # the fused q|k|v projection has one name for three native modules
        if module is not None and natives[0].endswith(".weight"):
            name = KOHYA_OPENCLIP + module.replace(".", "_")
            kohya += [(TEXT_PREFIX + n.removesuffix(".weight"), name) for n in natives]
    return NameTables(RenameTable("adapter", "kohya", tuple(dict.fromkeys(kohya))),
                      RenameTable("adapter", "peft", tuple(dict.fromkeys(peft))))


def kohya_split(key: str) -> tuple[str, str]:
    """``lora_unet_x.lora_down.weight`` → (``lora_unet_x``, ``lora_down``); peft's ``lora_A``/``lora_B`` read as
    ``lora_down``/``lora_up``."""
    module, _, tensor = key.partition(".")
    tensor = tensor.removesuffix(".weight")
    return module, _KOHYA_ALIASES.get(tensor, tensor)


def kohya_key(module: str, tensor: str) -> str:
    """The kohya file key of one tensor of a module (inverse of :func:`kohya_split`)."""
    return f"{module}.{tensor}.weight" if tensor in _WEIGHT_SUFFIXED else f"{module}.{tensor}"


def peft_split(key: str) -> tuple[str, str]:
    """``unet.x.lora_A.weight`` → (``unet.x``, ``lora_down``), older diffusers names included."""
    key = key.removeprefix("base_model.model.")
    match = _OLD_PROCESSOR.search(key)
    if match:
        module = key[: match.start()] + "." + ("to_out.0" if match[1] == "to_out" else match[1])
        return module, "lora_" + match[2]
    for ending, name in _PEFT_ENDINGS.items():
        if key.endswith(ending):
            return key[: -len(ending)], name
    module, _, tensor = key.rpartition(".")
    return module, tensor


def peft_natives(module: str, tables: NameTables) -> tuple[str, ...] | None:
    """The native path (a 1-tuple) of a diffusers/peft module name (a bare name is looked up under ``unet.`` and
    ``text_encoder.``), None when the model has no such module."""
    natives = tables.peft.natives_of
    return next((natives[m] for m in (module, PEFT_UNET + module, PEFT_TEXT + module) if m in natives), None)


def part_of(path: str) -> str | None:
    """``"unet"`` or ``"text"`` for a native module path under the U-Net or the text encoder, else None."""
    if path.startswith(UNET_PREFIX):
        return "unet"
    if path.startswith(TEXT_PREFIX):
        return "text"
    return None
