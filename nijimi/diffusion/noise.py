"""Where the noise comes from: the starting noise (with A1111's variation seeds), and stochastic samplers' per-step
Gaussian draws and seeded Brownian tree.

Randomness comes only from explicit ``torch.Generator`` objects (variation seeds: fresh ones seeded from theirs). A
sampler receives either one generator for the whole batch, or one generator per batch element; with one per element
(each seeded with that image's seed), an image comes out the same whatever its position in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nijimi.errors import SamplerError

Generators = torch.Generator | Sequence[torch.Generator]

_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def initial_noise(shape: tuple[int, ...], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """``torch.randn(shape, generator=g)`` on the CPU for each image's generator, stacked: (B, C, h, w) for shape
    (1, C, h, w). Drawn on the CPU (as diffusers' ``randn_tensor`` does for a CPU generator), so that a seed gives the
    same noise on any device."""
    return torch.cat([torch.randn(shape, generator=g) for g in generators])


@dataclass(frozen=True)
class Seeds:
    """A batch's starting-noise randomness: one generator per image (image i's seeded ``seed + i``), A1111's
    variation seed of image 0 (image i uses ``variation_seed + i``) and strength in [0, 1], and ``resize_from``, the
    latent (h, w) the seed's noise is drawn at ("resize seed from"; None: the target size)."""

    generators: Sequence[torch.Generator]
    variation_seed: int = 0
    variation_strength: float = 0.0
    resize_from: tuple[int, int] | None = None


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) from ``a`` (t = 0) to ``b`` (t = 1) over the flattened tensors:
    ``(sin((1-t)ω)·a + sin(tω)·b) / sin ω`` with ``cos ω`` the dot product of the normalised vectors; linear
    interpolation when they are nearly parallel (|cos ω| > 0.9995). t = 1 gives ``b`` exactly.

    A1111's ``slerp`` normalises along dim 1 of a (C, h, w) tensor (each channel and column apart) and swaps the
    weights of its linear fallback; this one treats the whole tensor as one vector."""
    cos = float(torch.dot(torch.nn.functional.normalize(a.flatten().double(), dim=0),
                          torch.nn.functional.normalize(b.flatten().double(), dim=0)))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    omega = math.acos(cos)
    return math.sin((1 - t) * omega) / math.sin(omega) * a + math.sin(t * omega) / math.sin(omega) * b


def starting_noise(shape: tuple[int, ...], seeds: Seeds) -> torch.Tensor:
    """The starting noise (B, C, h, w) for shape (1, C, h, w), A1111's "x" noise (``create_random_tensors``):
    :func:`initial_noise` (bit for bit) unless a variation strength or a different ``resize_from`` is given.

    Image i (generator g, seed s = ``g.initial_seed()``): the seed's noise n is drawn at ``resize_from`` by a fresh
    generator seeded s (at the target size: ``g``'s own draw); n = ``slerp(strength, n, noise(variation_seed + i))``
    at that size; at another size, n replaces the centre of ``g``'s draw at the target size, cropped where the target
    is smaller, with A1111's offsets: per axis d = ⌊(target - from)/2⌋, d ≥ 0 pastes all of n at d, d < 0 pastes
    n[-d : from + d] at 0 (an odd shrink keeps one last row or column of ``g``'s draw). ``g`` always makes exactly
    one draw of ``shape``, so the sampler's later draws stay in step."""
    size = seeds.resize_from or tuple(shape[2:])
    if not seeds.variation_strength and size == tuple(shape[2:]):
        return initial_noise(shape, seeds.generators)
    noises = []
    for i, g in enumerate(seeds.generators):
        x = torch.randn(shape, generator=g)
        n = x if size == x.shape[2:] else \
            torch.randn((*shape[:2], *size), generator=torch.Generator().manual_seed(g.initial_seed()))
        if seeds.variation_strength:
            other = torch.Generator().manual_seed(seeds.variation_seed + i)
            n = slerp(seeds.variation_strength, n, torch.randn(n.shape, generator=other))
        (dy, ty, sy), (dx, tx, sx) = (_overlap(t, f) for t, f in zip(shape[2:], size, strict=True))
        x[..., ty:ty + dy, tx:tx + dx] = n[..., sy:sy + dy, sx:sx + dx]
        noises.append(x)
    return torch.cat(noises)


def _overlap(target: int, source: int) -> tuple[int, int, int]:
    """A1111's centring along one axis: (length, offset in the target, offset in the source)."""
    d = (target - source) // 2
    return (source if d >= 0 else source + 2 * d), max(d, 0), max(-d, 0)


def gaussian_like(x: torch.Tensor, generator: Generators | None, sampler: str) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (B, ...), drawn from ``generator`` (one, or one per batch element)."""
    generators = _generators(generator, x.shape[0], sampler)
    if isinstance(generators, torch.Generator):
        noise = torch.randn(x.shape, generator=generators, device=generators.device, dtype=x.dtype)
    else:
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype)
                             for g in generators])
    return noise.to(x.device)


def gaussian_noise(x: torch.Tensor, generator: Generators | None, sampler: str):
    """A sampler's noise source ``noise(σ, σ_next)`` that draws fresh per-step Gaussian noise like ``x`` from
    ``generator`` (:func:`gaussian_like`) on every call."""
    _generators(generator, x.shape[0], sampler)  # fail before sampling starts

    def noise(sigma: float, sigma_next: float) -> torch.Tensor:
        return gaussian_like(x, generator, sampler)

    return noise


def draw_seeds(generator: Generators | None, batch: int, sampler: str) -> list[int]:
    """Seeds for Brownian paths: one for the whole batch from a shared generator, or one per batch element, each
    from that element's own generator. Each seed is a 62-bit draw."""
    generators = _generators(generator, batch, sampler)
    if isinstance(generators, torch.Generator):
        generators = [generators]
    return [int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)) for g in generators]


