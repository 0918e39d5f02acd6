"""The ``attention`` explain view: where did each word of the prompt go? DAAM's per-word cross-attention maps
(Tang et al. 2023, arXiv:2210.04885; collected by :mod:`nijimi.explain.daam`) over the generated image.

:func:`attention_maps` generates the request's first image with the maps recorded (the image is the one
``generate`` makes: the probes only read the attention) and returns the image and, per word, its map as a heat
overlay normalised to the word's own range (its minimum dark blue, its peak red, as DAAM draws them); ``info``
holds each word's raw map summary and the token mapping.
:func:`word_maps` is the same generation with the raw maps as arrays, for measuring them (``nijimi eval attention``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from nijimi.adapters.tags import parse_lora_tags
from nijimi.diffusion.samplers import StepInfo
from nijimi.errors import PromptError
from nijimi.explain.daam import AttentionRecorder, PromptWord, find_word, prompt_words
from nijimi.explain.panels import Explanation, Panel
from nijimi.io.embeddings import EmbeddingLibrary
from nijimi.pipelines.pipeline import Pipeline
from nijimi.pipelines.request import GenerationRequest
from nijimi.text.prompt_syntax import prompt_schedule, split_composable

PANEL_SIDE = 256
"""Panels of smaller images are enlarged (nearest neighbour, by a whole factor) to at least this side."""
GRID_COLUMNS = 4
"""Panels per row of the view's grid (``info["columns"]``): the image and three words."""
_HEAT = np.array([[0, 0, 0.5], [0, 0.3, 1], [0, 0.9, 0.9], [0.6, 1, 0.3], [1, 0.8, 0], [1, 0.1, 0]])
"""Colour stops of the heat map, low (dark blue) to high (red), as rows of RGB in [0, 1]."""


@dataclass(frozen=True)
class WordMaps:
    """A generation's image, its ``words`` (as asked, in order) with their raw DAAM maps (H, W) float32 ≥ 0 (summed
    over steps, layers, heads and the word's tokens), the prompt texts of its schedule with their words
    (``entries``), and how many cross-attention layer calls were recorded."""

    image: Image.Image
    maps: dict[str, np.ndarray]
    entries: list[tuple[str, list[PromptWord]]]
    calls: int


def _schedule_words(pipe: Pipeline, request: GenerationRequest) -> tuple[list[int], list[tuple[str, list[PromptWord]]]]:
    """The prompt schedule's end steps and, per entry, its text and words (LoRA tags removed; the request's
    textual-inversion embeddings, which have no words, refused when the prompt names one)."""
    text = parse_lora_tags(request.prompt)[0]
    parts = split_composable(text)
    schedule = prompt_schedule(parts[0][0] if len(parts) == 1 else text, request.steps)
    tokenizer, vocabulary = pipe.conditioner.tokenizer, None
    if request.embeddings_dir or request.embeddings:
        library = EmbeddingLibrary(request.embeddings_dir, request.embeddings, pipe.model.config.text.width)
        vocabulary = library.vocabulary(tokenizer)
    return [end for end, _ in schedule], [(t, prompt_words(t, tokenizer, vocabulary)) for _, t in schedule]


def _default_words(entries: list[tuple[str, list[PromptWord]]]) -> list[str]:
    """Every word of the prompt with a letter or digit in it, once each, in order."""
    return list(dict.fromkeys(w.text for _, words in entries for w in words if re.search(r"\w", w.text)))


