"""Latent sizes that are not multiples of 2^(levels-1) (e.g. 520 px for SD) work as in diffusers."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import rel_err

from nijimi.io.keys.unet import unet_config_to_diffusers, unet_key_table
from nijimi.models.unet import UNetConfig, UNetModel


@pytest.mark.parametrize("size", [(13, 9), (10, 6), (8, 8)])
def test_odd_latent_sizes_match_diffusers(size):
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                     num_heads=2, context_dim=32)
    ours = UNetModel(cfg).eval()
    for p in ours.parameters():
        p.data.normal_(0, 0.05)
    config = {k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")}
    ref = UNet2DConditionModel(**config).eval()
    ref.load_state_dict(unet_key_table(cfg).to_foreign(ours.state_dict()))
    x, t, c = torch.randn(2, 4, *size), torch.tensor([500.0, 20.0]), torch.randn(2, 7, 32)
    with torch.no_grad():
        a, b = ours(x, t, c), ref(x, t, c).sample
    assert a.shape == x.shape
    assert rel_err(a, b) < 1e-4


def test_controlnet_on_odd_latent_sizes_matches_diffusers():
    from diffusers import ControlNetModel as ReferenceControlNet

    from nijimi.io.keys.controlnet import controlnet_config_to_diffusers, controlnet_key_table
    from nijimi.models.controlnet import ControlNetConfig, ControlNetModel

    torch.manual_seed(0)
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                      num_heads=2, context_dim=32)
    cfg = ControlNetConfig(unet=unet)
    ours = ControlNetModel(cfg).eval()
    for p in ours.parameters():
        p.data.normal_(0, 0.05)
    config = {k: v for k, v in controlnet_config_to_diffusers(cfg).items() if not k.startswith("_")}
    ref = ReferenceControlNet(**config).eval()
    ref.load_state_dict(controlnet_key_table(cfg).to_foreign(ours.state_dict()))
    x, t, c = torch.randn(1, 4, 9, 13), torch.tensor([300.0]), torch.randn(1, 7, 32)
    hint = torch.rand(1, 3, 72, 104)
    with torch.no_grad():
        down, mid = ours(x, t, c, hint)
        ref_down, ref_mid = ref(x, t, c, controlnet_cond=hint, return_dict=False)
    for a, b in zip([*down, mid], [*ref_down, ref_mid], strict=True):
        assert ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item() < 1e-4
