"""Captions of the shapes world: every template of both phrasings parses back, training captions cover what people
type, and the paraphrases are held out of training."""

import itertools
import re

import pytest
import torch

from nijimi.errors import ConfigError, PromptError
from nijimi.eval.adherence import parse_caption, phrasing_of
from nijimi.train.captions import (
    PARAPHRASE,
    PARAPHRASE_PLACES,
    PLACE_PHRASES,
    TEMPLATES,
    TRAINING,
    ShapeSpec,
    caption_for,
    place_phrases,
    templates,
)
from nijimi.train.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    sample_captions,
    sample_scene,
    split_of,
)

PHRASINGS = (TRAINING, PARAPHRASE)


def _every_one_object_caption(phrasing: str, spec: ShapeSpec) -> list[str]:
    count = len(place_phrases(phrasing, spec.position))
    return [caption_for((spec,), t, (p, 0), phrasing) for t in range(len(templates(phrasing, 1))) for p in range(count)]


def _every_two_object_caption(phrasing: str, specs: tuple[ShapeSpec, ShapeSpec]) -> list[str]:
    counts = [len(place_phrases(phrasing, s.position)) for s in specs]
    return [caption_for(specs, t, (p, q), phrasing) for t in range(len(templates(phrasing, 2)))
            for p in range(counts[0]) for q in range(counts[1])]


@pytest.mark.parametrize("phrasing", PHRASINGS)
def test_every_one_object_caption_parses_back_to_its_phrasing(phrasing: str) -> None:
    for colour, shape, size, position in itertools.product(COLOURS, SHAPES, (*SIZES, None), POSITIONS):
        spec = ShapeSpec(colour, shape, position, size)
        for caption in _every_one_object_caption(phrasing, spec):
            assert parse_caption(caption) == (spec,), caption
            assert phrasing_of(caption) == phrasing, caption


@pytest.mark.parametrize("phrasing", PHRASINGS)
def test_every_two_object_caption_parses_back_to_its_phrasing(phrasing: str) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        scene = sample_scene(generator, objects=2)
        for with_size in (True, False):
            specs = tuple(o.spec(with_size) for o in scene.objects)
            for caption in _every_two_object_caption(phrasing, specs):
                assert parse_caption(caption) == specs, caption
                assert phrasing_of(caption) == phrasing, caption


def test_training_captions_cover_what_people_type() -> None:
    dataset = ShapesDataset(seed=3, phrasing=TRAINING)
    captions = [dataset.caption(i) for i in range(3000)]
    assert {phrasing_of(c) for c in captions} == {TRAINING}
    ones = [c for c in captions if len(parse_caption(c)) == 1]
    sized = sum(parse_caption(c)[0].size is not None for c in ones)
    assert 0.4 < sized / len(ones) < 0.6  # a size for one object too, half the time
    assert all(len({s.size is None for s in parse_caption(c)}) == 1 for c in captions)  # both sizes or neither
    assert not any(re.search(r"\ba [aeiou]|\ban [^aeiou]", c) for c in captions)
    assert any(c.startswith("an orange ") for c in captions) and any(c.startswith("orange ") for c in captions)
    used = {p for place in PLACE_PHRASES.values() for p in place if any(p in c for c in captions)}
    assert used == {p for place in PLACE_PHRASES.values() for p in place}


def test_user_phrasings_parse() -> None:
    assert parse_caption("A green star in the center.") == (ShapeSpec("green", "star", "center"),)
    assert parse_caption("red circle on the left") == (ShapeSpec("red", "circle", "left"),)
    assert parse_caption("an orange square in the centre") == (ShapeSpec("orange", "square", "center"),)
    assert parse_caption("there is a small blue star near the top") == (ShapeSpec("blue", "star", "top", "small"),)
    assert parse_caption("a yellow square left of an orange circle") == (
        ShapeSpec("yellow", "square", "left"), ShapeSpec("orange", "circle", "right"))
    assert parse_caption("a red star under a blue circle") == (
        ShapeSpec("blue", "circle", "top"), ShapeSpec("red", "star", "bottom"))
    assert parse_caption("on the left is a red circle and near the right is a small green star") == (
        ShapeSpec("red", "circle", "left"), ShapeSpec("green", "star", "right", "small"))
    with pytest.raises(PromptError, match="not a shapes caption: 'a red circle on the upper left'"):
        parse_caption("a red circle on the upper left")


