"""Size estimates of networks from their configs (what loaders check against memory before building)."""

import pytest
import torch
from helpers import SD1, SD2

from nijimi.models.controlnet import ControlNetConfig, ControlNetModel
from nijimi.models.ldm import LatentDiffusion, ModelConfig
from nijimi.models.size import Size, model_size


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("config", [ModelConfig.tiny(), SD1, SD2], ids=["tiny", "sd1-small", "sd2-small"])
def test_estimate_is_within_ten_percent_of_the_real_count(config):
    with torch.device("meta"):
        model = LatentDiffusion(config)
    for part, sub in (("unet", model.unet), ("vae", model.vae), ("text", model.text_encoder)):
        estimate = model_size(getattr(config, part)).parameters
        assert 0.9 < estimate / _parameters(sub) < 1.1, part
    assert model_size(config).parameters == sum(model_size(getattr(config, p)).parameters
                                                for p in ("unet", "vae", "text"))


def test_controlnet_estimate_is_an_upper_bound_and_other_configs_count_nothing():
    config = ControlNetConfig(SD1.unet)
    with torch.device("meta"):
        real = _parameters(ControlNetModel(config))
    assert real <= model_size(config).parameters < 4 * real
    assert model_size("not a config") == Size(0, 0)


def test_blocks_grow_with_layers():
    config = SD1.text
    assert model_size(config).blocks == config.num_layers
    assert model_size(ModelConfig.sd15()).blocks > model_size(ModelConfig.tiny()).blocks
