"""CLIP text encoder: parity with transformers' CLIPTextModel, full-size layouts, OpenCLIP/transformers round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from helpers import randomize, rel_err
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from nijimi.errors import CheckpointError, ConfigError, PromptError
from nijimi.io.keys.clip import (
    text_encoder_config_from_transformers,
    text_encoder_config_to_transformers,
    text_encoder_openclip_table,
    text_encoder_transformers_table,
)
from nijimi.models.text_encoder import TextEncoder, TextEncoderConfig

# Small configs of the real architectures: SD 1.x CLIP-L (quick-GELU, last layer) and SD 2.x OpenCLIP-H (GELU,
# penultimate layer, projection kept). A small vocabulary keeps them light; the end-of-text id is its last entry.
VOCAB = 1000
EOT = VOCAB - 1
CLIP_L_SMALL = TextEncoderConfig(vocab_size=VOCAB, width=64, num_layers=3, num_heads=4, mlp_width=128)
OPENCLIP_H_SMALL = dataclasses.replace(CLIP_L_SMALL, activation="gelu", num_layers=4, clip_skip=2, projection_dim=48)
TOLERANCE = 1e-4  # max |nijimi − transformers| / max |transformers|, fp32
CLIP_L_PARAMETERS = 123_060_480
OPENCLIP_H_TEXT_PARAMETERS = 354_032_641  # 24 layers, text_projection 1024×1024 and logit_scale


def token_ids(batch: int = 2, length: int = 77, seed: int = 1) -> torch.Tensor:
    """Rows of random ids ending in EOT then EOT padding (SD 1.x style), at different lengths."""
    ids = torch.randint(0, EOT, (batch, length), generator=torch.Generator().manual_seed(seed))
    for row, n in enumerate(range(5, 5 + 9 * batch, 9)):
        ids[row, n:] = EOT
    return ids


def transformers_folder(ours: TextEncoder, tmp_path) -> CLIPTextModel:
    """Write ``ours`` as a transformers/diffusers ``text_encoder`` folder with nijimi's converters and load it."""
    cfg = ours.config
    save_file(text_encoder_transformers_table(cfg).to_foreign(ours.state_dict()), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(text_encoder_config_to_transformers(cfg)))
    return CLIPTextModel.from_pretrained(tmp_path).eval()


def make_pair(cfg: TextEncoderConfig, tmp_path, seed: int = 0) -> tuple[TextEncoder, CLIPTextModel]:
    ours = TextEncoder(cfg).eval()
    randomize(ours, seed, embedding_std=0.5)
    return ours, transformers_folder(ours, tmp_path)


# ---- parity ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_clip_l_matches_transformers_at_last_and_penultimate_layer(tmp_path):
    ours, theirs = make_pair(CLIP_L_SMALL, tmp_path)
    ids = token_ids()
    ref = theirs(ids, output_hidden_states=True)
    assert rel_err(ours(ids), ref.last_hidden_state) < TOLERANCE
    penultimate = theirs.final_layer_norm(ref.hidden_states[-2])
    assert rel_err(ours(ids, clip_skip=2), penultimate) < TOLERANCE
    assert rel_err(ours.encode(ids).pooled, ref.pooler_output) < TOLERANCE
    assert ours(ids).shape == (2, 77, 64)


@torch.no_grad()
def test_openclip_h_matches_diffusers_sd2_text_encoder(tmp_path):
    """SD 2.x: the native encoder at its default (penultimate) layer equals the transformers model diffusers builds
    from the first num_layers-1 layers, at its last layer; GELU activation."""
    ours, theirs = make_pair(OPENCLIP_H_SMALL, tmp_path)
    assert theirs.config.num_hidden_layers == 3 and theirs.config.hidden_act == "gelu"
    ids = token_ids()
    ref = theirs(ids, output_hidden_states=True)
    assert rel_err(ours(ids), ref.last_hidden_state) < TOLERANCE
    assert rel_err(ours(ids, clip_skip=3), theirs.final_layer_norm(ref.hidden_states[-2])) < TOLERANCE
    hidden, _ = ours.encode(ids)
    assert torch.equal(hidden, ours(ids))


@torch.no_grad()
def test_encode_agrees_with_forward_and_pools_at_eot():
    ours = TextEncoder(CLIP_L_SMALL).eval()
    randomize(ours, 3, embedding_std=0.5)
    ids = token_ids(length=20)
    for skip in (1, 2, 3):
        hidden, pooled = ours.encode(ids, clip_skip=skip)
        assert torch.equal(hidden, ours(ids, clip_skip=skip))
        assert torch.equal(pooled, ours(ids)[[0, 1], [5, 14]])


