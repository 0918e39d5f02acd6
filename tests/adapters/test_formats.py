"""Adapter files: exact round trips, real key layouts (kohya, LyCORIS, A1111, diffusers), the full-size SD 1.5 map,
SD 2.x's fused q|k|v projection, unmatched keys, ``ss_*`` metadata, diffusers loading what nijimi writes."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from nijimi.adapters.formats import adapter_from_state_dict, detect_format, read_adapter, save_adapter
from nijimi.adapters.inject import adapted_layers, apply_adapter
from nijimi.adapters.targets import select_targets
from nijimi.adapters.weights import Adapter, ModuleWeights
from nijimi.errors import CheckpointError, ConfigError
from nijimi.io.keys.clip import text_encoder_config_to_transformers, text_encoder_openclip_table
from nijimi.io.keys.unet import unet_config_to_diffusers, unet_key_table
from nijimi.models.ldm import TEXT_PREFIX, UNET_PREFIX, LatentDiffusion, ModelConfig
from nijimi.models.text_encoder import TextEncoder, TextEncoderConfig
from nijimi.models.unet import UNetModel

U = UNET_PREFIX
BLOCK = U + "input_blocks.1.1.transformer_blocks.0."
T = TEXT_PREFIX + "text_model.encoder.layers."
KOHYA_BLOCK = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
# native path, kind, and the key the file must hold for it (kohya / LyCORIS naming).
KOHYA_CASES = [
    (BLOCK + "attn1.to_q", "lora", KOHYA_BLOCK + "attn1_to_q.lora_down.weight"),
    (BLOCK + "attn1.to_k", "dora", KOHYA_BLOCK + "attn1_to_k.dora_scale"),
    (BLOCK + "attn2.to_v", "loha", KOHYA_BLOCK + "attn2_to_v.hada_w2_b"),
    (BLOCK + "ff.net.2", "lokr", KOHYA_BLOCK + "ff_net_2.lokr_w1"),
    (BLOCK + "ff.net.0.proj", "glora", KOHYA_BLOCK + "ff_net_0_proj.a2.weight"),
    (BLOCK + "attn1.to_out.0", "full", KOHYA_BLOCK + "attn1_to_out_0.diff_b"),
    (U + "input_blocks.1.1.proj_in", "ia3", "lora_unet_down_blocks_0_attentions_0_proj_in.on_input"),
    (U + "input_blocks.1.0.out_layers.3", "lora-tucker", "lora_unet_down_blocks_0_resnets_0_conv2.lora_mid.weight"),
    (U + "input_blocks.2.0.op", "oft", "lora_unet_down_blocks_0_downsamplers_0_conv.oft_blocks"),
    (U + "output_blocks.0.0.in_layers.2", "boft", "lora_unet_up_blocks_0_resnets_0_conv1.oft_blocks"),
    (U + "middle_block.1.transformer_blocks.0.attn2.to_q", "oft-diag",
     "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.oft_diag"),
    (BLOCK + "norm1", "norm", KOHYA_BLOCK + "norm1.w_norm"),
    (T + "0.self_attn.q_proj", "lora", "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"),
    (T + "1.mlp.fc1", "loha", "lora_te_text_model_encoder_layers_1_mlp_fc1.hada_w1_a"),
]


@pytest.fixture
def model(small, randomize) -> LatentDiffusion:
    model = LatentDiffusion(small.model).eval()
    randomize(model, 0)
    return model


def assert_same(got: Adapter, want: Adapter) -> None:
    assert got.modules.keys() == want.modules.keys()
    for path, weights in want.modules.items():
        other = got.modules[path]
        assert (other.kind, other.alpha, other.scale) == (weights.kind, weights.alpha, weights.scale), path
        assert other.tensors.keys() == weights.tensors.keys(), path
        assert all(torch.equal(other.tensors[k], v) for k, v in weights.tensors.items()), path


def test_kohya_round_trip_is_exact_for_every_kind(model, small, random_weights, tmp_path) -> None:
    adapter = Adapter({path: random_weights(kind, model.get_submodule(path), i)
                       for i, (path, kind, _) in enumerate(KOHYA_CASES)})
    save_adapter(adapter, tmp_path / "every.safetensors", small.model)
    keys = load_file(tmp_path / "every.safetensors").keys()
    assert {key for *_, key in KOHYA_CASES} <= keys
    assert detect_format(keys) == "kohya"
    loaded = read_adapter(tmp_path / "every.safetensors", small.model, strict=True)
    assert loaded.format == "kohya" and not loaded.unmatched
    assert_same(loaded.adapter, adapter)
    save_adapter(adapter, tmp_path / "half.safetensors", small.model, dtype=torch.float16)
    half = read_adapter(tmp_path / "half.safetensors", small.model).adapter
    assert half.modules[BLOCK + "attn1.to_q"].tensors["lora_up"].dtype == torch.float16
    assert torch.equal(half.modules[BLOCK + "attn1.to_q"].tensors["lora_up"],
                       adapter.modules[BLOCK + "attn1.to_q"].tensors["lora_up"].half())


def peft_adapter(model: LatentDiffusion, random_weights, dora: bool) -> Adapter:
    """LoRA (or DoRA) on the U-Net with mixed ranks and alphas (so peft needs rank/alpha patterns); LoKr on the text
    encoder, one module with whole factors and an explicit scale."""
    modules = {}
    for i, path in enumerate(select_targets(model, "attn+ff", parts=("unet",))):
        weights = random_weights("dora" if dora else "lora", model.get_submodule(path), i)
        if i % 5 == 1:
            t = weights.tensors
            weights = ModuleWeights("lora", {**t, "lora_down": t["lora_down"][:1], "lora_up": t["lora_up"][:, :1]},
                                    alpha=0.75)
        modules[path] = weights
    for i, path in enumerate(select_targets(model, "attn", parts=("text",))):
        weights = random_weights("lokr", model.get_submodule(path), 100 + i)
        if i == 2:
            t = weights.tensors
            weights = ModuleWeights("lokr", {"lokr_w1": t["lokr_w1"], "lokr_w2": t["lokr_w2_a"] @ t["lokr_w2_b"]},
                                    scale=0.25)
        modules[path] = weights
    return Adapter(modules)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_round_trip_is_exact(dora, model, small, random_weights, tmp_path) -> None:
    adapter = peft_adapter(model, random_weights, dora)
    save_adapter(adapter, tmp_path / "lora.safetensors", small.model, format="peft")
    keys = load_file(tmp_path / "lora.safetensors").keys()
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.lora_magnitude_vector" in keys) == dora
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lokr_w1" in keys
    loaded = read_adapter(tmp_path / "lora.safetensors", small.model, strict=True)
    assert loaded.format == "peft"
    assert_same(loaded.adapter, adapter)


@pytest.mark.parametrize("dora", [False, True])
def test_diffusers_loads_what_nijimi_writes(dora, model, small, random_weights, rel_err, unet_inputs,
                                            tmp_path) -> None:
    adapter = Adapter({p: w for p, w in peft_adapter(model, random_weights, dora).modules.items() if p.startswith(U)})
    save_adapter(adapter, tmp_path / "lora.safetensors", small.model, format="peft")
    cfg = small.unet
    theirs = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)).eval()
    theirs.load_state_dict(unet_key_table(cfg).to_foreign(model.unet.state_dict()))
    theirs.load_lora_adapter(str(tmp_path), weight_name="lora.safetensors", prefix="unet")
    x, t, context = unet_inputs(cfg)
    apply_adapter(model, adapter)
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=context).sample
        got = model.unet(x, t, context)
    assert rel_err(got, want) <= 1e-5


def kohya_reference_names(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """kohya sd-scripts' default LoRA targets named as its trainer names them, from diffusers' and transformers' own
    module trees: ``lora_unet_`` + every Linear/1×1 conv inside a ``Transformer2DModel``, ``lora_te_`` + every
    Linear of ``CLIPAttention``/``CLIPMLP`` (transformers 4 named them under ``text_model.``). → (out, in) shape."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config_to_diffusers(config.unet))
        text = CLIPTextModel(CLIPTextConfig(**text_encoder_config_to_transformers(config.text)))
    names = {}
    for prefix, root, containers in (("lora_unet_", unet, ("Transformer2DModel",)),
                                     ("lora_te_text_model_", text, ("CLIPAttention", "CLIPMLP"))):
        for name, module in root.named_modules():
            if type(module).__name__ not in containers:
                continue
            for child_name, child in module.named_modules():
                if isinstance(child, torch.nn.Linear | torch.nn.Conv2d) and child_name:
                    names[prefix + f"{name}.{child_name}".replace(".", "_")] = tuple(child.weight.shape[:2])
    return names


