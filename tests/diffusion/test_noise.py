import math

import numpy as np
import pytest
import torch

from nijimi.diffusion.noise import (
    BrownianNoise,
    BrownianTree,
    Seeds,
    draw_seeds,
    gaussian_like,
    initial_noise,
    slerp,
    starting_noise,
)
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


def reference_slerp(t, a, b):
    """Spherical interpolation of the flattened tensors in float64 numpy; linear when nearly (anti)parallel."""
    u, v = a.double().flatten().numpy(), b.double().flatten().numpy()
    cos = u @ v / np.linalg.norm(u) / np.linalg.norm(v)
    if abs(cos) > 0.9995:
        return (1 - t) * u + t * v
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * u + np.sin(t * omega) * v) / np.sin(omega)


@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.93, 1.0])
@pytest.mark.parametrize("kind", ["random", "near-parallel", "antiparallel"])
def test_slerp_matches_a_reference(t, kind):
    a, b = torch.randn(2, 1, 4, 6, 5, generator=seeded(3)[0])
    b = {"random": b, "near-parallel": 2 * a + 1e-3 * b, "antiparallel": -a}[kind]
    out = slerp(t, a, b)
    assert out.shape == a.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out.double().flatten().numpy(), reference_slerp(t, a, b), rtol=1e-5, atol=1e-5)
    if kind != "random":  # the linear fallback
        assert torch.allclose(out, (1 - t) * a + t * b)
    assert torch.equal(slerp(1.0, a, b), b) and torch.equal(slerp(0.0, a, b), a)


def test_slerp_keeps_the_norm_of_independent_noises():
    a, b = torch.randn(2, 4, 32, 32, generator=seeded(0)[0])
    assert abs(float(slerp(0.5, a, b).std()) - 1) < 0.03  # a lerp would shrink it to ~0.71


def test_plain_starting_noise_is_initial_noise_bit_for_bit_and_keeps_the_generators_in_step():
    shape = (1, 4, 6, 5)
    for seeds in (Seeds(seeded(4, 5)), Seeds(seeded(4, 5), 99, 0.0, (6, 5))):
        reference = seeded(4, 5)
        assert torch.equal(starting_noise(shape, seeds), initial_noise(shape, reference))
        assert all(torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=r))
                   for g, r in zip(seeds.generators, reference, strict=True))


def test_variation_slerps_towards_the_variation_seed_per_image():
    shape = (1, 4, 6, 5)
    plain, other = initial_noise(shape, seeded(4, 5)), initial_noise(shape, seeded(70, 71))
    assert torch.equal(starting_noise(shape, Seeds(seeded(4, 5), 70, 1.0)), other)
    varied = starting_noise(shape, Seeds(seeded(4, 5), 70, 0.3))
    for i in range(2):
        assert torch.equal(varied[i:i + 1], slerp(0.3, plain[i:i + 1], other[i:i + 1]))


def test_seed_resize_centres_the_from_size_noise():
    shape, small = (1, 4, 8, 10), (1, 4, 4, 6)
    target, origin = initial_noise(shape, seeded(4)), initial_noise(small, seeded(4))
    grown = starting_noise(shape, Seeds(seeded(4), resize_from=(4, 6)))
    assert torch.equal(grown[..., 2:6, 2:8], origin)
    outside = torch.ones(8, 10, dtype=torch.bool)
    outside[2:6, 2:8] = False
    assert torch.equal(grown[..., outside], target[..., outside])
    shrunk = starting_noise(small, Seeds(seeded(4), resize_from=(8, 10)))
    assert torch.equal(shrunk, target[..., 2:6, 2:8])
    odd = starting_noise((1, 4, 4, 6), Seeds(seeded(4), resize_from=(5, 6)))  # A1111: rows 1..3 of 5 at rows 0..2
    assert torch.equal(odd[..., :3, :], initial_noise((1, 4, 5, 6), seeded(4))[..., 1:4, :])
    assert torch.equal(odd[..., 3, :], origin[..., 3, :])
    varied = starting_noise(shape, Seeds(seeded(4), 70, 0.4, (4, 6)))  # the slerp happens at the from-size
    assert torch.equal(varied[..., 2:6, 2:8], slerp(0.4, origin, initial_noise(small, seeded(70))))
