"""Helpers shared by the parity tests (importable because pytest puts ``tests/`` on the path, see pyproject)."""

import torch


def randomize(model: torch.nn.Module, seed: int, embedding_std: float | None = None) -> None:
    """Fill every parameter with seeded noise so nothing is zero (zero convs included): weights ~ 1/√fan_in, norm
    gains ~ 1, biases ~ 0.1, and parameters named ``*embedding*`` ~ ``embedding_std`` when it is given."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if embedding_std is not None and "embedding" in name:
                p.copy_(embedding_std * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute error relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()