def test_full_size_sd15_kohya_lora_maps_exactly() -> None:
    config = ModelConfig.sd15()
    reference = kohya_reference_names(config)
    assert len(reference) == 192 + 72
    state = {}
    for name, (out, inp) in reference.items():
        conv = "proj_in" in name or "proj_out" in name  # SD 1.x projections are 1×1 convolutions
        state[f"{name}.lora_down.weight"] = torch.zeros((1, inp, 1, 1) if conv else (1, inp))
        state[f"{name}.lora_up.weight"] = torch.zeros((out, 1, 1, 1) if conv else (out, 1))
        state[f"{name}.alpha"] = torch.tensor(1.0)
    loaded = adapter_from_state_dict(state, config, strict=True)
    assert not loaded.unmatched
    with torch.device("meta"):
        meta = LatentDiffusion(config)
    assert sorted(loaded.adapter.modules) == sorted(select_targets(meta, "attn+ff"))
    assert apply_adapter(meta, loaded.adapter) == {}  # every tensor fits its layer
    assert len(list(adapted_layers(meta))) == 264


def test_names_in_the_wild(small) -> None:
    """A1111's CompVis names, kohya keys with peft's lora_A/lora_B, old diffusers attention-processor names,
    transformers-5 text-encoder names without ``text_model.``."""
    down, up = torch.ones(2, 32), torch.ones(32, 2)
    state = {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
             "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
             "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_k.lora_A.weight": down,
             "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_k.lora_B.weight": up}
    kohya = adapter_from_state_dict(state, small.model, strict=True).adapter
    assert sorted(kohya.modules) == [BLOCK + "attn1.to_k", BLOCK + "attn1.to_q"]
    old = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": down,
           "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": up,
           "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": torch.ones(2, 24),
           "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": torch.ones(24, 2)}
    diffusers = adapter_from_state_dict(old, small.model, strict=True).adapter
    assert sorted(diffusers.modules) == [T + "0.self_attn.q_proj", BLOCK + "attn1.to_out.0"]


