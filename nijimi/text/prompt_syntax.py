"""A1111's prompt grammar: one lexer, one syntax tree and one number grammar, for prompt editing and emphasis.

A prompt copied from stable-diffusion-webui (A1111) reads the same here; the rules restate A1111's own
(modules/prompt_parser.py, default settings) in our own code.

Tokens — ``lex``
    Text, ``BREAK`` (the whole word with the spaces around it), the escapes ``\\( \\) \\[ \\] \\\\``, a lone
    backslash, and ``( ) [ ] : |``. Joined, the tokens are the prompt again.
Prompt editing — ``parse``, ``prompt_schedule``
    The tree holds tokens, ``Weighted`` groups ``(x)`` ``[x]`` ``(x:1.2)``, ``Edit`` ``[from:to:when]`` ``[to:when]``
    ``[from::when]`` and ``Alternation`` ``[a|b|c]``, nested. A ``when`` written with a decimal point is a fraction of
    the steps, without one a step number; an alternation moves on every step. Inside brackets only text, escapes (a
    lone backslash escapes the next character) and well-formed groups may appear. At the top level a stray
    ``( ) [ ] :`` is text, while a stray ``|`` or a backslash ending a line puts the prompt outside the grammar: it is
    then used unchanged at every step, as A1111 does. Where A1111's grammar is ambiguous — a well-formed group next to
    unbalanced brackets or colons at the top level, e.g. ``(a)[b:3]:`` — its Earley parser (lark 1.1.2, the version
    A1111 pins) reads the group as text or not depending on the hash seed; nijimi always reads it as a group. Tag-list
    prompts with emoticons (``:)``, ``>:(``) and stray brackets agree.
Emphasis — ``parse_attention``
    ``(x)`` ×1.1, ``[x]`` ÷1.1, ``(x:1.3)`` ×1.3. A1111 pairs these brackets with two stacks, one per bracket kind,
    so they may cross (``[a (b] c)``) and the emphasis pass reads the tokens in order rather than the tree: a closer
    without opener is text, an opener never closed weights everything after it, an escape is its character and a
    lone backslash is dropped. ``BREAK`` outside brackets ends the 77-token chunk; inside them it is weighted and
    then just the word.
Composable ``AND`` — ``split_composable``
    Sub-prompts at the word ``AND``, each with a guidance weight ``:1.5`` at its end.
Numbers — ``NUMBER``
    ``1``, ``1.``, ``.5``, ``-1``, ``+2``; only a ``when`` may add an exponent (``1e-2``: lark's SIGNED_NUMBER).
    Digits and dots after a weight's colon that are no number, ``(x:1.2.3)``, raise PromptError (A1111 fails too).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from nijimi.errors import PromptError

NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)"
"""A1111's number (regular expression) for emphasis and guidance weights and, with an exponent, an edit's ``when``."""
BREAK_WEIGHT = -1.0
"""Weight that marks a ``BREAK`` piece in the output of ``parse_attention``."""

_TOKEN = re.compile(r"\\[()\[\]\\]|\\|[()\[\]:|]|[^\\()\[\]:|]+")
_BREAK = re.compile(r"(\s*\bBREAK\b\s*)")
_WHEN = re.compile(rf"\s*({NUMBER}(?:[eE][+-]?\d+)?)\s*")
_WEIGHT_DIGITS = re.compile(r"\s*([+-]?[.\d]+)\s*")
_GUIDANCE_WEIGHT = re.compile(rf"\s*:\s*({NUMBER})\s*$")
_COMPOSABLE_AND = re.compile(r"\bAND\b")
_OPENERS = {")": "(", "]": "["}
_FACTORS = {"(": 1.1, "[": 1 / 1.1}
"""The factor an emphasis bracket pair gives the text between them."""


def lex(prompt: str) -> list[str]:
    """The tokens of ``prompt`` (see the module docstring): ``"a (b) BREAK c"`` → ``["a ", "(", "b", ")", " BREAK ",
    "c"]``."""
    tokens = []
    for token in _TOKEN.findall(prompt):
        if token[0] in "\\()[]:|":
            tokens.append(token)
        else:
            tokens += [part for part in _BREAK.split(token) if part]
    return tokens


# ---- The syntax tree: tokens (str) and the three kinds of bracket group ----------------------------------------------


@dataclass(frozen=True)
class Weighted:
    """Emphasis brackets ``(…)`` or ``[…]`` (``bracket`` is the opener) around ``nodes``, a ``:weight`` included."""

    bracket: str
    nodes: list[Node]


@dataclass(frozen=True)
class Edit:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``; ``when`` is the number as written."""

    before: list[Node] | None
    after: list[Node]
    when: str


