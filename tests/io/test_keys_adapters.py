"""Module-name tables of adapter files for the full-size SD 1.5 and SD 2.1 configs (built on the meta device;
nijimi/io/keys/adapters.py)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from nijimi.io.keys.adapters import name_tables, part_of, peft_natives, unet_modules
from nijimi.io.keys.unet import unet_config_to_diffusers
from nijimi.models.ldm import TEXT_PREFIX, UNET_PREFIX, ModelConfig

SD15, SD21 = ModelConfig.sd15(), ModelConfig.sd21()


def test_kohya_names_of_known_sd15_modules() -> None:
    tables = name_tables(SD15.unet, SD15.text)
    known = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "lora_unet_down_blocks_1_attentions_1_proj_in": "input_blocks.5.1.proj_in",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj":
            "middle_block.1.transformer_blocks.0.ff.net.0.proj",
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0":
            "output_blocks.5.1.transformer_blocks.0.attn2.to_out.0",
        "lora_unet_up_blocks_3_attentions_2_proj_out": "output_blocks.11.1.proj_out",
        "lora_unet_down_blocks_0_resnets_1_conv2": "input_blocks.2.0.out_layers.3",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "input_blocks.4.0.skip_connection",
        "lora_unet_down_blocks_2_downsamplers_0_conv": "input_blocks.9.0.op",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.2.1.conv",
        "lora_unet_up_blocks_2_upsamplers_0_conv": "output_blocks.8.2.conv",
        "lora_unet_mid_block_resnets_1_time_emb_proj": "middle_block.2.emb_layers.1",
    }
    for kohya, native in known.items():
        assert tables.kohya.natives_of[kohya] == (UNET_PREFIX + native,)
        assert tables.kohya.foreign_of[UNET_PREFIX + native] == kohya
        # A1111's CompVis form names the same module by its native path; kohya's OFT uses its own prefix.
        assert tables.kohya.natives_of["lora_unet_" + native.replace(".", "_")] == (UNET_PREFIX + native,)
        assert tables.kohya.natives_of["oft_unet_" + kohya.removeprefix("lora_unet_")] == (UNET_PREFIX + native,)
    te = "text_model.encoder.layers.11.mlp.fc2"
    assert tables.kohya.natives_of["lora_te_text_model_encoder_layers_11_mlp_fc2"] == (TEXT_PREFIX + te,)
    # What kohya / LyCORIS write when they run transformers 5, whose CLIPTextModel has no text_model level.
    assert tables.kohya.natives_of["lora_te_encoder_layers_11_mlp_fc2"] == (TEXT_PREFIX + te,)
    proj_in = UNET_PREFIX + "input_blocks.1.1.proj_in"
    assert tables.peft.natives_of["unet.down_blocks.0.attentions.0.proj_in"] == (proj_in,)
    assert tables.peft.foreign_of[TEXT_PREFIX + te] == "text_encoder." + te
    for name in ("text_encoder." + te, "text_encoder.encoder.layers.11.mlp.fc2", te):
        assert peft_natives(name, tables) == (TEXT_PREFIX + te,)
    assert peft_natives("down_blocks.0.attentions.0.proj_in", tables) == (proj_in,)
    assert peft_natives("text_encoder.no_such.module", tables) is None


def test_unet_modules_cover_every_diffusers_module_with_a_weight() -> None:
    with torch.device("meta"):
        reference = UNet2DConditionModel.from_config(unet_config_to_diffusers(SD15.unet))
    diffusers_names = {n for n, m in reference.named_modules() if isinstance(getattr(m, "weight", None),
                                                                             torch.nn.Parameter)}
    assert set(unet_modules(SD15.unet).values()) == diffusers_names


def test_sd21_openclip_names_split_the_fused_projection() -> None:
    tables = name_tables(SD21.unet, SD21.text)
    layer = TEXT_PREFIX + "text_model.encoder.layers.3."
    assert tables.kohya.natives_of["lora_te_model_transformer_resblocks_3_attn_in_proj"] == tuple(
        layer + f"self_attn.{p}_proj" for p in "qkv")
    assert tables.kohya.natives_of["lora_te_model_transformer_resblocks_3_mlp_c_fc"] == (layer + "mlp.fc1",)
    assert tables.kohya.natives_of["lora_te_model_transformer_resblocks_23_attn_out_proj"] == (
        TEXT_PREFIX + "text_model.encoder.layers.23.self_attn.out_proj",)
    # SD 2.x kohya files use the transformers names for the text encoder, as for SD 1.x.
    assert tables.kohya.natives_of["lora_te_text_model_encoder_layers_3_self_attn_q_proj"] == (
        layer + "self_attn.q_proj",)


def test_tables_are_one_to_one_where_they_write() -> None:
    for config in (SD15, SD21):
        tables = name_tables(config.unet, config.text)
        for table in (tables.kohya, tables.peft):
            assert all(table.natives_of[name] == (path,) for path, name in table.foreign_of.items())
            assert len(set(table.foreign_of.values())) == len(table.foreign_of)


def test_part_of() -> None:
    assert part_of(UNET_PREFIX + "out.2") == "unet"
    assert part_of(TEXT_PREFIX + "text_model.final_layer_norm") == "text"
    assert part_of("first_stage_model.decoder.conv_in") is None
