"""TAESD parity with diffusers' AutoencoderTiny on random weights (its default config is TAESD for SD 1.x/2.x), the
presets' shapes and the errors. The published file layouts are tested in ``tests/io/test_taesd.py``."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderTiny
from helpers import randomize, rel_err

from nijimi.errors import ConfigError
from nijimi.io.taesd import to_diffusers
from nijimi.models.taesd import TAESD, TAESDConfig

TOLERANCE = 1e-4  # max |nijimi − diffusers| / max |diffusers|, fp32


@pytest.fixture(scope="module")
def pair() -> tuple[TAESD, AutoencoderTiny]:
    """A random nijimi TAESD and diffusers' default AutoencoderTiny holding the same weights."""
    ours = TAESD(TAESDConfig.sd()).eval()
    randomize(ours, 0)
    theirs = AutoencoderTiny().eval()
    theirs.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    return ours, theirs


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    """Latents up to ±8 so the soft clamp matters; diffusers' decode takes and gives the same ranges as ours."""
    ours, theirs = pair
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1)) * 3
    mine, ref = ours.decode_latents(z), theirs.decode(z).sample
    assert mine.shape == (2, 3, 64, 48)
    assert rel_err(mine, ref) < TOLERANCE


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    ours, theirs = pair
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mine, ref = ours.encode_latents(x), theirs.encode(x).latents
    assert mine.shape == (2, 4, 8, 6)
    assert rel_err(mine, ref) < TOLERANCE


def test_presets():
    """The SD preset has the published 1.2 M parameters per half; ``tiny`` is factor 4."""
    sd, tiny = TAESD(TAESDConfig.sd()), TAESD(TAESDConfig.tiny())
    assert [sum(p.numel() for p in half.parameters()) for half in (sd.encoder, sd.decoder)] == [1_222_532, 1_222_531]
    assert (TAESDConfig.sd().downscale_factor, TAESDConfig.tiny().downscale_factor) == (8, 4)
    with torch.no_grad():
        assert tiny.decode_latents(torch.zeros(1, 4, 5, 3)).shape == (1, 3, 20, 12)
        assert tiny.encode_latents(torch.zeros(1, 3, 20, 12)).shape == (1, 4, 5, 3)


def test_errors():
    with pytest.raises(ConfigError, match="positive sizes"):
        TAESDConfig(blocks=())
    decoder_only = TAESD(TAESDConfig.tiny(), encoder=False)
    assert decoder_only.encoder is None and not any(k.startswith("encoder") for k in decoder_only.state_dict())
    with pytest.raises(ConfigError, match="no encoder"):
        decoder_only.encode_latents(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match=r"\(B, 4, h, w\) latents, got \(1, 16, 2, 2\)"):
        decoder_only.decode_latents(torch.zeros(1, 16, 2, 2))
    with pytest.raises(ConfigError, match="multiples of 4"):
        TAESD(TAESDConfig.tiny()).encode_latents(torch.zeros(1, 3, 6, 8))