class BrownianTree:
    """Brownian motions W_k(t) of shape ``shape`` on [0, t_max], one per seed, that can be queried at any t in any
    order; ``tree(t)`` has shape (number of seeds, *shape).

    W(t) is built by bisection (a Brownian bridge, Lévy's construction): W(0) = 0, W(t_max) = sqrt(t_max)·z₀, and
    the midpoint m of node n's interval [a, b] (root n = 1, children 2n and 2n+1) is
    ``(W(a) + W(b))/2 + sqrt((b-a)/4)·z_n``. Every z_n comes from a generator seeded by (seed, n), so the path is a
    pure function of the seed: it does not depend on which or how many points are queried. Below
    ``t_max/2^depth`` the path is interpolated linearly.
    """

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], t_max: float, *, depth: int = 24,
                 dtype: torch.dtype = torch.float32) -> None:
        if not t_max > 0:
            raise SamplerError(f"Brownian tree needs t_max > 0, got {t_max}")
        self.shape, self.seeds, self.t_max, self.depth, self.dtype = tuple(shape), list(seeds), t_max, depth, dtype

    def _gaussian(self, node: int) -> torch.Tensor:
        """z_node for every seed, (number of seeds, *shape)."""
        draws = []
        for seed in self.seeds:
            generator = torch.Generator().manual_seed(_mix(seed, node))
            draws.append(torch.randn(self.shape, generator=generator, dtype=self.dtype))
        return torch.stack(draws)

    def __call__(self, t: float) -> torch.Tensor:
        """W(t) for every seed, (number of seeds, *shape)."""
        if not 0 <= t <= self.t_max:
            raise SamplerError(f"Brownian tree queried at t={t}, outside [0, {self.t_max}]")
        a, b, node = 0.0, self.t_max, 1
        w_a = torch.zeros((len(self.seeds), *self.shape), dtype=self.dtype)
        w_b = math.sqrt(self.t_max) * self._gaussian(0)
        for _ in range(self.depth):
            if t == a:
                return w_a
            if t == b:
                return w_b
            m = (a + b) / 2
            w_m = (w_a + w_b) / 2 + math.sqrt((b - a) / 4) * self._gaussian(node)
            if t < m:
                b, w_b, node = m, w_m, 2 * node
            else:
                a, w_a, node = m, w_m, 2 * node + 1
        return w_a + (t - a) / (b - a) * (w_b - w_a)


class BrownianNoise:
    """Unit-variance noise for the step σ → σ_next, taken from a Brownian tree over σ (k-diffusion's
    ``BrownianTreeNoiseSampler``): ``(W(σ) - W(σ_next)) / sqrt(σ - σ_next)``.

    With one generator per batch element each element gets its own path (batch-position independent); with a
    shared generator the whole batch is one path. The tree spans [0, 2^⌈log₂ σ_max⌉], so schedules of different
    lengths that share the power of two (every SD schedule: σ_max in (8, 16]) read the same Brownian path, and more
    steps refine the same SDE solution.
    """

    def __init__(self, x: torch.Tensor, sigma_max: float, generator: Generators | None, sampler: str) -> None:
        seeds = draw_seeds(generator, x.shape[0], sampler)
        t_max = 2.0 ** math.ceil(math.log2(sigma_max))
        shape = x.shape if len(seeds) == 1 else x.shape[1:]
        self.tree = BrownianTree(shape, seeds, t_max, dtype=x.dtype)
        self.shape, self.device = x.shape, x.device
        self._last: tuple[float, torch.Tensor] | None = None

    def _w(self, t: float) -> torch.Tensor:
        if self._last is not None and self._last[0] == t:
            return self._last[1]
        w = self.tree(t)
        self._last = (t, w)
        return w

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        """(B, ...) standard normal noise for the step from ``sigma`` down to ``sigma_next``."""
        w_sigma = self._w(sigma)
        w_next = self._w(sigma_next)
        return ((w_sigma - w_next) / math.sqrt(sigma - sigma_next)).reshape(self.shape).to(self.device)


def _generators(generator: Generators | None, batch: int, sampler: str) -> Generators:
    if generator is None:
        raise SamplerError(f"sampler {sampler!r} draws noise: pass generator=torch.Generator().manual_seed(seed)")
    if isinstance(generator, torch.Generator):
        return generator
    generators = list(generator)
    if len(generators) != batch:
        raise SamplerError(f"sampler {sampler!r} got {len(generators)} generators for a batch of {batch}")
    return generators


def _mix(seed: int, node: int) -> int:
    """A well-scrambled 63-bit seed for tree node ``node`` of the path seeded ``seed`` (SplitMix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + node) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63
