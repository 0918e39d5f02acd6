import hashlib
import itertools
import json
import math

import numpy as np
import pytest
import torch

from nijimi.errors import ConfigError, PromptError
from nijimi.eval.adherence import parse_caption
from nijimi.train.shapes import (
    COLOURS,
    GAP,
    PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    STAR_INNER,
    AnyColourShapes,
    Scene,
    Shape,
    ShapesDataset,
    ShapeSpec,
    caption_for,
    is_heldout,
    render,
    sample_captions,
    sample_scene,
    split_of,
    write_shapes_dataset,
)

# Area of each shape in units of circumradius², from elementary geometry.
AREA = {
    "circle": math.pi,
    "square": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "star": 5 * STAR_INNER * math.sin(math.radians(36)),
}


def _coverage(image: np.ndarray, colour: str) -> np.ndarray:
    """Per-pixel coverage of a single-colour object on white, from the channel where it differs most from white."""
    rgb = np.array(COLOURS[colour], dtype=np.float64)
    channel = int(np.argmax(255 - rgb))
    return (255.0 - image[..., channel]) / (255.0 - rgb[channel])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [64, 96])
def test_rendered_area_matches_geometry(shape: str, size: int) -> None:
    obj = Shape("blue", shape, "large", "center", 0.513, 0.493, 0.22)
    image = render(Scene((obj,)), size)
    area = _coverage(image.astype(np.float64), "blue").sum()
    expected = AREA[shape] * (0.22 * size) ** 2
    assert abs(area / expected - 1) < 0.012
    cy, cx = int(0.493 * size), int(0.513 * size)
    assert tuple(image[cy, cx]) == COLOURS["blue"]
    assert tuple(image[0, 0]) == (255, 255, 255)


def test_edges_are_antialiased() -> None:
    image = render(Scene((Shape("red", "circle", "large", "center", 0.5, 0.5, 0.22),)))
    coverage = _coverage(image.astype(np.float64), "red")
    partial = (coverage > 0.05) & (coverage < 0.95)
    # The partial pixels form a ring about one pixel wide around the circle: ≈ its perimeter 2πr.
    assert abs(partial.sum() - 2 * math.pi * 0.22 * 64) < 0.35 * 2 * math.pi * 0.22 * 64
    assert np.all(coverage[32, 20:44] > 0.99)


def test_triangle_apex_up_and_star_has_five_points() -> None:
    tri = _coverage(render(Scene((Shape("green", "triangle", "large", "center", 0.5, 0.5, 0.22),))).astype(float),
                    "green")
    rows = tri.sum(axis=1)
    top, bottom = np.nonzero(rows > 0.5)[0][[0, -1]]
    assert rows[top + 1] < rows[bottom - 1] / 4
    star = _coverage(render(Scene((Shape("green", "star", "large", "center", 0.5, 0.5, 0.22),)), 256).astype(float),
                     "green")
    angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    ring = star[(128 - 0.8 * 56 * np.cos(angles)).astype(int), (128 + 0.8 * 56 * np.sin(angles)).astype(int)] > 0.5
    assert int(np.sum(ring & ~np.roll(ring, 1))) == 5


def test_same_seed_same_bytes_and_other_seed_differs() -> None:
    a, b, c = ShapesDataset(seed=3), ShapesDataset(seed=3), ShapesDataset(seed=4)
    for index in (0, 7, 12345):
        image_a, caption_a = a.item(index)
        image_b, caption_b = b.item(index)
        assert caption_a == caption_b and image_a.tobytes() == image_b.tobytes()
    assert [a.caption(i) for i in range(20)] != [c.caption(i) for i in range(20)]
    # Index order does not matter: any index regenerates on its own.
    assert [a.caption(i) for i in (5, 4, 3)] == [b.caption(i) for i in (5, 4, 3)]