def test_bad_inputs_are_named():
    ours = TextEncoder(CLIP_L_SMALL)
    with pytest.raises(ConfigError, match=r"clip_skip must be in \[1, 3\], got 4"):
        ours(token_ids(), clip_skip=4)
    with pytest.raises(PromptError, match="78 tokens exceed"):
        ours(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ConfigError, match="num_heads"):
        TextEncoderConfig(width=100, num_heads=3)
    with pytest.raises(ConfigError, match="'relu'"):
        TextEncoderConfig(activation="relu")


# ---- full-size layouts ---------------------------------------------------------------------------------------------


def test_clip_l_has_the_reference_parameters_and_keys():
    cfg = TextEncoderConfig.clip_l()
    reference = CLIPTextConfig(**text_encoder_config_to_transformers(cfg))
    with torch.device("meta"):
        ours, theirs = TextEncoder(cfg), CLIPTextModel(reference)
    assert sum(p.numel() for p in ours.parameters()) == CLIP_L_PARAMETERS
    assert sum(p.numel() for p in theirs.parameters()) == CLIP_L_PARAMETERS
    converted = text_encoder_transformers_table(cfg).to_foreign(ours.state_dict())
    expected = {f"text_model.{k}": tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert (reference.hidden_size, reference.num_hidden_layers, reference.num_attention_heads) == (768, 12, 12)


def openclip_reference_layout(layers: int, width: int, mlp: int, vocab: int, positions: int, proj: int) -> dict:
    """The OpenCLIP text tower's parameters as stored in an SD 2.x single file after ``cond_stage_model.model.``."""
    layout = {"token_embedding.weight": (vocab, width), "positional_embedding": (positions, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, proj),
              "logit_scale": ()}
    for i in range(layers):
        block = f"transformer.resblocks.{i}"
        layout.update({f"{block}.ln_1.weight": (width,), f"{block}.ln_1.bias": (width,),
                       f"{block}.attn.in_proj_weight": (3 * width, width), f"{block}.attn.in_proj_bias": (3 * width,),
                       f"{block}.attn.out_proj.weight": (width, width), f"{block}.attn.out_proj.bias": (width,),
                       f"{block}.ln_2.weight": (width,), f"{block}.ln_2.bias": (width,),
                       f"{block}.mlp.c_fc.weight": (mlp, width), f"{block}.mlp.c_fc.bias": (mlp,),
                       f"{block}.mlp.c_proj.weight": (width, mlp), f"{block}.mlp.c_proj.bias": (width,)})
    return layout


def test_openclip_h_has_the_reference_layout_and_diffusers_sd2_keys():
    cfg = TextEncoderConfig.openclip_h()
    with torch.device("meta"):
        ours = TextEncoder(cfg)
    assert sum(p.numel() for p in ours.parameters()) == OPENCLIP_H_TEXT_PARAMETERS
    openclip = text_encoder_openclip_table(cfg).to_foreign(ours.state_dict())
    assert {k: tuple(v.shape) for k, v in openclip.items()} == openclip_reference_layout(24, 1024, 4096, 49408, 77,
                                                                                         1024)
    diffusers_cfg = CLIPTextConfig(**text_encoder_config_to_transformers(cfg))
    assert (diffusers_cfg.num_hidden_layers, diffusers_cfg.hidden_act, diffusers_cfg.hidden_size) == (23, "gelu", 1024)
    with torch.device("meta"):
        theirs = CLIPTextModel(diffusers_cfg)
    converted = text_encoder_transformers_table(cfg).to_foreign(ours.state_dict())
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        f"text_model.{k}": tuple(v.shape) for k, v in theirs.state_dict().items()
    }


def test_openclip_conversion_agrees_with_diffusers_single_file_converter():
    """diffusers' SD 2.x converter (which drops resblocks.23 and the projection) on our OpenCLIP output gives exactly
    our transformers output: the fused in_proj split and the layer drop agree."""
    cfg = TextEncoderConfig(vocab_size=VOCAB, width=16, num_layers=24, num_heads=2, mlp_width=32, activation="gelu",
                            clip_skip=2, projection_dim=16)
    ours = TextEncoder(cfg)
    randomize(ours, 4, embedding_std=0.5)
    openclip = text_encoder_openclip_table(cfg).to_foreign(ours.state_dict())
    single_file = {f"cond_stage_model.model.{k}": v for k, v in openclip.items()}
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**text_encoder_config_to_transformers(cfg)))
    reference = convert_open_clip_checkpoint(model, single_file)
    converted = text_encoder_transformers_table(cfg).to_foreign(ours.state_dict())
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