def test_unmatched_keys_are_reported_and_strict_refuses(model, small, random_weights) -> None:
    q = random_weights("lora", model.get_submodule(BLOCK + "attn1.to_q"))
    state = {f"{KOHYA_BLOCK}attn1_to_q.lora_down.weight": q.tensors["lora_down"],
             f"{KOHYA_BLOCK}attn1_to_q.lora_up.weight": q.tensors["lora_up"],
             f"{KOHYA_BLOCK}attn1_to_q.bias": torch.zeros(32),
             f"{KOHYA_BLOCK}attn1_to_k.lora_down.weight": q.tensors["lora_down"],
             "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(1, 1),
             "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.zeros(1, 1)}
    loaded = adapter_from_state_dict(state, small.model)
    assert list(loaded.adapter.modules) == [BLOCK + "attn1.to_q"]
    assert loaded.unmatched == {
        f"{KOHYA_BLOCK}attn1_to_q.bias": f"unknown tensor 'bias' of {KOHYA_BLOCK}attn1_to_q",
        f"{KOHYA_BLOCK}attn1_to_k.lora_down.weight":
            f"tensors ['lora_down'] of {KOHYA_BLOCK}attn1_to_k make no known adapter kind",
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight":
            "module 'lora_unet_down_blocks_9_attentions_0_proj_in' is not in the model",
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight":
            "module 'lora_unet_down_blocks_9_attentions_0_proj_in' is not in the model"}
    with pytest.raises(CheckpointError, match="4 keys do not fit the model.*attn1_to_q.bias"):
        adapter_from_state_dict(state, small.model, strict=True)
    with pytest.raises(CheckpointError, match="not a LoRA/LyCORIS/peft adapter"):
        detect_format({"model.diffusion_model.out.2.weight": 0, "first_stage_model.encoder.conv_in.weight": 0})


def openclip_pair(randomize) -> tuple[TextEncoder, ModelConfig]:
    text = TextEncoderConfig(vocab_size=1000, width=24, num_layers=2, num_heads=2, mlp_width=48, activation="gelu",
                             clip_skip=2, projection_dim=16)
    unet = ModelConfig.sd21().unet  # SD 2.x's layout (linear projections, 64-wide heads) shrunk: the shape matters
    config = ModelConfig(unet.__class__(**{**unet.to_dict(), "context_dim": 24, "model_channels": 32,
                                           "channel_mult": (1,), "attention_levels": (0,), "num_res_blocks": 1,
                                           "head_dim": 8, "norm_groups": 8}),
                         ModelConfig.sd21().vae, text, "sd2", pad_token_id=0)
    encoder = TextEncoder(text).eval()
    randomize(encoder, 5)
    return encoder, config


def folded(encoder: TextEncoder, updates: dict[int, torch.Tensor]) -> TextEncoder:
    """The encoder with a fused (3w, w) update added to OpenCLIP's ``in_proj_weight`` of each layer, converted back."""
    cfg = encoder.config
    openclip = text_encoder_openclip_table(cfg).to_foreign(encoder.state_dict())
    for layer, update in updates.items():
        key = f"transformer.resblocks.{layer}.attn.in_proj_weight"
        openclip[key] = openclip[key] + update
    out = TextEncoder(cfg).eval()
    out.load_state_dict(text_encoder_openclip_table(cfg).to_native(openclip))
    return out


def test_sd2_qkv_updates_equal_the_fused_in_proj_update(bare, randomize, rel_err, token_ids) -> None:
    encoder, config = openclip_pair(randomize)
    ids = token_ids(config.text)
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 24, generator=gen) * 0.2, torch.randn(72, 2, generator=gen) * 0.2
    # (a) separate q/k/v LoRAs in transformers names (how kohya writes SD 2.x files) vs their deltas stacked.
    split = {f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj.lora_{d}.weight": t
             for i, p in enumerate("qkv") for d, t in (("down", down), ("up", up[24 * i:24 * (i + 1)]))}
    # (b) one LoRA on OpenCLIP's fused projection, split into q/k/v rows on reading.
    fused = {"lora_te_model_transformer_resblocks_1_attn_in_proj.lora_down.weight": down,
             "lora_te_model_transformer_resblocks_1_attn_in_proj.lora_up.weight": up,
             "lora_te_model_transformer_resblocks_1_attn_in_proj.alpha": torch.tensor(1.0)}
    want = folded(encoder, {0: up @ down, 1: 0.5 * up @ down})
    for state in (split, fused):
        adapter = adapter_from_state_dict(state, config, strict=True).adapter
        assert len(adapter.modules) == 3
        apply_adapter(encoder, bare(adapter, TEXT_PREFIX), name=f"a{len(state)}")
    with torch.no_grad():
        assert rel_err(encoder(ids), want(ids)) <= 1e-5
        assert rel_err(encoder(ids, clip_skip=1), want(ids, clip_skip=1)) <= 1e-5


