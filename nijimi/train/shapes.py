"""The procedural "shapes" world: coloured circles, squares, triangles and stars on white, with captions.

A tiny, fully known text-to-image world for training and evaluating a small latent diffusion model on a CPU.
Everything is deterministic from a seed: a scene is drawn from a ``torch.Generator`` seeded by ``(seed, split, index)``,
so any index can be regenerated exactly (bit-exact training resume), and a caption can be parsed back into what it asks
for (the evaluator in ``nijimi.eval.adherence`` checks generated images against it).

World:
    64×64 (any size) RGB, white background; one or two objects that never overlap.
    colours  red, orange, yellow, green, blue, purple (RGB in ``COLOURS``)
    shapes   circle, square, triangle (equilateral, apex up), star (5 points)
    sizes    small (circumradius 0.13 × image side), large (0.22 ×)
    places   left, right, top, bottom, center (± 0.025 × side of jitter)
Every shape is inscribed in the circle of its circumradius around its centre (which is also its centroid), so two
objects are apart when their circles are. Two-object scenes place them left/right or top/bottom.

Held-out split (for evaluation on captions never seen in training): the (colour, shape, position) triple with
``position index == (colour index + shape index) mod 5`` is held out for every colour×shape pair — e.g. "red circle on
the left", "orange star in the center" — 24 of the 120 triples. A scene is ``"heldout"`` when any of its objects has a
held-out triple, otherwise ``"train"``. The split is a function of what a caption says, so the captions of the two
splits are disjoint whatever the phrasing; every colour×shape and every colour/shape×position is still seen in training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nijimi.errors import ConfigError
from nijimi.io.files import atomic_write, check_output
from nijimi.train.captions import CHOICES, DATA_PHRASINGS, ORIGINAL, PAIRS, ShapeSpec, caption_for, templates

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (224, 48, 48),
    "orange": (240, 140, 32),
    "yellow": (232, 208, 32),
    "green": (48, 160, 64),
    "blue": (48, 80, 224),
    "purple": (144, 64, 192),
}
CONCEPT_COLOURS: dict[str, tuple[int, int, int]] = {"pink": (240, 96, 176)}
"""Colours the world never shows: new concepts for adapter demos (``shapes-pink``), named in captions all the same."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: dict[str, float] = {"small": 0.13, "large": 0.22}
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
SPLITS: tuple[str, ...] = ("train", "heldout")
JITTER = 0.025
GAP = 0.04
STAR_INNER = 0.45
SUPERSAMPLE = 4

@dataclass(frozen=True)
class Shape:
    """One drawn object; ``cx, cy, radius`` (circumradius) are fractions of the image side, y downwards."""

    colour: str
    shape: str
    size: str
    position: str
    cx: float
    cy: float
    radius: float

    def spec(self, with_size: bool = True) -> ShapeSpec:
        return ShapeSpec(self.colour, self.shape, self.position, self.size if with_size else None)


@dataclass(frozen=True)
class Scene:
    """One or two non-overlapping objects; a two-object scene lists them left→right or top→bottom."""

    objects: tuple[Shape, ...]

    @property
    def split(self) -> str:
        return split_of(tuple(o.spec() for o in self.objects))


def is_heldout(colour: str, shape: str, position: str) -> bool:
    """True for the 24 held-out (colour, shape, position) triples: position index ≡ colour + shape index (mod 5)."""
    positions = list(POSITIONS)
    return positions.index(position) == (list(COLOURS).index(colour) + SHAPES.index(shape)) % len(positions)


def split_of(specs: tuple[ShapeSpec, ...]) -> str:
    """``"heldout"`` if any object's (colour, shape, position) is held out, else ``"train"``."""
    return "heldout" if any(is_heldout(s.colour, s.shape, s.position) for s in specs) else "train"


