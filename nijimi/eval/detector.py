"""A hand-written detector for the shapes world: the objects in an image (:class:`FoundShape`), for scoring
images against captions (:mod:`nijimi.eval.adherence`).

No learning: every rule comes from how ``nijimi.train.shapes`` draws its scenes.

1. Foreground: chroma ``max(R,G,B) − min(R,G,B)``. Mixing a colour with white keeps its hue and scales its chroma, so
   per pixel the nearest of the six hues names the colour and ``(chroma − floor) / (chroma(colour) − floor)`` is its
   coverage α, where the floor is the median chroma (the background's, which cancels what noise adds). The nearest-hue
   rule leaves ±11° between orange and yellow for a generated image's colour drift.
2. Objects: 8-connected components of the pixels with α ≥ ½, coloured by their chroma-weighted majority hue; a
   component holding two single-colour connected parts of ``min_area`` each (touching objects) is split into them.
   Components smaller than ``min_area`` are noise. An object's soft mask is its component grown by one pixel,
   weighted by α, so anti-aliased and blurred edges count towards its area.
3. Shape: the nearest prototype over four numbers (prototypes measured on rendered shapes, sharp to 1 px of blur):
   fill = area / (longest column × longest row of the soft mask): circle π/4, square 1, triangle and star ≈ 0.55;
   box fill = pixels / bounding box of the α ≥ ½ pixels: circle ≈ 0.78, square ≈ 1, triangle ≈ 0.55, star ≈ 0.45;
   drop = (centroid − bounding-box middle) / height: ≈ 0.15 for an apex-up triangle, ≈ 0.05 star, 0 circle/square;
   solidity = pixels / lattice points inside their convex hull: 1 for the convex shapes, ≈ 0.7 for a star.
   Fill uses sums of columns and rows, so noise on the outline barely moves it; box fill and drop resist blur.
4. Size: circumradius from area (area = k·r², k = π, 2, 3√3/4, 5·ρ·sin 36° for circle, square, triangle, star of
   inner ratio ρ), "large" above the geometric mean of the two sizes. Position: the nearest anchor to the centroid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from nijimi.errors import ImageError
from nijimi.train.shapes import COLOURS, POSITIONS, SIZES, STAR_INNER, Shape

_AREA_FACTOR = {
    "circle": math.pi,
    "square": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "star": 5 * STAR_INNER * math.sin(math.radians(36)),
}
# (fill, box fill, drop, solidity) of each drawn shape, and the distance in each that counts as one unit.
_PROTOTYPES = {
    "circle": (0.79, 0.78, 0.0, 1.0),
    "square": (1.0, 0.98, 0.0, 1.0),
    "triangle": (0.6, 0.57, 0.14, 1.0),
    "star": (0.6, 0.47, 0.05, 0.72),
}
_FEATURE_SCALE = np.array([0.06, 0.08, 0.04, 0.08])
_SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of float RGB (..., 3) — the HSV hexcone formula."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360.0


Palette = dict[str, tuple[int, int, int]]
"""Colour names → RGB the detector chooses among (default the world's ``COLOURS``; an adapter demo adds its own)."""


def _palette_table(palette: Palette) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names, hues (degrees) and chromas of a palette's colours."""
    rgb = np.array(list(palette.values()), dtype=np.float64)
    return list(palette), _hue(rgb), rgb.max(axis=1) - rgb.min(axis=1)


@dataclass(frozen=True)
class FoundShape(Shape):
    """A :class:`~nijimi.train.shapes.Shape` found in an image, with the measures that classified it."""

    fill: float
    box_fill: float
    drop: float
    solidity: float


def as_rgb(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """Any image form the evaluator accepts → float64 (H, W, 3) in 0..255.

    PIL image; uint8 array (H, W, 3); float array (H, W, 3) in [0, 1]; tensor (3, H, W) in [-1, 1].
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ImageError(f"expected an image tensor (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        return ((image.detach().double().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"expected an RGB array (H, W, 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    return np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool mask (H, W) → (labels (H, W), -1 outside, count), by min-label propagation."""
    h, w = mask.shape
    none = h * w
    labels = np.where(mask, np.arange(none).reshape(h, w), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        smallest = labels.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(smallest, padded[dy : dy + h, dx : dx + w], out=smallest)
        smallest = np.where(mask, smallest, none)
        flat = smallest.ravel()
        inside = flat < none
        flat[inside] = flat[flat[inside]]
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    roots, dense = np.unique(labels[mask], return_inverse=True)
    out = np.full((h, w), -1, dtype=np.int64)
    out[mask] = dense
    return out, len(roots)


def _hull_lattice_count(ys: np.ndarray, xs: np.ndarray) -> int:
    """Number of integer points inside the convex hull of the points (ys, xs) (Andrew's monotone chain over the
    leftmost and rightmost point of each row, which span the same hull)."""
    rows = np.unique(ys)
    left = np.full(ys.max() + 1, xs.max() + 1)
    right = np.full(ys.max() + 1, -1)
    np.minimum.at(left, ys, xs)
    np.maximum.at(right, ys, xs)
    points = sorted({(int(left[r]), int(r)) for r in rows} | {(int(right[r]), int(r)) for r in rows})
    if len(points) < 3:
        return len(points)

    def half(seq: list[tuple[int, int]]) -> list[tuple[int, int]]:
        chain: list[tuple[int, int]] = []
        for p in seq:
            while len(chain) >= 2 and (
                (chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])
            ) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(points) + half(points[::-1]), dtype=np.float64)
    gx, gy = np.meshgrid(np.arange(xs.min(), xs.max() + 1), np.arange(ys.min(), ys.max() + 1))
    inside = np.ones(gx.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(hull, np.roll(hull, -1, axis=0), strict=True):
        inside &= (x1 - x0) * (gy - y0) - (y1 - y0) * (gx - x0) >= -1e-9
    return int(inside.sum())


def _classify(*features: float) -> str:
    """The shape whose prototype (fill, box fill, drop, solidity) is nearest, in ``_FEATURE_SCALE`` units."""
    features = np.array(features) / _FEATURE_SCALE
    distance = {k: float(np.sum((features - np.array(p) / _FEATURE_SCALE) ** 2)) for k, p in _PROTOTYPES.items()}
    return min(distance, key=distance.__getitem__)


def _measure(alpha: np.ndarray, core: np.ndarray, colour: str, origin: tuple[int, int],
             image_shape: tuple[int, int]) -> FoundShape:
    """Describe one object from its soft mask ``alpha`` (h, w) and its α ≥ ½ pixels ``core`` (h, w) bool, both cut
    from an image of ``image_shape`` (H, W) at ``origin`` (row, column)."""
    area = float(alpha.sum())
    yy = np.arange(alpha.shape[0]) + origin[0] + 0.5
    xx = np.arange(alpha.shape[1]) + origin[1] + 0.5
    cy = float(alpha.sum(axis=1) @ yy) / area
    cx = float(alpha.sum(axis=0) @ xx) / area
    ys, xs = np.nonzero(core)
    width, height = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
    middle = (ys.min() + ys.max() + 1) / 2 + origin[0]
    drop = float((cy - middle) / height)
    solidity = len(ys) / max(_hull_lattice_count(ys, xs), 1)
    fill = area / float(alpha.sum(axis=0).max() * alpha.sum(axis=1).max())
    box_fill = len(ys) / float(width * height)
    shape = _classify(fill, box_fill, drop, solidity)
    radius = math.sqrt(area / _AREA_FACTOR[shape]) / image_shape[1]
    size = "large" if radius > _SIZE_THRESHOLD else "small"
    x, y = cx / image_shape[1], cy / image_shape[0]
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)
    return FoundShape(colour, shape, size, position, x, y, radius, fill, box_fill, drop, solidity)


def _grow(mask: np.ndarray) -> np.ndarray:
    """3×3 dilation of a bool mask (H, W)."""
    h, w = mask.shape
    padded = np.pad(mask, 1)
    return np.logical_or.reduce([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])


def _single_colour_parts(core: np.ndarray, nearest: np.ndarray, chroma: np.ndarray, min_pixels: float,
                         colours: int) -> list[tuple[np.ndarray, int]]:
    """Split one foreground component (H, W) bool into (part, colour index): itself with its chroma-weighted majority
    colour, unless it holds two or more single-colour connected parts of ``min_pixels`` each (touching objects)."""
    pixels = np.bincount(nearest[core], minlength=colours)
    parts = []
    for colour in np.nonzero(pixels >= min_pixels)[0] if np.sum(pixels >= min_pixels) >= 2 else []:
        labels, count = _components(core & (nearest == colour))
        parts += [(labels == k, int(colour)) for k in range(count) if np.sum(labels == k) >= min_pixels]
    if len(parts) >= 2:
        return parts
    votes = np.bincount(nearest[core], weights=chroma[core], minlength=colours)
    return [(core, int(votes.argmax()))]


def detect(image: Image.Image | np.ndarray | torch.Tensor, min_area: float = 0.006,
           palette: Palette = COLOURS) -> list[FoundShape]:
    """Objects in a shapes image, largest first; ``min_area`` is the smallest object as a fraction of the image area;
    each object's colour is the nearest hue of ``palette``.

    ``image``: anything ``as_rgb`` takes (H, W, 3) / (3, H, W). The median chroma (the background's: objects cover
    under a third of a shapes image) is taken as zero coverage, which cancels the chroma that noise adds.
    """
    return [shape for shape, _ in find_objects(image, min_area, palette)]


def find_objects(image: Image.Image | np.ndarray | torch.Tensor, min_area: float = 0.006,
                 palette: Palette = COLOURS) -> list[tuple[FoundShape, np.ndarray]]:
    """:func:`detect`'s objects, each with its mask: (H, W) bool, the pixels of its soft mask (its α ≥ ½ pixels
    grown by one, where its colour covers them at all)."""
    rgb = as_rgb(image)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    floor = float(np.median(chroma))
    hue = _hue(rgb)
    names, hues, chromas = _palette_table(palette)
    nearest = np.stack([np.abs((hue - h + 180.0) % 360.0 - 180.0) for h in hues]).argmin(axis=0)
    full = np.maximum(chromas - floor, 1.0) + floor
    coverage = np.clip((chroma - floor) / (full[nearest] - floor), 0.0, 1.0)
    labels, count = _components(coverage >= 0.5)
    found = []
    for label in range(count):
        parts = _single_colour_parts(labels == label, nearest, chroma, min_area * chroma.size, len(names))
        for core, colour in parts:
            ys, xs = np.nonzero(core)
            if len(ys) < min_area * chroma.size / 4:
                continue
            top, left = max(ys.min() - 1, 0), max(xs.min() - 1, 0)
            window = slice(top, ys.max() + 2), slice(left, xs.max() + 2)
            grown = _grow(core[window]) if len(parts) == 1 else _grow(core[window]) & (nearest[window] == colour)
            soft = np.where(grown, np.clip((chroma[window] - floor) / (full[colour] - floor), 0.0, 1.0), 0.0)
            if soft.sum() >= min_area * chroma.size:
                mask = np.zeros(chroma.shape, dtype=bool)
                mask[window] = soft > 0
                found.append((soft.sum(), _measure(soft, core[window], names[colour], (top, left), chroma.shape), mask))
    return [(shape, mask) for _, shape, mask in sorted(found, key=lambda t: -t[0])]