def test_dataset_tensor_range_and_shape() -> None:
    image, caption = ShapesDataset(size=48)[1]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert image.max().item() == 1.0 and image.min().item() >= -1.0
    assert torch.equal(image[:, 0, 0], torch.ones(3))
    assert isinstance(caption, str) and parse_caption(caption)


def test_scenes_never_overlap_and_stay_inside() -> None:
    for index in range(3000):
        scene = ShapesDataset(seed=1).scene(index)
        for obj in scene.objects:
            assert obj.radius == SIZES[obj.size]
            ax, ay = POSITIONS[obj.position]
            assert abs(obj.cx - ax) <= 0.025 and abs(obj.cy - ay) <= 0.025
            assert 0 <= obj.cx - obj.radius and obj.cx + obj.radius <= 1
            assert 0 <= obj.cy - obj.radius and obj.cy + obj.radius <= 1
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert (a.position, b.position) in PAIRS
            assert math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius + GAP


def test_rendered_two_object_scene_has_white_gap() -> None:
    a = Shape("red", "circle", "large", "left", 0.25, 0.5, 0.22)
    b = Shape("red", "circle", "large", "right", 0.75, 0.5, 0.22)
    image = render(Scene((a, b)))
    assert np.all(image[:, 30:34] == 255)
    assert tuple(image[32, 29]) == tuple(image[32, 34]) == COLOURS["red"]


def test_one_and_two_object_scenes_are_balanced() -> None:
    counts = [len(ShapesDataset(seed=2).scene(i).objects) for i in range(1000)]
    assert 430 < counts.count(1) < 570


def test_two_object_fraction_sets_the_mix_and_keeps_the_default_scenes() -> None:
    default, half, three_quarters = ShapesDataset(seed=2), ShapesDataset(seed=2, two_objects=0.5), \
        ShapesDataset(seed=2, two_objects=0.75)
    assert [half.caption(i) for i in range(20)] == [default.caption(i) for i in range(20)]
    counts = [len(three_quarters.scene(i).objects) for i in range(1000)]
    assert 700 < counts.count(2) < 800
    assert {len(ShapesDataset(seed=2, two_objects=1.0).scene(i).objects) for i in range(50)} == {2}
    with pytest.raises(ConfigError, match=r"two-object fraction must be in \[0, 1\], got 1.5"):
        ShapesDataset(two_objects=1.5)


@pytest.mark.parametrize("template", range(4))
def test_every_one_object_caption_parses_back(template: int) -> None:
    for colour, shape, size, position in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS):
        spec = ShapeSpec(colour, shape, position, size)
        for place in (0, 1):
            caption = caption_for((spec,), template, (place, 0))
            assert parse_caption(caption) == (spec,), caption


def test_two_object_captions_parse_back_in_every_phrasing() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        scene = sample_scene(generator, objects=2)
        for with_size, template, places in itertools.product((True, False), range(4), ((0, 1), (1, 0))):
            specs = tuple(o.spec(with_size) for o in scene.objects)
            assert parse_caption(caption_for(specs, template, places)) == specs


def test_caption_examples() -> None:
    red = ShapeSpec("red", "circle", "center", "large")
    assert caption_for((red,)) == "a large red circle in the center"
    green, yellow = ShapeSpec("green", "square", "left"), ShapeSpec("yellow", "star", "right")
    assert caption_for((green, yellow)) == "a green square on the left and a yellow star on the right"
    purple, orange = ShapeSpec("purple", "circle", "top"), ShapeSpec("orange", "triangle", "bottom")
    assert caption_for((purple, orange), template=2) == "a purple circle above an orange triangle"
    assert parse_caption("An orange triangle below a purple circle.") == (purple, orange)
    assert parse_caption("a small blue star at the top") == (ShapeSpec("blue", "star", "top", "small"),)


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle",
        "a large red hexagon in the center",
        "a red circle on the left and a blue star on the left",
        "a red circle in the center and a blue star at the top",
        "a big red circle on the left",
        "",
    ],
)
def test_parse_rejects_non_captions(caption: str) -> None:
    with pytest.raises(PromptError, match="caption"):
        parse_caption(caption)