# ---- round trips -------------------------------------------------------------------------------------------------


def test_openclip_round_trips_are_exact():
    ours = TextEncoder(OPENCLIP_H_SMALL)
    randomize(ours, 5, embedding_std=0.5)
    native = ours.state_dict()
    openclip = text_encoder_openclip_table(OPENCLIP_H_SMALL).to_foreign(native)
    assert openclip["text_projection"].shape == (64, 48) and openclip["logit_scale"].shape == ()
    assert torch.equal(openclip["text_projection"], native["text_projection.weight"].t())
    back = text_encoder_openclip_table(OPENCLIP_H_SMALL).to_native(openclip)
    assert list(back) and back.keys() == native.keys() and all(torch.equal(back[k], native[k]) for k in native)
    again = text_encoder_openclip_table(OPENCLIP_H_SMALL).to_foreign(back)
    assert again.keys() == openclip.keys() and all(torch.equal(again[k], openclip[k]) for k in openclip)
    q = back["text_model.encoder.layers.1.self_attn.q_proj.weight"]
    assert q.untyped_storage().data_ptr() != openclip["transformer.resblocks.1.attn.in_proj_weight"].data_ptr()
    ours.load_state_dict(back, strict=True)


def test_transformers_round_trip_is_exact_with_or_without_text_model_level():
    ours = TextEncoder(CLIP_L_SMALL)
    randomize(ours, 6, embedding_std=0.5)
    native = ours.state_dict()
    foreign = text_encoder_transformers_table(CLIP_L_SMALL).to_foreign(native)
    assert all(k.startswith("text_model.") for k in foreign)
    flat = {k.removeprefix("text_model."): v for k, v in foreign.items()}  # what transformers >= 5 saves
    legacy = {**foreign, "text_model.embeddings.position_ids": torch.arange(77)[None]}  # old files carry it
    for stored in (foreign, flat, legacy):
        back = text_encoder_transformers_table(CLIP_L_SMALL).to_native(stored)
        assert back.keys() == native.keys() and all(torch.equal(back[k], native[k]) for k in native)


def test_sd2_folder_loads_into_an_equivalent_native_encoder(tmp_path):
    """A diffusers SD 2.x text_encoder folder (23 layers) → native config and weights → same context as the
    24-layer single-file encoder at its penultimate layer."""
    ours, _ = make_pair(OPENCLIP_H_SMALL, tmp_path)
    cfg = text_encoder_config_from_transformers(json.loads((tmp_path / "config.json").read_text()))
    assert (cfg.num_layers, cfg.clip_skip, cfg.projection_dim, cfg.activation) == (3, 1, None, "gelu")
    folder = TextEncoder(cfg).eval()
    folder.load_state_dict(text_encoder_transformers_table(cfg).to_native(CLIPTextModel.from_pretrained(tmp_path).state_dict()))
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(folder(ids), ours.eval()(ids))


def test_conversion_reports_missing_and_unexpected_keys():
    native = TextEncoder(CLIP_L_SMALL).state_dict()
    native.pop("text_model.final_layer_norm.bias")
    with pytest.raises(CheckpointError, match=r"text_model\.final_layer_norm\.bias"):
        text_encoder_openclip_table(CLIP_L_SMALL).to_foreign(native)
    openclip = text_encoder_openclip_table(CLIP_L_SMALL).to_foreign(TextEncoder(CLIP_L_SMALL).state_dict())
    with pytest.raises(CheckpointError, match=r"unexpected \['attn_mask'\]"):
        text_encoder_openclip_table(CLIP_L_SMALL).to_native({**openclip, "attn_mask": torch.zeros(77, 77)})


def test_configs_round_trip():
    for cfg in (TextEncoderConfig.clip_l(), TextEncoderConfig.openclip_h(), TextEncoderConfig.tiny(), CLIP_L_SMALL):
        assert TextEncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    clip_l = TextEncoderConfig.clip_l()
    assert text_encoder_config_from_transformers(text_encoder_config_to_transformers(clip_l)) == clip_l
    assert text_encoder_config_from_transformers(CLIPTextConfig(**text_encoder_config_to_transformers(clip_l))
                                                 .to_dict()) == clip_l
    with pytest.raises(ConfigError, match="hidden_act='gelu_new'"):
        text_encoder_config_from_transformers({"hidden_act": "gelu_new"})
    with pytest.raises(ConfigError, match="unknown TextEncoderConfig key"):
        TextEncoderConfig.from_dict({"depth": 3})
