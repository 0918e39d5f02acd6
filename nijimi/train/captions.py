"""The captions of the shapes world: what a caption asks of each object (:class:`ShapeSpec`), written out in plain
English (:func:`caption_for`) in one of three phrasings, and read back (:class:`CaptionReader`, behind
``nijimi.eval.adherence.parse_caption`` and ``phrasing_of``).

Phrasings (:data:`PHRASINGS`, and ``"original"`` for training data):
    ``"original"``    the first recipe's: the first four templates, two phrases per place, one per relation, and a
                      one-object caption always names its size — what the embedded model learned first.
    ``"training"``    wider training captions (``nijimi.train.shapes.describe`` with ``phrasing="training"``,
                      recipe key ``captions = "training"``), written to cover what people type: the size is
                      optional, "a"/"an", "one" or no article ("red circle on the left"), eight phrases for each
                      place ("in the center", "in the middle", "in the centre", "centered", "near the top", "on
                      top", "in the upper half", "to the left" …), three for each relation ("to the left of", "left
                      of", "above", "over", "on top of" …), and 21 sentence frames each for one and two objects
                      ("there is …", "a photo of …", "… located …", "…, white background" …).
    ``"paraphrase"``  held out of training, to test a model on phrasings it never saw: other sentence frames ("on the
                      left there is a red circle", "an image of …", "on the left is … and on the right is …", "… next
                      to …") and other place phrases ("on the left-hand side", "at the very top", "in the middle of
                      the image"), mixed with the training ones. They use the world's colour, shape, size and place
                      words and no others a model could not know; ``describe`` never writes them for training, and no
                      paraphrase caption is one a training template can write (:func:`phrasing_of`).

The parser is built from the same template tables, so every caption any phrasing writes parses back.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

from nijimi.errors import ConfigError, PromptError


@dataclass(frozen=True)
class ShapeSpec:
    """What a caption asks of one object; ``size`` is None when the caption does not say."""

    colour: str
    shape: str
    position: str
    size: str | None = None


TRAINING, PARAPHRASE, ORIGINAL = "training", "paraphrase", "original"
PHRASINGS: tuple[str, ...] = (TRAINING, PARAPHRASE)
"""The phrasings a model is evaluated in."""
DATA_PHRASINGS: tuple[str, ...] = (TRAINING, ORIGINAL)
"""The phrasings training data is captioned in: ``"original"`` is the first recipe's (the first four templates, two
phrases per place, one per relation, and always a one-object caption's size), which the embedded model learned first."""
PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
"""The places two objects of one scene take, first (left / top) and second."""

PLACE_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side", "at the left", "to the left", "at left", "on the left of the picture",
             "in the left half", "at the left side"),
    "right": ("on the right", "on the right side", "at the right", "to the right", "at right",
              "on the right of the picture", "in the right half", "at the right side"),
    "top": ("at the top", "near the top", "on top", "at the top of the image", "at top", "at the top of the picture",
            "in the top half", "in the upper half"),
    "bottom": ("at the bottom", "near the bottom", "on the bottom", "at the bottom of the image", "at bottom",
               "at the bottom of the picture", "in the bottom half", "in the lower half"),
    "center": ("in the center", "in the middle", "in the centre", "at the center", "in the center of the image",
               "in the middle of the picture", "in the centre of the picture", "centered"),
}
PARAPHRASE_PLACES: dict[str, tuple[str, ...]] = {
    "left": ("on the left-hand side", "near the left", "on the left of the image"),
    "right": ("on the right-hand side", "near the right", "on the right of the image"),
    "top": ("near the top of the image", "at the very top", "up at the top"),
    "bottom": ("near the bottom of the image", "at the very bottom", "down at the bottom"),
    "center": ("in the middle of the image", "at the centre", "in the very center"),
}
"""Place phrases of the paraphrase set only; its captions use these and :data:`PLACE_PHRASES`."""
RELATIONS: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("left", "right"): (("to the left of", "to the right of"), ("left of", "right of"),
                        ("on the left of", "on the right of")),
    ("top", "bottom"): (("above", "below"), ("over", "under"), ("on top of", "beneath")),
}
"""Per pair of places, the (before, after) words that relate its first object to its second and back."""

