"""Shared small configs and helpers for the adapter tests, as fixtures (``rel_err``, ``randomize`` … are factories)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nijimi.models.ldm import ModelConfig
from nijimi.models.text_encoder import TextEncoderConfig
from nijimi.models.unet import UNetConfig
from nijimi.models.vae import VAEConfig

# A small SD 1.x-style U-Net: two levels with attention at both, 1×1 proj_in/out, ResBlock skips, down/up sampling.
UNET_SMALL = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                        num_heads=2, context_dim=24, norm_groups=8)
# The same with SD 2.x's linear projections.
UNET_SMALL_LINEAR = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                               num_heads=None, head_dim=16, context_dim=24, norm_groups=8, linear_proj=True)
TEXT_SMALL = TextEncoderConfig(vocab_size=1000, width=24, num_layers=2, num_heads=2, mlp_width=48)
MODEL_SMALL = ModelConfig(UNET_SMALL, VAEConfig.tiny(), TEXT_SMALL, "sd1", pad_token_id=999)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster, and immune to other processes on the same cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded noise in every parameter (weights ~ 1/√fan_in, norm gains ~ 1, biases ~ 0.1, embeddings ~ 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "embedding" in name:
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def _unet_inputs(cfg: UNetConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (2, 4, 8, 8), t (2,), context (2, 5, context_dim))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=gen)
    context = torch.randn(2, 5, cfg.context_dim, generator=gen)
    return x, torch.tensor([999.0, 3.0]), context


def _token_ids(cfg: TextEncoderConfig, seed: int = 1) -> torch.Tensor:
    """(2, 16) random ids, each row ending in the end-of-text id (the vocabulary's last) and padding."""
    ids = torch.randint(0, cfg.vocab_size - 1, (2, 16), generator=torch.Generator().manual_seed(seed))
    ids[0, 9:] = cfg.vocab_size - 1
    ids[1, 13:] = cfg.vocab_size - 1
    return ids


@pytest.fixture(scope="session")
def randomize():
    return _randomize


@pytest.fixture(scope="session")
def rel_err():
    return _rel_err


@pytest.fixture(scope="session")
def unet_inputs():
    return _unet_inputs


@pytest.fixture(scope="session")
def token_ids():
    return _token_ids


@pytest.fixture(scope="session")
def small():
    """The small configs: ``small.unet``, ``small.unet_linear``, ``small.text``, ``small.model`` (all three parts)."""
    return SimpleNamespace(unet=UNET_SMALL, unet_linear=UNET_SMALL_LINEAR, text=TEXT_SMALL, model=MODEL_SMALL)