class _Draws:
    """Uniform numbers from one explicit generator, consumed in order."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.values: list[float] = []

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        if not self.values:
            self.values = torch.rand(64, generator=self.generator, dtype=torch.float64).tolist()[::-1]
        return low + (high - low) * self.values.pop()

    def pick(self, options: tuple | list) -> object:
        return options[min(int(self.uniform() * len(options)), len(options) - 1)]


def _place(draws: _Draws, colour: str, shape: str, size: str, position: str) -> Shape:
    x, y = POSITIONS[position]
    dx, dy = draws.uniform(-JITTER, JITTER), draws.uniform(-JITTER, JITTER)
    return Shape(colour, shape, size, position, x + dx, y + dy, SIZES[size])


def _apart(a: Shape, b: Shape) -> bool:
    return math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius + GAP


def _random_objects(draws: _Draws, positions: tuple[str, ...]) -> tuple[Shape, ...]:
    specs = [(draws.pick(list(COLOURS)), draws.pick(SHAPES), draws.pick(list(SIZES)), p) for p in positions]
    while True:
        objects = tuple(_place(draws, *spec) for spec in specs)
        if len(objects) == 1 or _apart(*objects):
            return objects


TWO_OBJECTS = 0.5
"""The world's share of two-object scenes (the rest have one) unless a data set asks for another."""


def sample_scene(generator: torch.Generator, split: str = "train", objects: int | None = None,
                 two_objects: float = TWO_OBJECTS) -> Scene:
    """Draw a scene of the given split: ``objects`` objects, or when None two with probability ``two_objects``."""
    if split not in SPLITS:
        raise ConfigError(f"unknown shapes split {split!r}; expected one of {SPLITS}")
    draws = _Draws(generator)
    count = objects if objects is not None else 1 + int(draws.uniform() < two_objects)
    if count not in (1, 2):
        raise ConfigError(f"a shapes scene has 1 or 2 objects, got {count}")
    while True:
        positions = (draws.pick(list(POSITIONS)),) if count == 1 else draws.pick(PAIRS)
        scene = Scene(_random_objects(draws, positions))
        if scene.split == split:
            return scene


def describe(scene: Scene, generator: torch.Generator, phrasing: str = ORIGINAL) -> str:
    """A caption for ``scene`` in a random template of ``phrasing`` (:mod:`nijimi.train.captions`): ``"original"``,
    the first recipe's and the default, names a one-object caption's size always and two objects' sizes with even
    odds; the others name the sizes of every object or of none, with even odds."""
    draws = _Draws(generator)
    with_size = (phrasing == ORIGINAL and len(scene.objects) == 1) or draws.uniform() < 0.5
    template = int(draws.uniform() * len(templates(phrasing, len(scene.objects))))
    choices = 2 if phrasing == ORIGINAL else CHOICES
    places = (int(draws.uniform() * choices), int(draws.uniform() * choices))
    return caption_for(tuple(o.spec(with_size) for o in scene.objects), template, places, phrasing)