# Fields: {a} {b} the first (left/top) and second object with "a"/"an", {a0} {b0} without an article, {pa} {pb}
# their places, {before} {after} the relation of the first to the second and of the second to the first.
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    TRAINING: (
        ("{a} {pa}", "{pa}, {a}", "{a} drawn {pa}", "{a} {pa} against a white background", "{a0} {pa}",
         "there is {a} {pa}", "a picture of {a} {pa}", "{a} is {pa}", "a photo of {a} {pa}",
         "an illustration of {a} {pa}", "a drawing of {a} {pa}", "a simple picture of {a} {pa}", "{a} located {pa}",
         "{a} shown {pa}", "{a} appears {pa}", "{pa} is {a}", "{pa} you can see {a}", "one {a0} {pa}",
         "{a} {pa}, simple", "{a} {pa}, white background", "{a} {pa} on white"),
        ("{a} {pa} and {b} {pb}", "{b} {pb} and {a} {pa}", "{a} {before} {b}", "{b} {after} {a}",
         "{a0} {pa} and {b0} {pb}", "{a} {pa}, {b} {pb}", "there is {a} {before} {b}",
         "a picture of {a} {pa} and {b} {pb}", "{a0} {before} {b0}", "a photo of {a} {pa} and {b} {pb}",
         "an illustration of {a} {before} {b}", "a drawing of {b} {after} {a}", "{a} is {before} {b}",
         "{b} is {after} {a}", "{a} located {pa} and {b} located {pb}", "{pa}, {a}; {pb}, {b}",
         "{a} {pa}; {b} {pb}", "there is {a} {pa} and {b} {pb}", "{b} {pb}, {a} {pa}",
         "{a} {pa} and {b} {pb}, white background", "{a} {before} {b} on white"),
    ),
    PARAPHRASE: (
        ("{pa} there is {a}", "{a}, {pa}", "an image of {a} {pa}", "{a} placed {pa}", "{a} sitting {pa}",
         "{pa}: {a}", "a white background with {a} {pa}", "please draw {a} {pa}"),
        ("{pa} {a} and {pb} {b}", "{pa} is {a} and {pb} is {b}", "an image of {a} {before} {b}",
         "{a} placed {before} {b}", "two shapes: {a} {pa} and {b} {pb}", "{a} {pa} next to {b} {pb}",
         "{b} sits {after} {a}"),
    ),
}
"""Per phrasing, the one-object and the two-object templates."""


def _check_phrasing(phrasing: str) -> None:
    if phrasing not in (*PHRASINGS, ORIGINAL):
        raise ConfigError(f"unknown caption phrasing {phrasing!r}; expected one of {', '.join(PHRASINGS)} "
                          f"(or {ORIGINAL} for training data)")


def templates(phrasing: str, objects: int) -> tuple[str, ...]:
    """The templates of ``phrasing`` for one or two objects."""
    _check_phrasing(phrasing)
    return TEMPLATES[TRAINING][objects - 1][:4] if phrasing == ORIGINAL else TEMPLATES[phrasing][objects - 1]


def place_phrases(phrasing: str, place: str) -> tuple[str, ...]:
    """The phrases ``phrasing`` may write for ``place``: training's, and for paraphrases their own as well."""
    _check_phrasing(phrasing)
    if phrasing == ORIGINAL:
        return PLACE_PHRASES[place][:2]
    return PLACE_PHRASES[place] + (PARAPHRASE_PLACES[place] if phrasing == PARAPHRASE else ())


CHOICES = math.lcm(*(len(place_phrases(ph, place)) for ph in PHRASINGS for place in PLACE_PHRASES),
                   *(len(words) for words in RELATIONS.values()))
"""Range of the phrase indices :func:`nijimi.train.shapes.describe` draws: a multiple of every list's length."""


def _object_phrase(spec: ShapeSpec, article: bool = True) -> str:
    words = " ".join(w for w in (spec.size, spec.colour, spec.shape) if w)
    return (("an " if words[0] in "aeiou" else "a ") if article else "") + words