def test_kohya_metadata(model, small, random_weights, tmp_path) -> None:
    plain = Adapter({BLOCK + "attn1.to_q": random_weights("lora", model.get_submodule(BLOCK + "attn1.to_q")),
                     U + "input_blocks.1.0.in_layers.2": random_weights("lora", model.get_submodule(
                         U + "input_blocks.1.0.in_layers.2"))}, {"ss_training_comment": "kept"})
    save_adapter(plain, tmp_path / "ink.safetensors", small.model, metadata={"note": "added"})
    meta = read_adapter(tmp_path / "ink.safetensors", small.model).adapter.metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "2"
    assert meta["ss_network_alpha"] == "1.5" and json.loads(meta["ss_network_args"]) == {"conv_dim": "2",
                                                                                        "conv_alpha": "1.5"}
    assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == "ink" and meta["ss_training_comment"] == "kept" and meta["note"] == "added"
    loha = Adapter({BLOCK + "attn2.to_v": random_weights("loha", model.get_submodule(BLOCK + "attn2.to_v"))})
    v_model = dataclasses.replace(small.model, family="sd2", schedule=ModelConfig.sd21_v().schedule)
    save_adapter(loha, tmp_path / "loha.safetensors", v_model)
    meta = read_adapter(tmp_path / "loha.safetensors", v_model).adapter.metadata
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"]) == {"algo": "loha"}
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"


