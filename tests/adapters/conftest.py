"""Shared small configs and helpers for the adapter tests, as fixtures (``rel_err``, ``randomize`` … are factories)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import MODEL_SMALL, TEXT_SMALL, UNET_SMALL, UNET_SMALL_LINEAR, randomize, rel_err

from nijimi.adapters.deltas import factorization
from nijimi.adapters.weights import Adapter, ModuleWeights
from nijimi.models.text_encoder import TextEncoderConfig
from nijimi.models.unet import UNetConfig


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded noise in every parameter (:func:`helpers.randomize`, embeddings ~ 0.5)."""
    randomize(model, seed, embedding_std=0.5)


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


@pytest.fixture(scope="session", name="randomize")
def randomize_fixture():
    return _randomize


@pytest.fixture(scope="session", name="rel_err")
def rel_err_fixture():
    return rel_err


@pytest.fixture(scope="session")
def bare():
    """``bare(adapter, prefix)``: the modules under ``prefix``, paths relative to it (for a bare U-Net or encoder)."""
    return lambda adapter, prefix: Adapter({p.removeprefix(prefix): w for p, w in adapter.modules.items()
                                            if p.startswith(prefix)}, dict(adapter.metadata))


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


def _random_weights(kind: str, layer: torch.nn.Module, seed: int = 0) -> ModuleWeights:
    """Random non-zero adapter weights of ``kind`` for ``layer`` (Linear, Conv2d, or a norm for ``"norm"``), in the
    layouts real files use; ``"lora-tucker"``, ``"boft"``, ``"oft-diag"`` and ``"dora"`` (a LoRA with a per-row
    magnitude) are variants."""
    gen = torch.Generator().manual_seed(seed)
    w = layer.weight.detach()
    out, cols = w.shape[0], w[0].numel()
    inp, kernel = (w.shape[1], tuple(w.shape[2:])) if w.ndim > 1 else (0, ())

    def rnd(*shape: int, size: float = 0.3) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * size / max(shape[-1], 1) ** 0.5

    t: dict[str, torch.Tensor]
    alpha = None
    if kind in ("lora", "dora"):
        t = {"lora_down": rnd(2, inp, *kernel), "lora_up": rnd(out, 2, *([1, 1] if kernel else []))}
        alpha = 1.5
        if kind == "dora":
            t["dora_scale"] = w.reshape(out, -1).norm(dim=1).reshape(out, *[1] * (w.ndim - 1)) * 1.2
            kind = "lora"
    elif kind == "lora-tucker":
        t = {"lora_down": rnd(2, inp, 1, 1), "lora_mid": rnd(2, 2, *kernel), "lora_up": rnd(out, 2, 1, 1)}
        kind, alpha = "lora", 1.0
    elif kind == "loha":
        t = {"hada_w1_a": rnd(out, 2, size=1.0), "hada_w1_b": rnd(2, cols, size=1.0),
             "hada_w2_a": rnd(out, 2, size=1.0), "hada_w2_b": rnd(2, cols, size=1.0)}
        alpha = 3.0
    elif kind == "lokr":
        (a, b), (c, d) = factorization(out, -1), factorization(inp, -1)
        t = {"lokr_w1": rnd(a, c), "lokr_w2_a": rnd(b, 2), "lokr_w2_b": rnd(2, d * cols // inp)}
        alpha = 2.0
    elif kind == "full":
        t = {"diff": rnd(*w.shape), "diff_b": rnd(out)}
    elif kind == "ia3":
        t = {"weight": rnd(out), "on_input": torch.tensor(False)}
    elif kind == "norm":
        t = {"w_norm": rnd(out), "b_norm": rnd(out)}
    elif kind == "glora":
        t = {"a1": rnd(2, cols), "a2": rnd(cols, 2), "b1": rnd(2, cols), "b2": rnd(out, 2)}
        alpha = 2.0
    elif kind in ("oft", "oft-diag", "boft"):
        blocks = rnd(out // 4, 4, 4, size=1.0)
        if kind == "oft-diag":
            t, kind = {"oft_diag": torch.linalg.matrix_exp(blocks - blocks.transpose(1, 2))}, "oft"
        else:
            t = {"oft_blocks": blocks if kind == "oft" else torch.stack([blocks, rnd(out // 4, 4, 4, size=1.0)])}
            kind, alpha = "oft", 2.0 ** -7  # COFT constraint per output; exact in the float32 files store
    else:
        raise ValueError(kind)
    return ModuleWeights(kind, t, alpha)


@pytest.fixture(scope="session")
def random_weights():
    return _random_weights
