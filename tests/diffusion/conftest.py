"""Shared fixtures for the diffusion tests: a tiny fixed network and a 2-D Gaussian mixture with an exact denoiser."""

import math

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """A fixed random conv net ``net(x, t, context=None)`` that depends non-linearly on x and on t (sinusoidal
    embedding), like a U-Net but small; output magnitude ~1 as an ε/v predictor's."""

    def __init__(self, channels: int = 4, hidden: int = 16, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.time = nn.Linear(16, hidden)
        self.context = nn.Linear(8, hidden)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(max(p[0].numel(), 1)))

    def forward(self, x, t, context=None, **_):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8) / 8)
        emb = self.time(torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1))
        if context is not None:
            emb = emb + self.context(context.mean(1))
        h = nn.functional.silu(self.conv1(x) + emb[:, :, None, None])
        return torch.tanh(self.conv2(h)) * 1.5


@pytest.fixture(scope="session")
def tiny_net():
    return TinyNet().eval()


class GaussianMixture:
    """A 2-D mixture of three anisotropic Gaussians, in float64. ``denoise(x, σ)`` is the exact posterior mean
    E[x₀ | x₀ + σ·n = x]: Σ_k γ_k(x)·(μ_k + Σ_k (Σ_k + σ²I)⁻¹ (x - μ_k)), γ_k ∝ π_k N(x; μ_k, Σ_k + σ²I)."""

    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
    covs = torch.tensor([[[0.30, 0.10], [0.10, 0.20]],
                         [[0.15, -0.05], [-0.05, 0.40]],
                         [[0.25, 0.00], [0.00, 0.10]]], dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self.means[k] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(self.covs)[k], z)

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        outer = self.covs + self.means[:, :, None] * self.means[:, None, :]
        m = self.mean()
        return (self.weights[:, None, None] * outer).sum(0) - m[:, None] * m[None, :]

    def _log_likelihoods(self, x: torch.Tensor, var: torch.Tensor):
        """log π_k N(x; μ_k, Σ_k + var·I) up to a constant, (N, K), and (Σ_k + var·I)⁻¹ (x - μ_k), (N, K, 2);
        var: (N, 1). The 2×2 inverses are written out (much faster than batched linalg on tiny matrices)."""
        diff = x.double()[:, None, :] - self.means[None]
        a, b, d = self.covs[:, 0, 0] + var, self.covs[:, 0, 1] + 0 * var, self.covs[:, 1, 1] + var
        det = a * d - b * b
        solved = torch.stack([d * diff[..., 0] - b * diff[..., 1], a * diff[..., 1] - b * diff[..., 0]], -1)
        solved = solved / det[..., None]
        log_p = self.weights.log()[None] - 0.5 * (diff * solved).sum(-1) - 0.5 * det.log()
        return log_p, solved

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        log_p, solved = self._log_likelihoods(x, sigma.double()[:, None] ** 2)
        posterior = self.means[None] + torch.einsum("kij,nkj->nki", self.covs, solved)
        return (torch.softmax(log_p, dim=1)[..., None] * posterior).sum(1).to(x.dtype)

    def mode_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Fraction of samples whose most likely component is k, (3,)."""
        log_p, _ = self._log_likelihoods(x, torch.zeros(len(x), 1, dtype=torch.float64))
        return torch.bincount(log_p.argmax(1), minlength=3).double() / len(x)


@pytest.fixture(scope="session")
def mixture():
    return GaussianMixture()