def test_heldout_rule_covers_one_position_per_colour_and_shape() -> None:
    held = [t for t in itertools.product(COLOURS, SHAPES, POSITIONS) if is_heldout(*t)]
    assert len(held) == 24
    assert ("red", "circle", "left") in held and ("orange", "star", "center") in held
    for colour, shape in itertools.product(COLOURS, SHAPES):
        assert sum(is_heldout(colour, shape, p) for p in POSITIONS) == 1
    # Every colour and every shape is still trained at every position.
    for colour, position in itertools.product(COLOURS, POSITIONS):
        assert any(not is_heldout(colour, s, position) for s in SHAPES)


def test_heldout_captions_never_appear_in_training() -> None:
    train = {ShapesDataset(seed=0, split="train").caption(i) for i in range(3000)}
    heldout = set(sample_captions(1000, seed=0, split="heldout"))
    assert train.isdisjoint(heldout)
    assert all(split_of(parse_caption(c)) == "train" for c in train)
    assert all(split_of(parse_caption(c)) == "heldout" for c in heldout)
    assert len(heldout) > 700


def test_sample_captions_alternate_one_and_two_objects() -> None:
    captions = sample_captions(10, seed=5)
    assert [len(parse_caption(c)) for c in captions] == [1, 2] * 5
    assert captions == sample_captions(10, seed=5)


def test_bad_arguments_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="'test'"):
        ShapesDataset(split="test")
    with pytest.raises(ConfigError, match="3"):
        sample_scene(torch.Generator(), objects=3)
    with pytest.raises(ConfigError, match="'right', 'left'"):
        caption_for((ShapeSpec("red", "star", "right"), ShapeSpec("red", "star", "left")))
    with pytest.raises(IndexError):
        ShapesDataset(count=5)[5]


def test_write_shapes_dataset_is_deterministic(tmp_path) -> None:
    first = write_shapes_dataset(tmp_path / "a", count=12, seed=9)
    second = write_shapes_dataset(tmp_path / "b", count=12, seed=9)
    lines = (first / "captions.jsonl").read_text().splitlines()
    assert [json.loads(line)["file"] for line in lines] == [f"{i:05d}.png" for i in range(12)]
    dataset = ShapesDataset(seed=9)
    assert [json.loads(line)["caption"] for line in lines] == [dataset.caption(i) for i in range(12)]
    for name in ["captions.jsonl"] + [f"{i:05d}.png" for i in range(12)]:
        digest = [hashlib.sha256((folder / name).read_bytes()).hexdigest() for folder in (first, second)]
        assert digest[0] == digest[1]


def test_any_colour_shapes_recolour_objects_and_keep_the_geometry() -> None:
    shapes = ShapesDataset(size=32, seed=3, count=40)
    assert all(torch.equal(AnyColourShapes(shapes, 0.0)[i][0], shapes[i][0]) for i in range(5))
    recoloured = AnyColourShapes(shapes, 1.0)
    palette = {tuple(c) for c in COLOURS.values()}
    for i in range(10):
        image, caption = recoloured[i]
        assert caption == ""  # the scene's caption would name the palette colour
        assert torch.equal(image == 1.0, shapes[i][0] == 1.0)  # same background pixels: same shapes, same places
        pixels = {tuple(p) for p in ((image + 1) * 127.5).round().int().reshape(3, -1).T.tolist()}
        assert not pixels & palette
    assert torch.equal(recoloured[7][0], AnyColourShapes(shapes, 1.0)[7][0])  # deterministic per index
    half = AnyColourShapes(shapes, 0.5)
    same = sum(torch.equal(half[i][0], shapes[i][0]) for i in range(len(shapes)))
    assert 0 < same < len(shapes)
    with pytest.raises(ConfigError, match="probability"):
        AnyColourShapes(shapes, 1.5)
