"""How well generated shapes images follow what was asked: captions parsed back into what they ask for
(:func:`parse_caption`), one image judged against its caption (:func:`score`, with the detector of
:mod:`nijimi.eval.detector`), a whole caption set (:func:`evaluate`, ``nijimi eval shapes``) and ControlNet adherence
to control masks (:func:`evaluate_control`, ``nijimi eval control``).

The evaluators never see a pipeline: the caller passes a function that makes images from captions (and maps) and seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from nijimi.errors import ConfigError
from nijimi.eval.detector import FoundShape, Palette, detect
from nijimi.train.captions import CaptionReader
from nijimi.train.controlnet import ControlPairs, scene_mask
from nijimi.train.shapes import COLOURS, CONCEPT_COLOURS, SHAPES, SIZES, ShapesDataset, ShapeSpec

_READER = CaptionReader([*COLOURS, *CONCEPT_COLOURS], list(SHAPES), list(SIZES))


def parse_caption(caption: str) -> tuple[ShapeSpec, ...]:
    """What a shapes caption asks for: one spec, or two ordered left→right / top→bottom.

    Accepts every phrasing ``caption_for`` writes, training's and the paraphrases (case, surrounding space and a
    final period are ignored).
    """
    return _READER.read(caption)[1]


def phrasing_of(caption: str) -> str:
    """Which phrasing of :mod:`nijimi.train.captions` wrote ``caption``: ``"training"`` when any training template
    could have, else ``"paraphrase"``; not a shapes caption: :class:`PromptError`."""
    return _READER.read(caption)[0]


def shape_coverage(image: np.ndarray) -> np.ndarray:
    """Per pixel of a uint8 RGB shapes image (H, W, 3), the coverage α in [0, 1] of the palette colour that explains
    it best as white mixed with it: least squares over RGB, ``α_c = ⟨255 − p, 255 − c⟩ / |255 − c|²``, for the colour
    ``c`` with the smallest residual. Exact on rendered scenes; tolerant of a generated image's colour drift."""
    depth = 255.0 - image.astype(np.float64)
    colours = 255.0 - np.array(list(COLOURS.values()), dtype=np.float64)
    alphas = depth @ colours.T / (colours**2).sum(axis=1)
    residual = ((depth[..., None, :] - alphas[..., None] * colours) ** 2).sum(axis=-1)
    best = np.take_along_axis(alphas, residual.argmin(axis=-1)[..., None], axis=-1)[..., 0]
    return np.clip(best, 0.0, 1.0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (H, W); 1 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position", "count")


@dataclass(frozen=True)
class Score:
    """Per-attribute verdicts for one image against one caption; ``size`` is None when the caption omits sizes."""

    colour: bool
    shape: bool
    size: bool | None
    position: bool
    count: bool
    correct: bool
    detections: tuple[FoundShape, ...] = field(default=(), repr=False)


def _agreement(spec: ShapeSpec, found: FoundShape) -> dict[str, bool | None]:
    return {
        "colour": spec.colour == found.colour,
        "shape": spec.shape == found.shape,
        "size": None if spec.size is None else spec.size == found.size,
        "position": spec.position == found.position,
    }


def _best_match(specs: tuple[ShapeSpec, ...], found: list[FoundShape]) -> list[dict[str, bool | None]]:
    """Per spec, its agreement with the detection assigned to it (the assignment agreeing most); misses disagree."""
    missing: dict[str, bool | None] = {"colour": False, "shape": False, "size": False, "position": False}
    best: list[dict[str, bool | None]] = []
    best_hits = -1
    candidates = found[: len(specs) + 2]
    for order in _assignments(len(specs), len(candidates)):
        rows = [missing if i is None else _agreement(s, candidates[i]) for s, i in zip(specs, order, strict=True)]
        hits = sum(v is True for row in rows for v in row.values())
        if hits > best_hits:
            best, best_hits = rows, hits
    return best


def _assignments(n_specs: int, n_found: int) -> list[tuple[int | None, ...]]:
    """Every injective map of specs to detections, unmatched specs as None (n_specs ≤ 2)."""
    options: list[int | None] = [*range(n_found), None]
    if n_specs == 1:
        return [(i,) for i in options]
    return [(i, j) for i in options for j in options if i is None or i != j]


def score(image: Image.Image | np.ndarray | torch.Tensor, caption: str, min_area: float = 0.006,
          palette: Palette = COLOURS) -> Score:
    """Judge ``image`` against a shapes ``caption``: each attribute right for every object, and the whole caption
    (colours read with ``palette``)."""
    specs = parse_caption(caption)
    found = detect(image, min_area, palette)
    rows = _best_match(specs, found)
    verdict: dict[str, bool | None] = {}
    for attribute in ("colour", "shape", "position"):
        verdict[attribute] = all(row[attribute] for row in rows)
    sizes = [row["size"] for row in rows if row["size"] is not None]
    verdict["size"] = all(sizes) if sizes else None
    verdict["count"] = len(found) == len(specs)
    correct = all(v is not False for v in verdict.values())
    return Score(**verdict, correct=correct, detections=tuple(found))


@dataclass(frozen=True)
class EvalTable:
    """Accuracies in [0, 1]: ``rows[group][attribute]`` for groups "one object", "two objects", "all";
    attributes ``ATTRIBUTES`` + "caption" (whole caption right). ``counts[group]`` = images judged
    (a size accuracy counts only captions that name sizes)."""

    rows: dict[str, dict[str, float | None]]
    counts: dict[str, int]


GenerateFn = Callable[[list[str], list[int]], Sequence[Image.Image | np.ndarray | torch.Tensor]]


def evaluate(generate_fn: GenerateFn, captions: Sequence[str], seeds: Sequence[int] | None = None,
             batch_size: int = 8, min_area: float = 0.006, palette: Palette = COLOURS) -> EvalTable:
    """Generate an image per caption with ``generate_fn(captions, seeds) → images`` in batches and score them
    (:func:`score` with ``palette``).

    ``seeds`` default to 0, 1, 2, …; the function never sees a pipeline, only captions and seeds.
    """
    seeds = list(range(len(captions))) if seeds is None else list(seeds)
    if len(seeds) != len(captions) or not captions or batch_size < 1:
        raise ConfigError(f"evaluate needs ≥ 1 caption, one seed per caption and batch_size ≥ 1; got "
                          f"{len(captions)} captions, {len(seeds)} seeds, batch_size {batch_size}")
    counts = [len(parse_caption(c)) for c in captions]
    scores: list[Score] = []
    for start in range(0, len(captions), batch_size):
        batch = list(captions[start : start + batch_size])
        images = generate_fn(batch, seeds[start : start + batch_size])
        if len(images) != len(batch):
            raise ConfigError(f"generate_fn returned {len(images)} images for {len(batch)} captions")
        scores += [score(image, c, min_area, palette) for c, image in zip(batch, images, strict=True)]
    groups = {"one object": [s for n, s in zip(counts, scores, strict=True) if n == 1],
              "two objects": [s for n, s in zip(counts, scores, strict=True) if n == 2], "all": scores}
    return EvalTable({g: _accuracies(s) for g, s in groups.items()}, {g: len(s) for g, s in groups.items()})


def accuracy(scores: Sequence[Score], attribute: str) -> float | None:
    """Share of ``scores`` with ``attribute`` right (``"correct"``: the whole caption); None if none was judged."""
    judged = [getattr(s, attribute) for s in scores if getattr(s, attribute) is not None]
    return sum(judged) / len(judged) if judged else None


def _accuracies(scores: list[Score]) -> dict[str, float | None]:
    return {"caption" if a == "correct" else a: accuracy(scores, a) for a in (*ATTRIBUTES, "correct")}


def _percent(value: float | None) -> str:
    return f"{'-':>8s}" if value is None else f"{100 * value:7.1f}%"


def format_table(table: EvalTable) -> str:
    """One plain-text table: a row per group, a column per attribute and the whole caption, percentages."""
    columns = (*ATTRIBUTES, "caption")
    lines = [f"{'prompts':<12s} {'n':>5s} " + " ".join(f"{c:>8s}" for c in columns)]
    for group, row in table.rows.items():
        cells = " ".join(_percent(row[c]) for c in columns)
        lines.append(f"{group:<12s} {table.counts[group]:>5d} {cells}")
    return "\n".join(lines)


ControlGenerateFn = Callable[[list[str], list[torch.Tensor], list[int]], Sequence[Image.Image]]


@dataclass(frozen=True)
class ControlEval:
    """How well generated images follow their control masks and captions: per image, the IoU of its objects
    (:func:`shape_coverage` ≥ ½) with the scene's silhouettes (:func:`scene_mask` ≥ ½), and the detector's verdicts
    (:func:`score`: colour, shape, size, position, count, whole caption)."""

    ious: tuple[float, ...]
    scores: tuple[Score, ...]

    @property
    def iou(self) -> float:
        """Mean IoU over the images."""
        return float(np.mean(self.ious))


def evaluate_control(generate_fn: ControlGenerateFn, pairs: ControlPairs, seeds: Sequence[int] | None = None,
                     batch_size: int = 8) -> ControlEval:
    """Generate an image per triple of ``pairs`` (over a :class:`ShapesDataset`, held-out scenes for a fair test)
    with ``generate_fn(captions, maps (1, 3, S, S), seeds) → images`` in batches, and judge each against its scene.

    ``seeds`` default to 0, 1, 2, …; the function never sees a pipeline, only captions, maps and seeds.
    """
    if not isinstance(pairs.data, ShapesDataset):
        raise ConfigError("evaluate_control needs shapes scenes (their geometry is the reference)")
    seeds = list(range(len(pairs))) if seeds is None else list(seeds)
    if len(seeds) != len(pairs) or batch_size < 1:
        raise ConfigError(f"evaluate_control needs one seed per example and batch_size ≥ 1; got {len(pairs)} "
                          f"examples, {len(seeds)} seeds, batch_size {batch_size}")
    ious, scores = [], []
    for start in range(0, len(pairs), batch_size):
        indices = range(start, min(start + batch_size, len(pairs)))
        triples = [pairs[i] for i in indices]
        images = generate_fn([c for _, c, _ in triples], [h[None] for _, _, h in triples], seeds[start:indices[-1] + 1])
        if len(images) != len(triples):
            raise ConfigError(f"generate_fn returned {len(images)} images for {len(triples)} captions")
        for i, (_, caption, _), image in zip(indices, triples, images, strict=True):
            target = scene_mask(pairs.data.scene(i), pairs.data.size) >= 0.5
            ious.append(mask_iou(shape_coverage(np.asarray(image.convert("RGB"))) >= 0.5, target))
            scores.append(score(image, caption))
    return ControlEval(tuple(ious), tuple(scores))


def format_control_table(result: ControlEval) -> str:
    """One plain-text table: images, mean IoU, then the detector's accuracies in percent."""
    row = _accuracies(list(result.scores))
    header = f"{'n':>5s} {'IoU':>6s} " + " ".join(f"{c:>8s}" for c in row)
    return f"{header}\n{len(result.ious):>5d} {result.iou:6.3f} " + " ".join(_percent(a) for a in row.values())
