"""U-Net rename table (native ↔ diffusers) and diffusers config.json conversion."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from nijimi.errors import CheckpointError, ConfigError
from nijimi.io.keys.unet import unet_config_from_diffusers, unet_config_to_diffusers, unet_key_table
from nijimi.models.unet import UNetConfig, UNetModel

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
# unet/config.json of runwayml/stable-diffusion-v1-5 and of stabilityai/stable-diffusion-2-1 (768, v-prediction).
SD15_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": _DOWN, "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64, "up_block_types": _UP,
}
SD21_CONFIG_JSON = {
    **SD15_CONFIG_JSON, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
    "only_cross_attention": False, "sample_size": 96, "use_linear_projection": True, "upcast_attention": True,
}
SMALL = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2), num_heads=2,
                   context_dim=16, norm_groups=8)


def test_real_diffusers_configs_map_to_presets() -> None:
    assert unet_config_from_diffusers(SD15_CONFIG_JSON) == UNetConfig.sd15()
    assert unet_config_from_diffusers(SD21_CONFIG_JSON) == UNetConfig.sd21_v()
    assert unet_config_to_diffusers(UNetConfig.sd21_v())["attention_head_dim"] == [5, 10, 20, 20]
    for key, value in SD15_CONFIG_JSON.items():
        if not key.startswith("_"):
            assert unet_config_to_diffusers(UNetConfig.sd15())[key] == value, key


@pytest.mark.parametrize("cfg", [UNetConfig.sd15(), UNetConfig.sd21(), UNetConfig.sd15_inpaint(), UNetConfig.tiny(),
                                 SMALL], ids=["sd15", "sd21", "inpaint", "tiny", "small"])
def test_config_round_trip(cfg: UNetConfig) -> None:
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == cfg


@pytest.mark.parametrize(("native", "diffusers"), [
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("input_blocks.1.0.emb_layers.1.weight", "down_blocks.0.resnets.0.time_emb_proj.weight"),
    ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
    ("input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
    ("input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
     "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight"),
    ("input_blocks.11.0.out_layers.3.bias", "down_blocks.3.resnets.1.conv2.bias"),
    ("middle_block.1.proj_out.weight", "mid_block.attentions.0.proj_out.weight"),
    ("middle_block.2.in_layers.0.weight", "mid_block.resnets.1.norm1.weight"),
    ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
    ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
    ("output_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight",
     "up_blocks.2.attentions.2.transformer_blocks.0.ff.net.0.proj.weight"),
    ("output_blocks.11.0.skip_connection.weight", "up_blocks.3.resnets.2.conv_shortcut.weight"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.2.weight", "conv_out.weight"),
])
def test_sd15_table_entries(native: str, diffusers: str) -> None:
    assert dict(unet_key_table(UNetConfig.sd15()))[native] == diffusers


@pytest.mark.parametrize("cfg", [UNetConfig.sd15(), UNetConfig.sd21(), UNetConfig.tiny()], ids=["sd15", "sd21", "tiny"])
def test_table_agrees_with_diffusers_single_file_converter(cfg: UNetConfig) -> None:
    """diffusers' own original-checkpoint converter, fed our native tree, must produce exactly our renames."""
    with torch.device("meta"):
        sd = UNetModel(cfg).state_dict()
    theirs = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in sd.items()},
                                         unet_config_to_diffusers(cfg))
    ours = unet_key_table(cfg).to_foreign(sd)
    assert set(ours) == set(theirs)
    assert all(ours[k] is theirs[k] for k in theirs)


def test_state_dict_round_trip_is_exact() -> None:
    model = UNetModel(SMALL)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    sd = model.state_dict()
    back = unet_key_table(SMALL).to_native(unet_key_table(SMALL).to_foreign(sd))
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    table = unet_key_table(SMALL)
    assert len({d for _, d in table}) == len(table) == len(sd)


def test_unknown_keys_are_named() -> None:
    sd = {"input_blocks.0.0.weight": torch.zeros(1), "input_blocks.99.0.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"input_blocks\.99\.0\.weight"):
        unet_key_table(SMALL).to_foreign(sd)
    with pytest.raises(CheckpointError, match=r"bogus\.weight"):
        unet_key_table(SMALL).to_native({"conv_in.weight": torch.zeros(1), "bogus.weight": torch.zeros(1)})


@pytest.mark.parametrize(("change", "message"), [
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"up_block_types": list(reversed(_UP))}, "not SD-like"),
    ({"layers_per_block": [2, 2, 2, 2]}, "layers_per_block"),
    ({"attention_head_dim": [5, 10, 10, 20]}, "heads"),
])
def test_unsupported_diffusers_configs_are_named(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        unet_config_from_diffusers({**SD15_CONFIG_JSON, **change})
