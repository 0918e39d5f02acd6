"""Do a model's per-word attention maps (DAAM, arXiv:2210.04885) put a colour word on the object of that colour?
``nijimi eval attention``.

For each two-object shapes caption with two colours (:func:`two_colour_captions`) the caller generates an image and
the raw map of each of its colour words; the detector (:func:`nijimi.eval.detector.find_objects`) finds the objects
of that colour in the *generated* image, and the word's concentration on them is

    ratio = (map mass inside the objects' mask / the map's total mass) / (mask area / image area),

1 for a map spread evenly over the image, above 1 when the word's attention sits on its object. An object the model
did not draw (no detected object of the word's colour) has no ratio and is counted apart.

Like :mod:`nijimi.eval.adherence`, the evaluator never sees a pipeline: the caller passes a function from a caption,
its colour words and a seed to the image and the words' maps.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from nijimi.errors import ConfigError
from nijimi.eval.adherence import parse_caption
from nijimi.eval.detector import Palette, find_objects
from nijimi.train.shapes import COLOURS, sample_captions

THRESHOLD = 3.0
"""The concentration the issue asks of a colour word's map on its object."""

MapsFn = Callable[[str, list[str], int], tuple[Image.Image, dict[str, np.ndarray]]]
"""``(caption, colour words, seed) → (image, {word: raw map (H, W)})``."""


@dataclass(frozen=True)
class WordOnObject:
    """One colour word of one caption: the ``ratio`` of its map's share inside the objects of its colour to their
    area share (None when no object of that colour was found in the image), and both shares."""

    caption: str
    colour: str
    ratio: float | None
    mass_share: float | None
    area_share: float | None


def two_colour_captions(count: int, seed: int = 0, split: str = "heldout") -> list[str]:
    """The first ``count`` two-object captions of ``split`` (:func:`~nijimi.train.shapes.sample_captions`) whose
    objects differ in colour, so that each colour word names one object."""
    captions: list[str] = []
    drawn = 0
    while len(captions) < count:
        batch = sample_captions(drawn + 4 * count, seed, split)[drawn:]
        drawn += len(batch)
        captions += [c for c in batch if len({spec.colour for spec in parse_caption(c)}) == 2]
    return captions[:count]


def concentration(word_map: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """(ratio, mass share, area share) of a map (H, W) ≥ 0 on a mask (H, W) bool of the same size (see the module
    docstring)."""
    if word_map.shape != mask.shape:
        raise ConfigError(f"map of shape {word_map.shape} does not fit the mask of shape {mask.shape}")
    total = float(word_map.sum())
    area = float(mask.mean())
    if total <= 0 or area == 0:
        raise ConfigError(f"cannot compare a map of mass {total} with a mask of area {area}")
    share = float(word_map[mask].sum()) / total
    return share / area, share, area


def measure(image: Image.Image, maps: dict[str, np.ndarray], caption: str, min_area: float = 0.006,
            palette: Palette = COLOURS) -> list[WordOnObject]:
    """The concentration of each colour word of ``caption`` on the objects of that colour found in ``image``."""
    objects = find_objects(image, min_area, palette)
    rows = []
    for colour in dict.fromkeys(spec.colour for spec in parse_caption(caption)):
        masks = [mask for shape, mask in objects if shape.colour == colour]
        if not masks:
            rows.append(WordOnObject(caption, colour, None, None, None))
            continue
        ratio, share, area = concentration(maps[colour], np.logical_or.reduce(masks))
        rows.append(WordOnObject(caption, colour, ratio, share, area))
    return rows


def evaluate_attention(maps_fn: MapsFn, captions: Sequence[str], seeds: Sequence[int] | None = None,
                       min_area: float = 0.006, palette: Palette = COLOURS) -> list[WordOnObject]:
    """:func:`measure` every caption's image and maps from ``maps_fn`` (seeds default to 0, 1, 2, …)."""
    seeds = list(range(len(captions))) if seeds is None else list(seeds)
    if len(seeds) != len(captions) or not captions:
        raise ConfigError(f"evaluate_attention needs ≥ 1 caption and one seed per caption; got {len(captions)} "
                          f"captions, {len(seeds)} seeds")
    rows: list[WordOnObject] = []
    for caption, seed in zip(captions, seeds, strict=True):
        colours = list(dict.fromkeys(spec.colour for spec in parse_caption(caption)))
        image, maps = maps_fn(caption, colours, seed)
        rows += measure(image, maps, caption, min_area, palette)
    return rows


def summary(rows: Sequence[WordOnObject]) -> dict[str, float | int | None]:
    """Counts of colour words and of those whose object was found; over the found ones the mean and median ratio
    and the fraction at or above :data:`THRESHOLD`."""
    ratios = [row.ratio for row in rows if row.ratio is not None]
    return {"words": len(rows), "found": len(ratios),
            "mean": statistics.fmean(ratios) if ratios else None,
            "median": statistics.median(ratios) if ratios else None,
            "at_least_3": sum(r >= THRESHOLD for r in ratios) / len(ratios) if ratios else None}


def format_summary(rows: Sequence[WordOnObject]) -> str:
    """The :func:`summary` as a small table."""
    s = summary(rows)
    number = "{:.2f}".format
    lines = [f"colour words        {s['words']}", f"objects found       {s['found']}"]
    if s["found"]:
        lines += [f"mean ratio          {number(s['mean'])}", f"median ratio        {number(s['median'])}",
                  f"ratio ≥ {THRESHOLD:g}         {100 * s['at_least_3']:.0f} %"]
    return "\n".join(lines)
