import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from nijimi.errors import ConfigError, ImageError, PromptError
from nijimi.eval.adherence import evaluate, format_table, parse_caption, score
from nijimi.eval.detector import detect
from nijimi.train.shapes import (
    COLOURS,
    CONCEPT_COLOURS,
    PAIRS,
    POSITIONS,
    SHAPES,
    Scene,
    Shape,
    ShapesDataset,
    caption_for,
    render,
    sample_captions,
)


def _read_back(dataset: ShapesDataset, count: int) -> dict[int, list[bool]]:
    results: dict[int, list[bool]] = {1: [], 2: []}
    for index in range(count):
        image, caption = dataset.item(index)
        results[len(parse_caption(caption))].append(score(image, caption).correct)
    return results


def test_detector_reads_back_generated_dataset() -> None:
    results = _read_back(ShapesDataset(seed=11, split="train"), 300)
    heldout = _read_back(ShapesDataset(seed=12, split="heldout"), 300)
    for n in (1, 2):
        judged = results[n] + heldout[n]
        assert len(judged) > 200
        assert sum(judged) / len(judged) >= 0.99, (n, sum(judged), len(judged))


def test_detection_recovers_exact_geometry() -> None:
    scene = Scene((Shape("orange", "star", "large", "top", 0.52, 0.26, 0.22),
                   Shape("purple", "triangle", "small", "bottom", 0.48, 0.76, 0.13)))
    found = detect(render(scene))
    assert [(d.colour, d.shape, d.size, d.position) for d in found] == [
        ("orange", "star", "large", "top"), ("purple", "triangle", "small", "bottom")]
    for d, obj in zip(found, scene.objects, strict=True):
        assert abs(d.cx - obj.cx) < 0.005 and abs(d.cy - obj.cy) < 0.005
        assert abs(d.radius / obj.radius - 1) < 0.03


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_features_match_the_geometry(shape: str) -> None:
    d = detect(render(Scene((Shape("green", shape, "large", "center", 0.5, 0.5, 0.22),)), 128))[0]
    fill, drop, solidity = {"circle": (np.pi / 4, 0.0, 1.0), "square": (1.0, 0.0, 1.0), "triangle": (0.5, 1 / 6, 1.0),
                            "star": (None, None, 0.556)}[shape]
    if fill is not None:
        assert abs(d.fill - fill) < 0.03 and abs(d.drop - drop) < 0.02
    assert abs(d.solidity - solidity) < 0.07  # pixel lattice: a star's hull takes in part of its outline
    assert d.shape == shape


def _other(options, value):
    return next(o for o in options if o != value)


def _wrong_captions(caption: str) -> dict[str, str]:
    specs = parse_caption(caption)
    first = specs[0]
    wrong = {
        "colour": dataclasses.replace(first, colour=_other(COLOURS, first.colour)),
        "shape": dataclasses.replace(first, shape=_other(SHAPES, first.shape)),
        "size": dataclasses.replace(first, size={"small": "large", "large": "small", None: None}[first.size]),
    }
    out = {k: caption_for((spec, *specs[1:]), 1) for k, spec in wrong.items() if spec != first}
    if len(specs) == 1:
        moved = dataclasses.replace(first, position=_other(POSITIONS, first.position))
        out["position"] = caption_for((moved,))
    elif (specs[0].colour, specs[0].shape) != (specs[1].colour, specs[1].shape):
        a, b = specs
        out["position"] = caption_for((dataclasses.replace(b, position=a.position),
                                       dataclasses.replace(a, position=b.position)))
        other_pair = _other(PAIRS, (a.position, b.position))
        out["position pair"] = caption_for((dataclasses.replace(a, position=other_pair[0]),
                                            dataclasses.replace(b, position=other_pair[1])))
    return out


def test_detector_rejects_wrong_captions() -> None:
    dataset = ShapesDataset(seed=13)
    checked = 0
    for index in range(60):
        image, caption = dataset.item(index)
        assert score(image, caption).correct
        for attribute, wrong in _wrong_captions(caption).items():
            verdict = score(image, wrong)
            assert not verdict.correct, (caption, wrong)
            assert getattr(verdict, attribute.split()[0]) is False, (attribute, wrong)
            checked += 1
    assert checked > 200


def test_count_is_judged() -> None:
    blank = np.full((64, 64, 3), 255, dtype=np.uint8)
    assert detect(blank) == []
    verdict = score(blank, "a small red circle in the center")
    assert (verdict.count, verdict.colour, verdict.correct) == (False, False, False)
    two = render(Scene((Shape("red", "circle", "small", "left", 0.25, 0.5, 0.13),
                        Shape("blue", "square", "small", "right", 0.75, 0.5, 0.13))))
    verdict = score(two, "a small red circle on the left")
    assert (verdict.colour, verdict.shape, verdict.size, verdict.position) == (True, True, True, True)
    assert (verdict.count, verdict.correct) == (False, False)
    verdict = score(two, "a red circle on the left and a blue square on the right")
    assert verdict.size is None and verdict.correct


def test_touching_objects_of_two_colours_are_split() -> None:
    image = render(Scene((Shape("red", "square", "large", "left", 0.4, 0.5, 0.22),
                          Shape("blue", "square", "large", "right", 0.6, 0.5, 0.22))))
    found = detect(image)
    assert sorted((d.colour, d.shape) for d in found) == [("blue", "square"), ("red", "square")]