def test_writers_refuse_what_a_format_cannot_hold(model, small, random_weights, tmp_path) -> None:
    ia3 = Adapter({U + "input_blocks.1.1.proj_in": random_weights("ia3", model.get_submodule(
        U + "input_blocks.1.1.proj_in"))})
    with pytest.raises(CheckpointError, match="ia3 adapter has no peft layout; save as kohya"):
        save_adapter(ia3, tmp_path / "x.safetensors", small.model, format="peft")
    column_dora = random_weights("lora", model.get_submodule(BLOCK + "attn1.to_q"))
    column_dora.tensors["dora_scale"] = torch.ones(1, 32)
    with pytest.raises(CheckpointError, match="per input"):
        save_adapter(Adapter({BLOCK + "attn1.to_q": column_dora}), tmp_path / "x.safetensors", small.model, "peft")
    mixed = peft_adapter(model, random_weights, dora=False)
    mixed.modules[BLOCK + "attn1.to_q"] = random_weights("dora", model.get_submodule(BLOCK + "attn1.to_q"))
    with pytest.raises(CheckpointError, match="only some of these modules have a DoRA magnitude"):
        save_adapter(mixed, tmp_path / "x.safetensors", small.model, "peft")
    mixed.modules[BLOCK + "attn1.to_q"] = random_weights("loha", model.get_submodule(BLOCK + "attn1.to_q"))
    with pytest.raises(CheckpointError, match=r"one adapter kind per model part, got \['loha', 'lora'\]"):
        save_adapter(mixed, tmp_path / "x.safetensors", small.model, "peft")
    with pytest.raises(ConfigError, match="unknown adapter format 'comfy'"):
        save_adapter(ia3, tmp_path / "x.safetensors", small.model, format="comfy")
    with pytest.raises(CheckpointError, match="no kohya name"):
        save_adapter(Adapter({"elsewhere.to_q": column_dora}), tmp_path / "x.safetensors", small.model)
    torch.save({"lora_unet_x.alpha": torch.tensor(1.0)}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="no tensor fits the model"):
        read_adapter(tmp_path / "old.pt", small.model)


def test_peft_folder_with_base_model_prefix(bare, small, randomize, tmp_path) -> None:
    """A peft ``save_pretrained`` folder of a U-Net: ``base_model.model.`` keys, rank/alpha in adapter_config.json."""
    state = {"base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(4, 32, 1, 1),
             "base_model.model.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(32, 4, 1, 1)}
    save_file(state, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 2}))
    adapter = read_adapter(tmp_path, small.model, strict=True).adapter
    weights = adapter.modules[U + "input_blocks.1.1.proj_in"]
    assert weights.alpha == 2 and weights.effective_scale == 0.5
    unet = UNetModel(small.unet)
    randomize(unet, 1)
    assert apply_adapter(unet, bare(adapter, UNET_PREFIX)) == {}
    assert [path for path, _ in adapted_layers(unet)] == ["input_blocks.1.1.proj_in"]


def test_sdxl_keys_are_reported_and_folders_without_weights_refused(small, tmp_path) -> None:
    state = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(1, 4),
             "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(4, 1),
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(1, 24),
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(24, 1)}
    loaded = adapter_from_state_dict(state, small.model)
    assert list(loaded.adapter.modules) == [T + "0.self_attn.q_proj"]
    assert set(loaded.unmatched) == {k for k in state if k.startswith("lora_te2_")}
    with pytest.raises(CheckpointError, match="no peft adapter file"):
        read_adapter(tmp_path, small.model)
    torch.save({"base_model.model.text_model.encoder.layers.1.mlp.fc2.lora_A.weight": torch.ones(2, 48),
                "base_model.model.text_model.encoder.layers.1.mlp.fc2.lora_B.weight": torch.ones(24, 2)},
               tmp_path / "adapter_model.bin")
    assert list(read_adapter(tmp_path, small.model).adapter.modules) == [T + "1.mlp.fc2"]


