"""Latent sizes that are not multiples of 2^(levels-1) (e.g. 520 px for SD) work as in diffusers."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from nijimi.io.keys import unet_config_to_diffusers, unet_to_diffusers
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
    ref.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg))
    x, t, c = torch.randn(2, 4, *size), torch.tensor([500.0, 20.0]), torch.randn(2, 7, 32)
    with torch.no_grad():
        a, b = ours(x, t, c), ref(x, t, c).sample
    assert a.shape == x.shape
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4
