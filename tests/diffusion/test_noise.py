import math

import pytest
import torch

from nijimi.diffusion.noise import BrownianNoise, BrownianTree, draw_seeds, gaussian_like
from nijimi.errors import SamplerError


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_gaussian_like_from_one_generator_or_one_per_element():
    x = torch.zeros(3, 2, 4)
    assert torch.equal(gaussian_like(x, seeded(7)[0], "t"), torch.randn(3, 2, 4, generator=seeded(7)[0]))
    per_element = gaussian_like(x, seeded(1, 2, 3), "t")
    for i, seed in enumerate((1, 2, 3)):
        assert torch.equal(per_element[i], torch.randn(2, 4, generator=seeded(seed)[0]))


def test_missing_or_miscounted_generators_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(SamplerError, match="'euler-a'.*generator"):
        gaussian_like(x, None, "euler-a")
    with pytest.raises(SamplerError, match="3 generators for a batch of 2"):
        draw_seeds(seeded(1, 2, 3), 2, "dpm++2m-sde")


def test_tree_is_a_pure_function_of_seed_and_time():
    tree = BrownianTree((5,), [11, 12], 16.0)
    first = tree(3.7)
    tree(12.0), tree(0.1)
    again = BrownianTree((5,), [11, 12], 16.0)
    assert torch.equal(tree(3.7), first) and torch.equal(again(3.7), first)
    assert torch.equal(BrownianTree((5,), [12], 16.0)(3.7)[0], first[1])  # each seed is its own path
    assert torch.equal(tree(0.0), torch.zeros(2, 5))


def test_tree_increments_are_independent_with_variance_equal_to_duration():
    tree = BrownianTree((20000,), [3], 16.0)
    w = {t: tree(t)[0].double() for t in (0.0, 0.37, 2.5, 9.0, 16.0)}
    a, b, c = w[2.5] - w[0.37], w[9.0] - w[2.5], w[16.0] - w[9.0]
    assert a.var().item() == pytest.approx(2.13, rel=0.05)
    assert b.var().item() == pytest.approx(6.5, rel=0.05)
    assert c.var().item() == pytest.approx(7.0, rel=0.05)
    for u, v in ((a, b), (b, c), (a, c)):
        assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 0.03


def test_brownian_noise_reads_one_path_whatever_the_step_grid():
    x = torch.zeros(2, 3, 4)
    coarse = BrownianNoise(x, 14.6, seeded(5)[0], "sde")
    fine = BrownianNoise(x, 14.6, seeded(5)[0], "sde")
    grid = [14.6, 7.0, 3.0, 0.5]
    total = coarse(grid[0], grid[-1]) * math.sqrt(grid[0] - grid[-1])
    summed = sum(fine(a, b) * math.sqrt(a - b) for a, b in zip(grid[:-1], grid[1:], strict=True))
    assert torch.allclose(total, summed, atol=1e-5)
    assert coarse(0.5, 0.2).shape == x.shape


def test_brownian_noise_with_per_element_generators_is_batch_position_independent():
    x = torch.zeros(3, 2, 2)
    batch = BrownianNoise(x, 10.0, seeded(1, 2, 3), "sde")(10.0, 4.0)
    alone = BrownianNoise(x[:1], 10.0, seeded(3), "sde")(10.0, 4.0)
    assert torch.equal(batch[2], alone[0])
    assert not torch.equal(batch[0], batch[1])