@dataclass(frozen=True)
class Alternation:
    """``[a|b|…]``: option ``(step - 1) % len(options)`` at ``step``."""

    options: list[list[Node]]


Node = str | Weighted | Edit | Alternation


class _Parser:
    """Recursive descent over A1111's prompt-editing grammar (its lark grammar), on tokens."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.groups: dict[int, tuple[Node, int] | None] = {}

    def at(self, i: int) -> str:
        return self.tokens[i] if i < len(self.tokens) else ""

    def prompt(self) -> list[Node] | None:
        """The top level, where a stray ``( ) [ ] :`` is text; None if the prompt is outside the grammar."""
        nodes, i = [], 0
        while i < len(self.tokens):
            sequence, j = self.sequence(i)
            nodes += sequence
            if self.at(j) in ("(", ")", "[", "]", ":"):
                nodes.append(self.tokens[j])
                j += 1
            elif j == i:
                return None
            i = j
        return nodes

    def sequence(self, i: int) -> tuple[list[Node], int]:
        """Text, escapes and well-formed groups from token ``i`` on, and the index of the token that ends them."""
        nodes: list[Node] = []
        while i < len(self.tokens):
            token = self.tokens[i]
            if token in ("(", "["):
                group = self.group(i)
                if group is None:
                    break
                nodes.append(group[0])
                i = group[1]
            elif token == "\\":
                if self.at(i + 1)[:1] in ("", "\n"):
                    break
                nodes += self.tokens[i : i + 2]
                i += 2
            elif token in (")", "]", ":", "|"):
                break
            else:
                nodes.append(token)
                i += 1
        return nodes, i

    def group(self, i: int) -> tuple[Node, int] | None:
        """The bracket group opening at token ``i`` and the index after it, or None if it is not well formed."""
        if i not in self.groups:
            self.groups[i] = self.round(i) if self.tokens[i] == "(" else self.square(i)
        return self.groups[i]

    def round(self, i: int) -> tuple[Node, int] | None:
        first, j = self.sequence(i + 1)
        if self.at(j) == ")":
            return Weighted("(", first), j + 1
        if self.at(j) != ":":
            return None
        second, k = self.sequence(j + 1)
        return (Weighted("(", [*first, ":", *second]), k + 1) if self.at(k) == ")" else None

    def square(self, i: int) -> tuple[Node, int] | None:
        first, j = self.sequence(i + 1)
        if self.at(j) == "]":
            return Weighted("[", first), j + 1
        if self.at(j) == "|":
            options = [first]
            while self.at(j) == "|":
                option, j = self.sequence(j + 1)
                options.append(option)
            return (Alternation(options), j + 1) if self.at(j) == "]" else None
        if self.at(j) != ":":
            return None
        if when := self.when(j + 1):
            return Edit(None, first, when), j + 3
        second, k = self.sequence(j + 1)
        when = self.when(k + 1) if self.at(k) == ":" else None
        return (Edit(first, second, when), k + 3) if when else None

    def when(self, i: int) -> str | None:
        """The number of token ``i`` if it is an edit's ``when`` (a ``]`` follows it)."""
        m = _WHEN.fullmatch(self.at(i))
        return m.group(1) if m and self.at(i + 1) == "]" else None


def parse(prompt: str) -> list[Node]:
    """The syntax tree of ``prompt``: ``"a [b:(c):0.5]"`` → ``["a ", Edit(["b"], [Weighted("(", ["c"])], "0.5")]``.

    A prompt outside the grammar, or nested deeper than Python's recursion limit, is its list of tokens.
    """
    tokens = lex(prompt)
    try:
        nodes = _Parser(tokens).prompt()
    except RecursionError:
        nodes = None
    return tokens if nodes is None else nodes


# ---- Prompt editing: the text at each step ---------------------------------------------------------------------------


def _edit_step(when: str, steps: int) -> int:
    """The last step of an edit's ``before`` text: decimal point → fraction of ``steps``, else a step number."""
    value = float(when) * (steps if "." in when else 1)
    if value >= steps:
        return steps
    return math.trunc(value) if value > -steps else -steps


def _switch_steps(nodes: list[Node], steps: int) -> set[int]:
    found: set[int] = set()
    for node in nodes:
        if isinstance(node, Edit):
            found |= {_edit_step(node.when, steps)} | _switch_steps((node.before or []) + node.after, steps)
        elif isinstance(node, Alternation):
            found |= set(range(1, steps + 1)).union(*(_switch_steps(option, steps) for option in node.options))
        elif isinstance(node, Weighted):
            found |= _switch_steps(node.nodes, steps)
    return found