def word_maps(pipe: Pipeline, request: GenerationRequest, words: Sequence[str] | None = None, *,
              callback: Callable[[StepInfo], None] | None = None) -> WordMaps:
    """Generate the first image of ``request`` with ``pipe`` and return it with the raw DAAM map of each of
    ``words`` (default: every word of the prompt). A word the prompt (any text of its schedule) does not contain is
    a PromptError, before any work."""
    request = request.single(0)
    end_steps, entries = _schedule_words(pipe, request)
    tokenizer = pipe.conditioner.tokenizer
    wanted = _default_words(entries) if words is None else list(dict.fromkeys(words))
    for word in wanted:
        if not any(find_word(word, entry_words, tokenizer) for _, entry_words in entries):
            raise PromptError(f"word {word!r} is not in the prompt {request.prompt!r}")
    recorder = AttentionRecorder(pipe.model.unet, end_steps)
    with recorder.attached(pipe):
        gen = pipe.generate(request, callback=callback)
    image = gen.images[0]
    token_maps = recorder.maps((image.height, image.width))
    maps = {}
    for word in wanted:
        total = torch.zeros(image.height, image.width)
        for entry, (_, entry_words) in enumerate(entries):
            positions = list(find_word(word, entry_words, tokenizer))
            if positions and entry in token_maps:
                total += token_maps[entry][0, positions].sum(dim=0)
        maps[word] = total.numpy()
    return WordMaps(image, maps, entries, recorder.calls)


def heat_overlay(image: Image.Image, heat: np.ndarray) -> Image.Image:
    """``image`` half covered by ``heat`` (H, W) in [0, 1] drawn through the heat colours, enlarged to at least
    :data:`PANEL_SIDE` by a whole factor."""
    stops = np.linspace(0, 1, len(_HEAT))
    colours = np.stack([np.interp(np.clip(heat, 0, 1), stops, _HEAT[:, c]) for c in range(3)], axis=-1)
    base = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    mixed = Image.fromarray(np.round((0.5 * base + 0.5 * colours) * 255).astype(np.uint8))
    return _enlarged(mixed)


def _enlarged(image: Image.Image) -> Image.Image:
    factor = max(1, PANEL_SIDE // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _summary(raw: np.ndarray) -> dict[str, Any]:
    """A raw map's total mass and its peak: value and (x, y) pixel, and (x, y) as fractions of the image."""
    y, x = np.unravel_index(int(raw.argmax()), raw.shape)
    return {"mass": float(raw.sum()), "peak": float(raw.max()), "peak_xy": [int(x), int(y)],
            "peak_fraction": [round((x + 0.5) / raw.shape[1], 4), round((y + 0.5) / raw.shape[0], 4)]}


def _slug(word: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", word).strip("_") or "word"


def attention_maps(pipe: Pipeline, request: GenerationRequest, words: Sequence[str] | None = None, *,
                   callback: Callable[[StepInfo], None] | None = None) -> Explanation:
    """The ``attention`` view of ``request``'s first image (see the module docstring): panels ``image`` and, per
    word, ``word-<i>-<word>`` (the map normalised to [0, 1] over the image); ``info``: ``words`` (per word: raw
    ``mass``, ``peak``, ``peak_xy``, ``peak_fraction``, and ``share``, its mass over all listed words'),
    ``tokens`` (per prompt-schedule text: each word and its token positions), ``layer_calls``, ``size``."""
    result = word_maps(pipe, request, words, callback=callback)
    panels = [Panel("generated image", "image", _enlarged(result.image.convert("RGB")))]
    total = sum(float(m.sum()) for m in result.maps.values()) or 1.0
    summaries = {}
    for i, (word, raw) in enumerate(result.maps.items()):
        span = float(raw.max() - raw.min())
        panels.append(Panel(f"'{word}'", f"word-{i}-{_slug(word)}",
                            heat_overlay(result.image, (raw - raw.min()) / span if span > 0 else raw * 0)))
        summaries[word] = {**_summary(raw), "share": float(raw.sum()) / total}
    tokens = [{"text": text, "words": [{"word": w.text, "positions": list(w.positions)} for w in entry_words]}
              for text, entry_words in result.entries]
    info = {"words": summaries, "tokens": tokens, "layer_calls": result.calls,
            "size": [result.image.width, result.image.height], "columns": min(len(panels), GRID_COLUMNS)}
    return Explanation("attention", tuple(panels), info)