def test_bad_peft_configs_are_named(small) -> None:
    state = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(4, 32, 1, 1),
             "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(32, 4, 1, 1)}
    with pytest.raises(CheckpointError, match="'lora_adapter_metadata' is not JSON"):
        adapter_from_state_dict(state, small.model, {"lora_adapter_metadata": "{r: 4"})
    with pytest.raises(CheckpointError, match=r"pattern 'proj_\(in' is not a regular expression"):
        adapter_from_state_dict(state, small.model, peft_config={"r": 4, "rank_pattern": {"proj_(in": 2}})
    patterned = adapter_from_state_dict(state, small.model, peft_config={"r": 8, "lora_alpha": 8,
                                                                         "alpha_pattern": {"proj_in": 2}})
    assert patterned.adapter.modules[U + "input_blocks.1.1.proj_in"].effective_scale == 0.25  # alpha 2 / r 8


# LCM-LoRA's targets in peft names (diffusers' train_lcm_distill_lora_sd_wds.py; TCD-LoRA's trainer reuses them):
# attention, projections, feed-forward, and the convolutional parts (resnets, down/upsamplers, time embedding).
FEW_STEP_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def few_step_lora(config: ModelConfig, layout: str, rank: int = 4) -> dict[str, torch.Tensor]:
    """A U-Net LoRA on :data:`FEW_STEP_TARGETS` with random weights, keyed as the few-step LoRAs are published:
    ``kohya`` (``lora_unet_`` + diffusers path, ``lora_down``/``lora_up``/``alpha``: latent-consistency/lcm-lora-sdv1-5,
    Hyper-SD), ``peft`` (``unet.<path>.lora_A``/``lora_B``), ``diffusers`` (``unet.<path>.lora.down``/``lora.up``)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config_to_diffusers(config.unet))
    gen, state = torch.Generator().manual_seed(0), {}
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in FEW_STEP_TARGETS):
            continue
        out, inp, *kernel = module.weight.shape
        down = torch.randn(rank, inp, *kernel, generator=gen) * 0.3 / (inp * math.prod(kernel)) ** 0.5
        up = torch.randn(out, rank, *[1] * len(kernel), generator=gen) * 0.3 / rank**0.5
        kohya = "lora_unet_" + name.replace(".", "_")
        state |= {"kohya": {f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up,
                            f"{kohya}.alpha": torch.tensor(8.0)},
                  "peft": {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up},
                  "diffusers": {f"unet.{name}.lora.down.weight": down, f"unet.{name}.lora.up.weight": up}}[layout]
    return state


@pytest.mark.parametrize("layout", ["kohya", "peft", "diffusers"])
def test_full_size_few_step_loras_load_with_nothing_unmatched(layout) -> None:
    """An LCM-/TCD-/Hyper-SD-LoRA for SD 1.5 (278 layers, 3×3 convolutions included) in each published layout."""
    config = ModelConfig.sd15()
    loaded = adapter_from_state_dict(few_step_lora(config, layout, rank=1), config, strict=True)
    assert not loaded.unmatched and len(loaded.adapter.modules) == 278
    with torch.device("meta"):
        meta = LatentDiffusion(config)
    assert apply_adapter(meta, loaded.adapter) == {}  # every tensor fits its layer


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_few_step_lora_equals_diffusers_loading_the_same_file(layout, model, small, rel_err, unet_inputs) -> None:
    state = few_step_lora(small.model, layout)
    theirs = UNet2DConditionModel.from_config(unet_config_to_diffusers(small.unet)).eval()
    theirs.load_state_dict(unet_key_table(small.unet).to_foreign(model.unet.state_dict()))
    converted, alphas = StableDiffusionPipeline.lora_state_dict(dict(state))
    StableDiffusionPipeline.load_lora_into_unet(converted, alphas, theirs)
    apply_adapter(model, adapter_from_state_dict(state, small.model, strict=True).adapter)
    x, t, context = unet_inputs(small.unet)
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=context).sample
        got = model.unet(x, t, context)
    assert rel_err(got, want) <= 1e-5