def caption_for(specs: tuple[ShapeSpec, ...], template: int = 0, places: tuple[int, ...] = (0, 0),
                phrasing: str = TRAINING) -> str:
    """Caption in plain English for one or two specs (two: first is left/top). ``template`` picks the template of
    ``phrasing``, ``places`` each object's place phrase (and, for two, ``places[0]`` the relation words), modulo
    the number there is."""
    phrases = [place_phrases(phrasing, s.position)[places[i] % len(place_phrases(phrasing, s.position))]
               for i, s in enumerate(specs)]
    chosen = templates(phrasing, min(len(specs), 2))
    fields = {"a": _object_phrase(specs[0]), "a0": _object_phrase(specs[0], False), "pa": phrases[0]}
    if len(specs) == 2 and (specs[0].position, specs[1].position) in PAIRS:
        words = RELATIONS[(specs[0].position, specs[1].position)][: 1 if phrasing == ORIGINAL else None]
        before, after = words[places[0] % len(words)]
        fields.update(b=_object_phrase(specs[1]), b0=_object_phrase(specs[1], False), pb=phrases[1],
                      before=before, after=after)
    elif len(specs) != 1:
        raise ConfigError(f"a shapes caption describes one object or two at {PAIRS}, got "
                          f"{[s.position for s in specs]}")
    return chosen[template % len(chosen)].format(**fields)


def _words(options: list[str]) -> str:
    return "(" + "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True)) + ")"


_OBJECT = r"(?:(?:a|an|one) )?(?:({size}) )?({colour}) ({shape})"
_BEFORE_OF = {words[0]: pair for pair, options in RELATIONS.items() for words in options}
_AFTER_OF = {words[1]: pair for pair, options in RELATIONS.items() for words in options}
_PLACE_OF = {p: place for place in PLACE_PHRASES for p in place_phrases(PARAPHRASE, place)}


def _compile(template: str, places: list[str], obj: str) -> tuple[re.Pattern, list[str]]:
    """A template as a regex, and the field each group belongs to (an object: size, colour, shape in three groups)."""
    parts, fields = [], []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field in ("a", "a0", "b", "b0"):
            parts.append(obj)
            fields += [field[0]] * 3
        elif field is not None:
            words = places if field in ("pa", "pb") else list(_BEFORE_OF if field == "before" else _AFTER_OF)
            parts.append(_words(words))
            fields.append(field)
    return re.compile("".join(parts)), fields


def _ordered(a: ShapeSpec, b: ShapeSpec, caption: str) -> tuple[ShapeSpec, ...]:
    if (a.position, b.position) in PAIRS:
        return (a, b)
    if (b.position, a.position) in PAIRS:
        return (b, a)
    raise PromptError(f"caption {caption!r} places two objects at {a.position} and {b.position}; "
                      f"expected left/right or top/bottom")


class CaptionReader:
    """Reads captions whose colours, shapes and sizes are the given words, in every template of every phrasing."""

    def __init__(self, colours: list[str], shapes: list[str], sizes: list[str]) -> None:
        obj = _OBJECT.format(size="|".join(sizes), colour="|".join(colours), shape="|".join(shapes))
        self.patterns: list[tuple[str, re.Pattern, list[str]]] = []
        for phrasing in PHRASINGS:  # training's first: a caption both could write counts as training's
            places = [p for place in PLACE_PHRASES for p in place_phrases(phrasing, place)]
            self.patterns += [(phrasing, *_compile(t, places, obj)) for group in TEMPLATES[phrasing] for t in group]

    def _fields(self, text: str) -> tuple[str, dict[str, list[str]]]:
        for phrasing, pattern, fields in self.patterns:
            if m := pattern.fullmatch(text):
                found: dict[str, list[str]] = {}
                for name, value in zip(fields, m.groups(), strict=True):
                    found.setdefault(name, []).append(value)
                return phrasing, found
        raise PromptError(f"not a shapes caption: {text!r}")

    def read(self, caption: str) -> tuple[str, tuple[ShapeSpec, ...]]:
        """(phrasing, specs) of ``caption``: the phrasing whose template matches (training's, when both could
        have written it) and one spec, or two ordered left→right / top→bottom. Case, surrounding space and a final
        period are ignored; anything no template writes raises :class:`PromptError`."""
        text = " ".join(caption.lower().strip().rstrip(".").split())
        phrasing, found = self._fields(text)
        objects = [found[k] for k in ("a", "b") if k in found]
        if "pa" in found:
            places = [_PLACE_OF[p] for p in (*found["pa"], *found.get("pb", []))]
        else:
            places = list(_BEFORE_OF[found["before"][0]] if "before" in found else _AFTER_OF[found["after"][0]])
        specs = [ShapeSpec(c, s, p, size or None) for (size, c, s), p in zip(objects, places, strict=True)]
        return phrasing, tuple(specs) if len(specs) == 1 else _ordered(*specs, caption)
