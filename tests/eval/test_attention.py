"""The attention-map measure (nijimi.eval.attention): the concentration ratio, the detector's object masks on a
rendered scene, and the summary."""

from __future__ import annotations

import numpy as np
import pytest

from nijimi.errors import ConfigError
from nijimi.eval.adherence import parse_caption
from nijimi.eval.attention import (
    concentration,
    evaluate_attention,
    format_summary,
    measure,
    summary,
    two_colour_captions,
)
from nijimi.eval.detector import detect, find_objects
from nijimi.train.shapes import Scene, Shape, is_heldout, render, sample_captions

CAPTION = "a red circle on the left and a blue square on the right"
SCENE = Scene((Shape("red", "circle", "large", "left", 0.25, 0.5, 0.2),
               Shape("blue", "square", "small", "right", 0.75, 0.5, 0.13)))


def test_concentration_is_mass_share_over_area_share():
    mask = np.zeros((4, 5), dtype=bool)
    mask[:2, :2] = True  # 4 of 20 cells
    assert concentration(np.ones((4, 5)), mask) == pytest.approx((1.0, 0.2, 0.2))
    assert concentration(mask * 3.0, mask) == pytest.approx((5.0, 1.0, 0.2))
    with pytest.raises(ConfigError, match="does not fit the mask"):
        concentration(np.ones((4, 4)), mask)
    with pytest.raises(ConfigError, match="mass 0.0"):
        concentration(np.zeros((4, 5)), mask)


def test_object_masks_cover_the_drawn_objects():
    image = render(SCENE, 64)
    found = find_objects(image)
    assert [shape for shape, _ in found] == detect(image)
    by_colour = {shape.colour: mask for shape, mask in found}
    red_pixels = (image[..., 0] > 200) & (image[..., 2] < 100)
    assert set(by_colour) == {"red", "blue"}
    assert by_colour["red"][red_pixels].all() and not by_colour["red"][:, 40:].any()
    assert not by_colour["blue"][:, :32].any()


def test_measure_a_map_on_each_object_and_a_missing_colour():
    image = render(SCENE, 64)
    masks = {shape.colour: mask for shape, mask in find_objects(image)}
    maps = {"red": masks["red"].astype(float), "blue": np.ones((64, 64))}
    red, blue = measure(image, maps, CAPTION)
    assert (red.colour, blue.colour) == ("red", "blue")
    assert red.ratio == pytest.approx(1 / masks["red"].mean()) and red.mass_share == pytest.approx(1.0)
    assert blue.ratio == pytest.approx(1.0) and blue.area_share == pytest.approx(masks["blue"].mean())
    green = measure(image, {"green": np.ones((64, 64)), "blue": np.ones((64, 64))},
                    "a green circle on the left and a blue square on the right")
    assert green[0].colour == "green" and green[0].ratio is None


def test_evaluate_and_summarise():
    image = render(SCENE, 64)
    masks = {shape.colour: mask for shape, mask in find_objects(image)}
    calls = []

    def maps_fn(caption, words, seed):
        calls.append((caption, words, seed))
        return image, {"red": masks["red"] + 0.0, "blue": np.ones((64, 64))}

    rows = evaluate_attention(maps_fn, [CAPTION], seeds=[7])
    assert calls == [(CAPTION, ["red", "blue"], 7)]
    s = summary(rows)
    assert s["words"] == s["found"] == 2 and s["at_least_3"] == 0.5
    assert s["median"] == pytest.approx((1 + 1 / masks["red"].mean()) / 2)
    assert "ratio ≥ 3         50 %" in format_summary(rows)
    assert summary([]) == {"words": 0, "found": 0, "mean": None, "median": None, "at_least_3": None}
    with pytest.raises(ConfigError, match="one seed per caption"):
        evaluate_attention(maps_fn, [CAPTION], seeds=[1, 2])


def test_two_colour_captions_are_held_out_two_object_captions_in_order():
    captions = two_colour_captions(5, seed=2)
    specs = [parse_caption(c) for c in captions]
    assert len(captions) == 5 and all(len(s) == 2 and s[0].colour != s[1].colour for s in specs)
    assert all(any(is_heldout(o.colour, o.shape, o.position) for o in s) for s in specs)
    pool = sample_captions(40, seed=2)
    assert [pool.index(c) for c in captions] == sorted(pool.index(c) for c in captions)