def test_caption_examples_in_both_phrasings() -> None:
    star = ShapeSpec("orange", "star", "center")
    assert caption_for((star,), 4, (2, 0)) == "orange star in the centre"
    assert caption_for((star,), 0, (9, 0), PARAPHRASE) == "at the centre there is an orange star"
    left, right = ShapeSpec("red", "circle", "left", "large"), ShapeSpec("blue", "square", "right", "small")
    assert caption_for((left, right), 3, (1, 0)) == "a small blue square right of a large red circle"
    assert caption_for((left, right), 1, (8, 10), PARAPHRASE) == (
        "on the left-hand side is a large red circle and on the right of the image is a small blue square")


def test_paraphrases_are_never_training_captions() -> None:
    """No training template writes a paraphrase, whatever its phrases: the parser tries every training template
    (with any article) first, and reads every paraphrase as one. The phrase lists and templates are disjoint too."""
    for place in POSITIONS:
        assert not set(PARAPHRASE_PLACES[place]) & {p for ps in PLACE_PHRASES.values() for p in ps}
    for objects in (0, 1):
        assert not set(TEMPLATES[TRAINING][objects]) & set(TEMPLATES[PARAPHRASE][objects])
    paraphrases = sample_captions(200, seed=2, split="train", phrasing=PARAPHRASE)
    assert {phrasing_of(c) for c in paraphrases} == {PARAPHRASE}
    training = {ShapesDataset(seed=2, phrasing=TRAINING).caption(i) for i in range(3000)}
    assert training.isdisjoint(paraphrases)
    for caption in paraphrases:  # nor any caption a training template could write for the same objects
        specs = parse_caption(caption)
        every = _every_one_object_caption(TRAINING, specs[0]) if len(specs) == 1 else \
            _every_two_object_caption(TRAINING, specs)
        assert caption not in every


def test_paraphrases_use_no_word_that_names_something_new() -> None:
    """Paraphrases add sentence words, never a colour, shape, size or place word that training lacks."""
    vocabulary = {w for c in sample_captions(2000, seed=4, split="train", phrasing=TRAINING)
                  for w in re.findall(r"[a-z]+", c)}
    new = {w for c in sample_captions(2000, seed=4, split="train", phrasing=PARAPHRASE)
           for w in re.findall(r"[a-z]+", c)} - vocabulary
    assert new == {"placed", "sitting", "sits", "with", "please", "draw", "two", "shapes", "next", "hand", "very",
                   "up", "down"}


def test_heldout_split_holds_in_paraphrases() -> None:
    assert all(split_of(parse_caption(c)) == "heldout" for c in sample_captions(200, phrasing=PARAPHRASE))
    assert sample_captions(10, seed=5, phrasing=PARAPHRASE) == sample_captions(10, seed=5, phrasing=PARAPHRASE)
    assert [len(parse_caption(c)) for c in sample_captions(6, phrasing=PARAPHRASE)] == [1, 2] * 3


def test_original_phrasing_repeats_the_first_recipes_captions() -> None:
    """What the shipped model learned, caption for caption (these are the first recipe's own)."""
    assert sample_captions(4, phrasing="original") == [
        "a small orange square near the top against a white background", "a green star to the right of a green square",
        "a small blue square on the left",
        "a large yellow star on the left side and a small purple triangle on the right side"]
    data = ShapesDataset(seed=1, phrasing="original")
    assert all(parse_caption(data.caption(i))[0].size for i in range(200) if len(data.scene(i).objects) == 1)
    with pytest.raises(ConfigError, match="shapes captions 'paraphrase': expected one of training, original"):
        ShapesDataset(phrasing="paraphrase")


def test_unknown_phrasing_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown caption phrasing 'formal'; expected one of training, paraphrase "
                                          r"\(or original for training data\)"):
        sample_captions(2, phrasing="formal")