def render(nodes: list[Node], step: int, steps: int) -> str:
    """The text of a syntax tree at 1-based ``step`` of ``steps``: edits and alternations resolved, all else as
    written."""
    parts = []
    for node in nodes:
        if isinstance(node, Edit):
            chosen = (node.before or []) if step <= _edit_step(node.when, steps) else node.after
            parts.append(render(chosen, step, steps))
        elif isinstance(node, Alternation):
            parts.append(render(node.options[(step - 1) % len(node.options)], step, steps))
        elif isinstance(node, Weighted):
            parts.append(node.bracket + render(node.nodes, step, steps) + ("]" if node.bracket == "[" else ")"))
        else:
            parts.append(node)
    return "".join(parts)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """The texts a prompt takes over ``steps`` sampling steps, as A1111's ``get_learned_conditioning_prompt_schedules``.

    Returns ``[(end_step, text), ...]`` in increasing ``end_step``; the last ``end_step`` is ``steps``. Text ``k`` is
    used while the 0-based denoiser step ``s`` satisfies ``s <= end_step`` (see ``prompt.schedule_index``). Example,
    10 steps: ``"a [b:c:0.5] d"`` → ``[(5, "a b d"), (10, "a c d")]``; ``"[x|y]"`` → ``[(1, "x"), (2, "y"), …]``.
    """
    if steps < 1:
        raise PromptError(f"steps must be at least 1 to schedule prompt {prompt!r}, got {steps}")
    nodes = parse(prompt)
    ends = sorted(end for end in _switch_steps(nodes, steps) | {steps} if end >= 1)
    return [(end, render(nodes, end, steps)) for end in ends]


# ---- Emphasis: the weight of each piece of text ----------------------------------------------------------------------


def _weighted_close(tokens: list[str], i: int, prompt: str) -> float | None:
    """The weight of A1111's weighted close ``:1.3)`` if one starts at token ``i``."""
    if tokens[i] != ":" or tokens[i + 2 : i + 3] != [")"] or not (m := _WEIGHT_DIGITS.fullmatch(tokens[i + 1])):
        return None
    if not re.fullmatch(NUMBER, m[1]):
        raise PromptError(f"bad emphasis weight {m[1]!r} in prompt {prompt!r}")
    return float(m[1])


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces the way A1111's ``parse_prompt_attention`` does.

    ``BREAK`` pieces come out as ``("BREAK", BREAK_WEIGHT)``; adjacent pieces of equal weight are merged. Example:
    ``"a (b:1.5) [c]"`` → ``[("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1/1.1)]``.
    """
    tokens = lex(text)
    pieces: list[list] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def close(bracket: str, factor: float | None = None) -> None:
        for piece in pieces[opened[bracket].pop() :]:
            piece[1] *= _FACTORS[bracket] if factor is None else factor

    i = 0
    while i < len(tokens):
        token = tokens[i]
        weight = _weighted_close(tokens, i, text) if opened["("] else None
        if weight is not None:
            close("(", weight)
            i += 2
        elif token in opened:
            opened[token].append(len(pieces))
        elif token in _OPENERS and opened[_OPENERS[token]]:
            close(_OPENERS[token])
        elif token.strip() == "BREAK":
            pieces += [["", 1.0], ["BREAK", BREAK_WEIGHT], ["", 1.0]]
        else:
            pieces.append([token[1:] if token[0] == "\\" else token, 1.0])
        i += 1
    for bracket in ("(", "["):  # A1111 applies the round brackets left open first
        while opened[bracket]:
            close(bracket)
    return _merge_equal_weights(pieces or [["", 1.0]])


def _merge_equal_weights(pieces: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def split_composable(prompt: str) -> list[tuple[str, float]]:
    """A1111's composable split of a positive prompt: sub-prompts at the word ``AND``, each with a guidance weight.

    ``"a cat :1.5"`` → ``[("a cat", 1.5)]``; ``"a AND b:0.5"`` → ``[("a", 1.0), (" b", 0.5)]``. Trailing whitespace
    is dropped as A1111 drops it. A1111 scales each sub-prompt's guidance term ``cond - uncond`` by its weight.
    """
    parts = []
    for sub in _COMPOSABLE_AND.split(prompt):
        m = _GUIDANCE_WEIGHT.search(sub)
        parts.append((sub[: m.start()], float(m.group(1))) if m else (sub.rstrip(), 1.0))
    return parts
