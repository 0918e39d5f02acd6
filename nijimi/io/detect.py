"""What model a single-file checkpoint holds, from its key names and tensor shapes alone (no tensor data read).

A Stable Diffusion single file (CompVis layout) says nothing about its architecture except through its keys:

- text encoder layout: SD 1.x stores OpenAI CLIP as ``cond_stage_model.transformer.*`` (transformers naming, with or
  without the ``text_model.`` level); SD 2.x stores OpenCLIP as ``cond_stage_model.model.*``;
- U-Net: input channels from ``input_blocks.0.0.weight`` (4 plain, 9 inpainting, 8 InstructPix2Pix), the number of
  levels and res blocks from which ``input_blocks`` hold a downsampling ``op``, widths from the res blocks, the text
  context width from ``attn2.to_k`` (768 SD 1.x, 1024 SD 2.x), linear vs 1×1-conv ``proj_in`` (SD 2.x vs 1.x);
- VAE and text-encoder sizes from their embedding, convolution and MLP shapes.

Head counts cannot be read from shapes; they follow the family (SD 1.x: 8 heads, SD 2.x: 64-wide heads; CLIP text
encoders: 64-wide heads). The prediction target is not in the keys either: like AUTOMATIC1111's web UI we run a probe
(:func:`probe_v_prediction`) on SD 2.x U-Nets, and honour a side-car ``<name>.yaml`` (:func:`read_sidecar_yaml`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.errors import CheckpointError, ConfigError
from nijimi.io.files import regular_file
from nijimi.io.keys.clip import OPENCLIP_PREFIX, clip_native_key
from nijimi.models.ldm import SD1_PAD_TOKEN_ID, SD2_PAD_TOKEN_ID, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, ModelConfig
from nijimi.models.text_encoder import TextEncoderConfig
from nijimi.models.unet import UNetConfig, UNetModel
from nijimi.models.vae import VAEConfig

_CLIP_HEAD_WIDTH = 64
_SD1_HEADS = 8
_SD2_HEAD_DIM = 64
# AUTOMATIC1111's v-prediction probe (modules/sd_models_config.py, is_using_v_parameterization_for_sd2).
_PROBE_T = 999
_PROBE_VALUE = 0.5
_PROBE_THRESHOLD = -1.0
_SIDECAR_PARAMETERIZATION = {"eps": "epsilon", "v": "v_prediction"}


def detect_single_file(shapes: Mapping[str, tuple[int, ...]], name: str = "checkpoint") -> ModelConfig:
    """Infer the :class:`ModelConfig` of a single-file checkpoint from ``{key: shape}`` (ε-prediction until a probe
    or side-car says otherwise; the text-encoder layout is :func:`text_layout`).

    ``name`` (the file) appears in errors. Raises :class:`CheckpointError` "unknown architecture" when the keys are
    not those of an SD-style latent diffusion model or the shapes fit no configuration.
    """
    layout = text_layout(shapes)
    if layout is None:
        found = sorted({k.split(".", 1)[0] for k in shapes})[:8]
        raise CheckpointError(f"{name}: unknown architecture: no text encoder under {TEXT_PREFIX!r} or "
                              f"{OPENCLIP_PREFIX!r} (top-level key groups: {found})")
    sd2 = layout == "openclip"
    try:
        unet = infer_unet_config(shapes, sd2)
        vae = infer_vae_config(shapes)
        text = infer_openclip_config(shapes) if sd2 else infer_clip_config(shapes)
        return ModelConfig(unet, vae, text, "sd2" if sd2 else "sd1", SD2_PAD_TOKEN_ID if sd2 else SD1_PAD_TOKEN_ID,
                           NoiseSchedule.sd())
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{name}: unknown architecture: {e}") from None


def text_layout(keys: Mapping[str, object]) -> str | None:
    """``"openclip"`` (SD 2.x: ``cond_stage_model.model.*``), ``"clip"`` (SD 1.x: ``cond_stage_model.transformer.*``)
    or None, from which text-encoder prefix the keys use."""
    if any(k.startswith(OPENCLIP_PREFIX + "transformer.") for k in keys):
        return "openclip"
    if any(k.startswith(TEXT_PREFIX) for k in keys):
        return "clip"
    return None


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise KeyError(f"missing key {key!r}")
    return tuple(shapes[key])


def _indices(shapes: Mapping[str, object], prefix: str) -> list[int]:
    """Sorted distinct integers ``i`` of the keys ``<prefix><i>.…``."""
    found = {k[len(prefix):].split(".", 1)[0] for k in shapes if k.startswith(prefix)}
    return sorted(int(i) for i in found if i.isdigit())


def infer_unet_config(shapes: Mapping[str, tuple[int, ...]], sd2: bool) -> UNetConfig:
    """:class:`UNetConfig` from the ``model.diffusion_model.*`` shapes; heads follow the family (``sd2``).

    Raises ``KeyError``/``ConfigError`` when a needed key is missing or the shapes are inconsistent.
    """
    p = UNET_PREFIX
    model_channels, in_channels = _shape(shapes, p + "input_blocks.0.0.weight")[:2]
    blocks = _indices(shapes, p + "input_blocks.")
    downs = [i for i in blocks if p + f"input_blocks.{i}.0.op.weight" in shapes]
    n = downs[0] - 1 if downs else len(blocks) - 1
    levels = len(downs) + 1
    if n < 1 or blocks != list(range(levels * (n + 1))):
        raise ConfigError(f"U-Net input_blocks {blocks} with downsampling at {downs} are not an SD layout")
    first = [f"{p}input_blocks.{1 + level * (n + 1)}." for level in range(levels)]
    widths = [_shape(shapes, f + "0.out_layers.3.weight")[0] for f in first]
    if any(w % model_channels for w in widths):
        raise ConfigError(f"U-Net level widths {widths} are not multiples of {model_channels}")
    mid = p + "middle_block.1."
    heads = {"num_heads": None, "head_dim": _SD2_HEAD_DIM} if sd2 else {"num_heads": _SD1_HEADS}
    return UNetConfig(
        in_channels=in_channels, out_channels=_shape(shapes, p + "out.2.weight")[0], model_channels=model_channels,
        channel_mult=tuple(w // model_channels for w in widths), num_res_blocks=n,
        attention_levels=tuple(lv for lv, f in enumerate(first) if f + "1.proj_in.weight" in shapes), **heads,
        context_dim=_shape(shapes, mid + "transformer_blocks.0.attn2.to_k.weight")[1],
        transformer_depth=len(_indices(shapes, mid + "transformer_blocks.")),
        linear_proj=len(_shape(shapes, mid + "proj_in.weight")) == 2, upcast_attention=sd2,
    )


def infer_vae_config(shapes: Mapping[str, tuple[int, ...]]) -> VAEConfig:
    """:class:`VAEConfig` from the ``first_stage_model.*`` shapes (32 norm groups, SD's scaling factor)."""
    p = VAE_PREFIX
    channels, in_channels = _shape(shapes, p + "encoder.conv_in.weight")[:2]
    levels = _indices(shapes, p + "encoder.down.")
    widths = [_shape(shapes, f"{p}encoder.down.{lv}.block.0.conv1.weight")[0] for lv in levels]
    if not levels or any(w % channels for w in widths):
        raise ConfigError(f"VAE encoder levels {levels} with widths {widths} are not an SD layout")
    return VAEConfig(
        in_channels=in_channels, out_channels=_shape(shapes, p + "decoder.conv_out.weight")[0], channels=channels,
        channel_mult=tuple(w // channels for w in widths),
        num_res_blocks=len(_indices(shapes, p + "encoder.down.0.block.")),
        z_channels=_shape(shapes, p + "decoder.conv_in.weight")[1],
    )


def infer_clip_config(shapes: Mapping[str, tuple[int, ...]]) -> TextEncoderConfig:
    """SD 1.x text encoder (OpenAI CLIP, quick-GELU, used at its last layer) from ``cond_stage_model.transformer.*``."""
    native = {clip_native_key(k[len(TEXT_PREFIX):]): v for k, v in shapes.items() if k.startswith(TEXT_PREFIX)}
    vocab, width = _shape(native, "text_model.embeddings.token_embedding.weight")
    return TextEncoderConfig(
        vocab_size=vocab, width=width,
        max_positions=_shape(native, "text_model.embeddings.position_embedding.weight")[0],
        num_layers=len(_indices(native, "text_model.encoder.layers.")), num_heads=max(1, width // _CLIP_HEAD_WIDTH),
        mlp_width=_shape(native, "text_model.encoder.layers.0.mlp.fc1.weight")[0], activation="quick_gelu",
    )


def infer_openclip_config(shapes: Mapping[str, tuple[int, ...]]) -> TextEncoderConfig:
    """SD 2.x text encoder (OpenCLIP, GELU) from ``cond_stage_model.model.*``.

    A complete OpenCLIP tower (it carries ``text_projection``) is used at its penultimate layer, as SD 2.x does; a
    tower without the projection is one already cut at the layer used (what diffusers' conversions write).
    """
    p = OPENCLIP_PREFIX
    vocab, width = _shape(shapes, p + "token_embedding.weight")
    projection = shapes.get(p + "text_projection")
    layers = len(_indices(shapes, p + "transformer.resblocks."))
    return TextEncoderConfig(
        vocab_size=vocab, width=width, max_positions=_shape(shapes, p + "positional_embedding")[0],
        num_layers=layers, num_heads=max(1, width // _CLIP_HEAD_WIDTH),
        mlp_width=_shape(shapes, p + "transformer.resblocks.0.mlp.c_fc.weight")[0], activation="gelu",
        clip_skip=2 if projection is not None and layers > 1 else 1,
        projection_dim=None if projection is None else tuple(projection)[1],
    )


def probe_value(unet: UNetModel) -> float:
    """AUTOMATIC1111's v-prediction probe statistic ``mean(out − x)`` of a U-Net.

    The web UI runs the U-Net once on ``x = 0.5·1`` (1, C, 8, 8) at ``t = 999`` with the context ``0.5·1``
    (1, 2, context_dim). We do the same, at 8×8 or the smallest size the U-Net's downsampling allows, in the
    weights' dtype.
    """
    cfg = unet.config
    side = max(8, 2 ** (len(cfg.channel_mult) - 1))
    param = next(unet.parameters())
    x = torch.full((1, cfg.in_channels, side, side), _PROBE_VALUE, dtype=param.dtype, device=param.device)
    context = torch.full((1, 2, cfg.context_dim), _PROBE_VALUE, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        out = unet(x, torch.tensor([_PROBE_T], device=param.device), context)
    return (out.float() - x.float()).mean().item()


def probe_v_prediction(unet: UNetModel) -> bool:
    """Whether an SD 2.x-style U-Net was trained for v-prediction (arXiv 2202.00512): no key marks the target, so
    like AUTOMATIC1111's web UI (``is_using_v_parameterization_for_sd2``) we call it v-prediction iff
    :func:`probe_value` is below −1 (the web UI's empirical threshold)."""
    return probe_value(unet) < _PROBE_THRESHOLD


def sidecar_yaml(path: str | Path) -> Path | None:
    """The ``<name>.yaml`` next to checkpoint ``path`` (the web UI's convention), if there is one."""
    candidate = Path(path).with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def read_sidecar_yaml(path: str | Path) -> str | None:
    """Prediction type named by an LDM inference yaml (``model.params.parameterization: "v"`` or ``"eps"``).

    Returns ``"v_prediction"``, ``"epsilon"``, or None when the file does not set it (LDM's default is ε). Only this
    one field is read, with a line pattern, so no YAML library is needed.
    """
    try:
        text = regular_file(path, "model config").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read config {path}: {e}") from None
    match = re.search(r"^\s*parameterization:\s*[\"']?([^\s\"'#]+)[\"']?\s*(#.*)?$", text, re.MULTILINE)
    if match is None:
        return None
    value = match.group(1)
    if value not in _SIDECAR_PARAMETERIZATION:
        raise CheckpointError(f"{path}: parameterization {value!r} is not supported (eps, v)")
    return _SIDECAR_PARAMETERIZATION[value]


def with_v_prediction(config: ModelConfig) -> ModelConfig:
    """``config`` switched to v-prediction; an SD 2.1-size U-Net also gets its 768 px (96 latent) sample size."""
    unet = config.unet
    if dataclasses.replace(unet, sample_size=UNetConfig.sd21_v().sample_size) == UNetConfig.sd21_v():
        unet = UNetConfig.sd21_v()
    return dataclasses.replace(config.with_prediction_type("v_prediction"), unet=unet)