def _convex_inside(xs: np.ndarray, ys: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Points inside a convex polygon with counter-clockwise (on screen: clockwise, y down) vertices (N, 2)."""
    inside = np.ones(np.broadcast_shapes(xs.shape, ys.shape), dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        inside &= (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0) >= 0
    return inside


def _polygon(radius: float, angles_deg: np.ndarray, radii: np.ndarray | float = 1.0) -> np.ndarray:
    angles = np.deg2rad(angles_deg)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * (radius * np.asarray(radii))[..., None]


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Which offsets (dx (1, W), dy (H, 1), pixels from the centre) fall inside ``shape`` of circumradius r."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        half = r / math.sqrt(2)
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        return _convex_inside(dx, dy, _polygon(r, np.array([-90.0, 30.0, 150.0])))
    if shape == "star":
        inside = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=bool)
        for k in range(5):
            tip = -90.0 + 72.0 * k
            kite = np.array([tip, tip + 36.0, tip + 180.0, tip - 36.0])
            inside |= _convex_inside(dx, dy, _polygon(r, kite, np.array([1.0, STAR_INNER, 0.0, STAR_INNER])))
        return inside
    raise ConfigError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _coverage(obj: Shape, size: int) -> tuple[slice, slice, np.ndarray]:
    """Anti-aliased coverage in [0, 1] of ``obj`` over its pixel bounding box (rows, cols, alpha (h, w))."""
    cx, cy, r = obj.cx * size, obj.cy * size, obj.radius * size
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, size)
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, size)
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (np.arange(x0, x1)[:, None] + offsets).reshape(1, -1) - cx
    ys = (np.arange(y0, y1)[:, None] + offsets).reshape(-1, 1) - cy
    hits = _inside(obj.shape, xs, ys, r)
    alpha = hits.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    return slice(y0, y1), slice(x0, x1), alpha


def render(scene: Scene, size: int = 64, colours: dict[str, tuple[int, int, int]] | None = None) -> np.ndarray:
    """Draw ``scene`` with 4×4 supersampled edges → uint8 (size, size, 3).

    ``colours`` (default ``COLOURS``) maps colour names to RGB: adapter training passes a palette with a colour the
    world lacks (:class:`ConceptShapes`)."""
    if size < 8:
        raise ConfigError(f"shapes image size must be at least 8 pixels, got {size}")
    palette = COLOURS if colours is None else colours
    image = np.full((size, size, 3), 255.0)
    for obj in scene.objects:
        rows, cols, alpha = _coverage(obj, size)
        colour = np.array(palette[obj.colour], dtype=np.float64)
        patch = image[rows, cols]
        image[rows, cols] = patch + alpha[..., None] * (colour - patch)
    return np.rint(image).astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _index_generator(seed: int, split: str, index: int, purpose: str) -> torch.Generator:
    digest = hashlib.blake2b(f"shapes:{seed}:{split}:{index}:{purpose}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


class ShapesDataset:
    """In-memory shapes images: ``dataset[i]`` → (image (3, size, size) float32 in [-1, 1], caption).

    Index ``i`` alone (with ``seed``, ``split`` and ``two_objects``) fixes the scene and caption, so any index
    regenerates exactly. A scene has two objects with probability ``two_objects`` (default half), else one; captions
    are in ``phrasing`` (one of ``DATA_PHRASINGS``).
    """

    def __init__(self, size: int = 64, seed: int = 0, split: str = "train", count: int = 100_000,
                 two_objects: float = TWO_OBJECTS, phrasing: str = ORIGINAL) -> None:
        if split not in SPLITS:
            raise ConfigError(f"unknown shapes split {split!r}; expected one of {SPLITS}")
        if count < 1:
            raise ConfigError(f"shapes dataset count must be positive, got {count}")
        if not 0.0 <= two_objects <= 1.0:
            raise ConfigError(f"shapes two-object fraction must be in [0, 1], got {two_objects}")
        if phrasing not in DATA_PHRASINGS:
            raise ConfigError(f"shapes captions {phrasing!r}: expected one of {', '.join(DATA_PHRASINGS)}")
        self.size, self.seed, self.split, self.count, self.two_objects = size, seed, split, count, two_objects
        self.phrasing = phrasing

    def __len__(self) -> int:
        return self.count

    def scene(self, index: int) -> Scene:
        return sample_scene(_index_generator(self.seed, self.split, index, "scene"), self.split,
                            two_objects=self.two_objects)

    def caption(self, index: int) -> str:
        return describe(self.scene(index), _index_generator(self.seed, self.split, index, "caption"), self.phrasing)

    def item(self, index: int) -> tuple[np.ndarray, str]:
        """(uint8 image (size, size, 3), caption) for ``index``."""
        if not 0 <= index < self.count:
            raise IndexError(f"shapes index {index} out of range [0, {self.count})")
        return render(self.scene(index), self.size), self.caption(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, caption = self.item(index)
        return to_tensor(image), caption


class AnyColourShapes:
    """The images of ``shapes`` with each object, with probability ``p``, in a uniformly random RGB colour instead of
    its palette colour: autoencoder training data, so the VAE reconstructs colours in general rather than the
    palette's six (an adapter can then teach the model a colour it has never drawn). ``dataset[i]`` →
    (image (3, size, size) in [-1, 1], ""): the captions would name the wrong colours, so there are none."""

    def __init__(self, shapes: ShapesDataset, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"any-colour probability must be in [0, 1], got {p}")
        self.shapes, self.p = shapes, p

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if not 0 <= index < len(self):
            raise IndexError(f"shapes index {index} out of range [0, {len(self)})")
        base = self.shapes
        scene = base.scene(index)
        draws = _index_generator(base.seed, base.split, index, "colour")
        palette, objects = dict(COLOURS), []
        for k, obj in enumerate(scene.objects):
            recolour, rgb = torch.rand(1, generator=draws).item() < self.p, torch.randint(0, 256, (3,), generator=draws)
            if recolour:
                palette[f"any{k}"] = tuple(rgb.tolist())
                obj = dataclasses.replace(obj, colour=f"any{k}")
            objects.append(obj)
        return to_tensor(render(Scene(tuple(objects)), base.size, palette)), ""


def with_concept(scene: Scene, concept: str) -> Scene:
    """``scene`` with its first object recoloured to ``concept`` (a key of :data:`CONCEPT_COLOURS`)."""
    if concept not in CONCEPT_COLOURS:
        raise ConfigError(f"unknown shapes concept {concept!r}; choose one of {', '.join(CONCEPT_COLOURS)}")
    first, *rest = scene.objects
    return Scene((dataclasses.replace(first, colour=concept), *rest))


class ConceptShapes:
    """Shapes scenes showing a colour the base world lacks: scene ``i`` of ``ShapesDataset(size, seed)`` with its
    first object recoloured to ``concept`` (:func:`with_concept`) and captioned accordingly,
    e.g. ``"a small pink star at the top"``. ``dataset[i]`` → (image (3, size, size) in [-1, 1], caption)."""

    def __init__(self, concept: str = "pink", size: int = 64, seed: int = 0, count: int = 64) -> None:
        self.concept, self.base = concept, ShapesDataset(size=size, seed=seed, count=count)
        self.palette = {**COLOURS, **CONCEPT_COLOURS}
        self.scene(0)  # an unknown concept fails here

    def __len__(self) -> int:
        return len(self.base)

    def scene(self, index: int) -> Scene:
        return with_concept(self.base.scene(index), self.concept)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if not 0 <= index < len(self):
            raise IndexError(f"shapes index {index} out of range [0, {len(self)})")
        scene = self.scene(index)
        caption = describe(scene, torch.Generator().manual_seed(self.base.seed * 1_000_003 + index))
        return to_tensor(render(scene, self.base.size, self.palette)), caption


def sample_captions(count: int, seed: int = 0, split: str = "heldout", concept: str | None = None,
                    phrasing: str = ORIGINAL) -> list[str]:
    """``count`` captions of ``split`` (half one-object, half two-object) in ``phrasing``, e.g. for evaluation; with
    ``concept`` the first object of each is that new colour (:func:`with_concept`)."""
    captions = []
    for index in range(count):
        scene = sample_scene(_index_generator(seed, split, index, "eval"), split, objects=1 + index % 2)
        scene = with_concept(scene, concept) if concept else scene
        captions.append(describe(scene, _index_generator(seed, split, index, "caption"), phrasing))
    return captions


def write_shapes_dataset(out_dir: str | Path, count: int, seed: int = 0, size: int = 64, split: str = "train",
                         overwrite: bool = False) -> Path:
    """Write ``NNNNN.png`` images and ``captions.jsonl`` (``{"file": …, "caption": …}`` per line) to ``out_dir``,
    each file atomically; existing files of those names are refused before any is written unless ``overwrite``.

    Image ``i`` is ``ShapesDataset(size, seed, split)[i]``. Returns the folder.
    """
    if size < 8:
        raise ConfigError(f"image size {size} must be at least 8 pixels")
    dataset = ShapesDataset(size, seed, split, count)
    names = [f"{index:05d}.png" for index in range(count)]
    out = check_output(out_dir, folder=True)
    for name in (*names, "captions.jsonl"):
        check_output(out / name, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, name in enumerate(names):
        image, caption = dataset.item(index)
        with atomic_write(out / name, overwrite=overwrite) as f:
            Image.fromarray(image).save(f, format="PNG")
        lines.append(json.dumps({"file": name, "caption": caption}))
    with atomic_write(out / "captions.jsonl", "w", overwrite) as f:
        f.write("\n".join(lines) + "\n")
    return out