def _degrade(image: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """Blur 0.7 px, rotate hues by up to ±6°, add noise of σ = 4 levels: a generative model's usual damage."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float64)
    angle = np.radians((torch.rand((), generator=generator).item() * 2 - 1) * 6)
    k = np.ones(3) / np.sqrt(3)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    noise = torch.randn(image.shape, generator=generator, dtype=torch.float64).numpy() * 4
    return np.clip(np.rint(blurred @ rotation.T + noise), 0, 255).astype(np.uint8)


def test_detector_is_robust_to_blur_noise_and_colour_drift() -> None:
    dataset = ShapesDataset(seed=14, split="heldout")
    generator = torch.Generator().manual_seed(0)
    correct = [score(_degrade(image, generator), caption).correct
               for image, caption in (dataset.item(i) for i in range(200))]
    assert sum(correct) >= 194


def test_every_image_form_reads_the_same() -> None:
    image, caption = ShapesDataset(seed=15).item(3)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    forms = [image, Image.fromarray(image), image.astype(np.float32) / 255, tensor]
    def summary(image_form) -> list[tuple]:
        return sorted((d.colour, d.shape, d.size, d.position, d.cx, d.cy, d.radius) for d in detect(image_form))

    reference = summary(image)
    for form in forms:
        found = summary(form)
        assert [d[:4] for d in found] == [d[:4] for d in reference]
        assert np.allclose([d[4:] for d in found], [d[4:] for d in reference], atol=1e-5)
    assert score(image, caption).correct
    with pytest.raises(ImageError, match=r"\(64, 64\)"):
        detect(np.zeros((64, 64)))
    with pytest.raises(PromptError):
        score(image, "a cat")


def _oracle(dataset: ShapesDataset, index_of: dict[str, int]):
    def generate(captions: list[str], seeds: list[int]) -> list[np.ndarray]:
        return [dataset.item(index_of[c])[0] for c in captions]

    return generate


def test_evaluate_perfect_and_blank_generators() -> None:
    dataset = ShapesDataset(seed=16, split="heldout")
    index_of = {dataset.caption(i): i for i in range(40)}
    captions = list(index_of)
    table = evaluate(_oracle(dataset, index_of), captions, batch_size=6)
    ones = sum(len(parse_caption(c)) == 1 for c in captions)
    assert table.counts == {"one object": ones, "two objects": len(captions) - ones, "all": len(captions)}
    assert all(v == 1.0 for row in table.rows.values() for v in row.values() if v is not None)

    seen: list[int] = []

    def blank(batch: list[str], seeds: list[int]) -> list[Image.Image]:
        seen.extend(seeds)
        return [Image.new("RGB", (64, 64), "white") for _ in batch]

    seeds = range(100, 100 + len(captions))
    table = evaluate(blank, captions, seeds=seeds, batch_size=16)
    assert seen == list(seeds)
    assert table.rows["all"] == {"colour": 0.0, "shape": 0.0, "size": 0.0, "position": 0.0, "count": 0.0,
                                 "caption": 0.0}


def test_evaluate_splits_attributes() -> None:
    captions = sample_captions(24, seed=3)

    def recolour(batch: list[str], seeds: list[int]) -> list[np.ndarray]:
        images = []
        for caption in batch:
            specs = parse_caption(caption)
            objects = tuple(Shape(_other(COLOURS, s.colour), s.shape, s.size or "large", s.position,
                                  *POSITIONS[s.position], 0.22 if s.size != "small" else 0.13) for s in specs)
            images.append(render(Scene(objects)))
        return images

    table = evaluate(recolour, captions)
    for group in ("one object", "two objects", "all"):
        assert table.rows[group]["colour"] == 0.0 and table.rows[group]["caption"] == 0.0
        assert table.rows[group]["shape"] == table.rows[group]["position"] == table.rows[group]["count"] == 1.0
    text = format_table(table)
    lines = text.splitlines()
    assert lines[0].split() == ["prompts", "n", "colour", "shape", "size", "position", "count", "caption"]
    assert lines[1].split() == ["one", "object", "12", "0.0%", "100.0%", "100.0%", "100.0%", "100.0%", "0.0%"]
    assert lines[3].startswith("all") and " 24 " in lines[3]


def test_evaluate_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="2 seeds"):
        evaluate(lambda c, s: [], ["a small red circle in the center"], seeds=[1, 2])
    with pytest.raises(ConfigError, match="returned 0 images for 1"):
        evaluate(lambda c, s: [], ["a small red circle in the center"])
    with pytest.raises(PromptError, match="a dog"):
        evaluate(lambda c, s: [], ["a dog"])


def test_concept_colour_is_read_with_its_palette() -> None:
    palette = {**COLOURS, **CONCEPT_COLOURS}
    captions = sample_captions(40, seed=5, concept="pink")
    assert all(parse_caption(c)[0].colour == "pink" for c in captions)
    assert all(s.colour != "pink" for c in captions for s in parse_caption(c)[1:])
    scene = Scene((Shape("pink", "star", "large", "left", 0.25, 0.5, 0.22),
                   Shape("blue", "circle", "small", "right", 0.75, 0.5, 0.13)))
    image = render(scene, colours=palette)
    caption = "a large pink star on the left and a small blue circle on the right"
    assert score(image, caption, palette=palette).correct
    plain = score(image, caption)  # the world's palette has no pink: the star reads as red or purple
    assert not plain.colour and plain.shape
    assert {d.colour for d in plain.detections} <= {"red", "purple", "blue"}
    with pytest.raises(ConfigError, match="unknown shapes concept 'teal'"):
        sample_captions(2, concept="teal")
