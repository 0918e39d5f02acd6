"""AUTOMATIC1111 prompt syntax: emphasis, BREAK, prompt editing, alternation, long prompts.

A prompt copied from an image made with stable-diffusion-webui (A1111) gives the same conditioning here. The rules
below restate A1111's behaviour (modules/prompt_parser.py, modules/sd_hijack_clip.py, modules/sd_emphasis.py,
default settings) in our own code:

Emphasis — ``parse_attention``
    ``(x)`` ×1.1, ``((x))`` ×1.21, ``[x]`` ÷1.1, ``(x:1.3)`` ×1.3; ``\\( \\) \\[ \\] \\\\`` are the literal
    characters; any other lone backslash is dropped. A closing bracket without its opener is plain text; openers left
    unclosed at the end multiply everything after them. ``BREAK`` (a whole word, outside brackets) ends the current
    77-token chunk; inside brackets it is multiplied like text and then it is just the word "BREAK". Adjacent pieces
    of equal weight are merged.
Prompt editing — ``prompt_schedule``
    ``[from:to:when]``, ``[to:when]``, ``[from::when]``: a ``when`` written with a decimal point is a fraction of the
    steps, without one a step number (A1111's default; ``old_scheduling=True`` gives its legacy rule: < 1 fraction,
    ≥ 1 step). ``[a|b|c]`` alternates every step. They nest. A prompt that A1111's grammar rejects (a ``|`` outside
    ``[...]``, a backslash at the end of the prompt) is used unchanged at every step, as A1111 does.
    Where A1111's grammar is ambiguous — a well-formed group right next to unbalanced brackets or colons at the top
    level, e.g. ``(a)[b:3]:`` — its Earley parser (lark 1.1.2, the version A1111 pins) takes the group for plain text
    or not depending on the process's hash seed, so A1111 itself differs from run to run there; nijimi always reads a
    well-formed group as a group. Tag-list prompts with emoticons (``:)``, ``>:(``) and stray brackets agree.
Composable ``AND`` — ``split_composable``
    A1111 splits positive prompts on the word ``AND`` into separately denoised sub-prompts. nijimi does not implement
    that: a positive prompt containing ``AND`` raises ``PromptError`` in ``encode_prompt_schedule`` (negative prompts
    are plain text in A1111 too). A single prompt ending in ``:1.5`` is A1111's guidance weight and is honoured.
Long prompts — ``chunk_prompt``
    Token ids are cut into chunks of [BOS] + 75 + [EOS]; when a chunk is full and its last comma lies within the last
    20 tokens, the text after that comma moves to the next chunk. Each token carries its emphasis weight.
Emphasis on embeddings — ``apply_emphasis``
    A1111's "Original" mode: hidden states × per-token weight, then rescaled to the unweighted mean.
In a pipeline — ``encode_prompt_schedule``
    Once for the prompt and once (``negative=True``) for the negative prompt, then ``.at_step(i)`` with ``i`` counting
    denoiser calls from 0. A1111 schedules over ``2·steps`` for samplers that call the model twice per step (Heun,
    DPM2, DPM++ 2S a, DPM++ SDE). Textual-inversion embedding names in prompts are tokenized as plain words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from nijimi.errors import PromptError

CHUNK_TOKENS = 75
"""Prompt tokens per chunk; a chunk is [BOS] + 75 + [EOS] = 77 ids, CLIP's context length."""
COMMA_BACKTRACK = 20
"""A1111's default ``comma_padding_backtrack``: how far back a comma may be to end a full chunk early."""
BREAK_WEIGHT = -1.0
"""Weight that marks a ``BREAK`` piece in the output of ``parse_attention``."""

_ROUND = 1.1
_SQUARE = 1 / 1.1


class Tokenizer(Protocol):
    """What this module needs from a CLIP tokenizer (nijimi.text.tokenizer.ClipTokenizer fits)."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Emphasis: (word), [word], (word:1.3), escapes, BREAK
# ---------------------------------------------------------------------------------------------------------------------

_WEIGHTED_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_TEXT_RUN = re.compile(r"[^\\()\[\]:]+")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ESCAPABLE = "()[]\\"


def _attention_tokens(text: str) -> list[tuple[str, str]]:
    """Cut ``text`` into (kind, source text) tokens; kinds: literal, text, open(, open[, close), close], close:w."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            escaped = nxt if nxt and nxt in _ESCAPABLE else ""
            out.append(("literal", escaped))
            i += 1 + len(escaped)
        elif c in "([":
            out.append(("open" + c, c))
            i += 1
        elif c in ")]":
            out.append(("close" + c, c))
            i += 1
        elif c == ":":
            m = _WEIGHTED_CLOSE.match(text, i)
            out.append(("close:w", m.group(0)) if m else ("text", ":"))
            i = m.end() if m else i + 1
        else:
            m = _TEXT_RUN.match(text, i)
            out.append(("text", m.group(0)))
            i = m.end()
    return out


def _parse_weight(value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise PromptError(f"bad emphasis weight {value!r} in prompt {text!r}") from None


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces the way A1111's ``parse_prompt_attention`` does.

    ``BREAK`` pieces come out as ``("BREAK", BREAK_WEIGHT)``. Example:
    ``"a (b:1.5) [c]"`` → ``[("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1/1.1)]``.
    Raises PromptError for an unreadable weight such as ``(x:1.2.3)`` (A1111 fails there too).
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in res[start:]:
            piece[1] *= factor

    for kind, value in _attention_tokens(text):
        if kind == "literal":
            res.append([value, 1.0])
        elif kind == "open(":
            round_open.append(len(res))
        elif kind == "open[":
            square_open.append(len(res))
        elif kind == "close:w" and round_open:
            multiply_from(round_open.pop(), _parse_weight(_WEIGHTED_CLOSE.match(value).group(1), text))
        elif kind == "close)" and round_open:
            multiply_from(round_open.pop(), _ROUND)
        elif kind == "close]" and square_open:
            multiply_from(square_open.pop(), _SQUARE)
        else:
            for k, part in enumerate(_BREAK.split(value)):
                if k:
                    res.append(["BREAK", BREAK_WEIGHT])
                res.append([part, 1.0])
    for start in round_open:
        multiply_from(start, _ROUND)
    for start in square_open:
        multiply_from(start, _SQUARE)
    return _merge_equal_weights(res or [["", 1.0]])


def _merge_equal_weights(pieces: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


# ---------------------------------------------------------------------------------------------------------------------
# Prompt editing [from:to:when] and alternation [a|b]
# ---------------------------------------------------------------------------------------------------------------------

_NUMBER = r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?"
_WHEN_CLOSE = re.compile(rf"\s*({_NUMBER})\s*\]")
_SPECIAL = "[]():|\\"


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``."""

    before: list | None
    after: list
    when: str


@dataclass(frozen=True)
class _Alternate:
    """``[a|b|...]``: option ``(step - 1) % len(options)`` at ``step``."""

    options: list[list]


class _Unparsable(Exception):
    """The prompt is outside A1111's schedule grammar; it is then used unchanged."""


class _ScheduleParser:
    """Recursive descent over A1111's prompt-editing grammar.

    A parsed prompt is a list of nodes: ``str`` (text, kept verbatim, brackets of emphasis included), ``_Edit`` or
    ``_Alternate``. Inside brackets only text, escapes and well-formed bracket groups may appear; at the top level a
    stray ``[ ] ( ) :`` is plain text, while a stray ``|`` or a backslash ending the prompt rejects the whole prompt.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.groups: dict[int, tuple[list, int] | None] = {}

    def parse(self) -> list:
        text, nodes, i = self.text, [], 0
        while i < len(text):
            nested, j = self._sequence(i)
            nodes += nested
            if j < len(text) and text[j] in "[]():":
                nodes.append(text[j])
                j += 1
            elif j == i:
                raise _Unparsable
            i = j
        return nodes

    def _sequence(self, i: int) -> tuple[list, int]:
        """Text and bracket groups from ``i`` up to the first character that cannot continue them."""
        text, nodes = self.text, []
        while i < len(text):
            c = text[i]
            if c in "[(":
                group = self._group(i)
                if group is None:
                    break
                nodes += group[0]
                i = group[1]
            elif c == "\\":
                if i + 1 >= len(text) or text[i + 1] == "\n":
                    break
                nodes.append(text[i : i + 2])
                i += 2
            elif c in _SPECIAL:
                break
            else:
                nodes.append(c)
                i += 1
        return nodes, i

    def _group(self, i: int) -> tuple[list, int] | None:
        """The bracket group opening at ``i`` and the index after it, or None if it is not well formed."""
        if i not in self.groups:
            self.groups[i] = self._round(i) if self.text[i] == "(" else self._square(i)
        return self.groups[i]

    def _at(self, i: int) -> str:
        return self.text[i] if i < len(self.text) else ""

    def _round(self, i: int) -> tuple[list, int] | None:
        first, j = self._sequence(i + 1)
        if self._at(j) == ")":
            return ["(", *first, ")"], j + 1
        if self._at(j) != ":":
            return None
        second, k = self._sequence(j + 1)
        return (["(", *first, ":", *second, ")"], k + 1) if self._at(k) == ")" else None

    def _square(self, i: int) -> tuple[list, int] | None:
        first, j = self._sequence(i + 1)
        c = self._at(j)
        if c == "]":
            return ["[", *first, "]"], j + 1
        if c == "|":
            options = [first]
            while self._at(j) == "|":
                option, j = self._sequence(j + 1)
                options.append(option)
            return ([_Alternate(options)], j + 1) if self._at(j) == "]" else None
        if c != ":":
            return None
        when = _WHEN_CLOSE.match(self.text, j + 1)
        if when:
            return [_Edit(None, first, when.group(1))], when.end()
        second, k = self._sequence(j + 1)
        when = _WHEN_CLOSE.match(self.text, k + 1) if self._at(k) == ":" else None
        return ([_Edit(first, second, when.group(1))], when.end()) if when else None


def _edit_step(when: str, steps: int, old_scheduling: bool) -> int:
    """The last step of the ``before`` text: decimal point → fraction of ``steps``, else a step number."""
    value = float(when)
    if old_scheduling:
        value = value * steps if value < 1 else value
    elif "." in when:
        value = value * steps
    if value >= steps:
        return steps
    return math.trunc(value) if value > -steps else -steps


def _switch_steps(nodes: list, steps: int, old_scheduling: bool) -> set[int]:
    found: set[int] = set()
    for node in nodes:
        if isinstance(node, _Edit):
            end = _edit_step(node.when, steps, old_scheduling)
            if end >= 1:
                found.add(end)
            found |= _switch_steps((node.before or []) + node.after, steps, old_scheduling)
        elif isinstance(node, _Alternate):
            found |= set(range(1, steps + 1))
            for option in node.options:
                found |= _switch_steps(option, steps, old_scheduling)
    return found


def _render(nodes: list, step: int, steps: int, old_scheduling: bool) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, _Edit):
            chosen = node.before if step <= _edit_step(node.when, steps, old_scheduling) else node.after
            parts.append(_render(chosen or [], step, steps, old_scheduling))
        elif isinstance(node, _Alternate):
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, steps, old_scheduling))
        else:
            parts.append(node)
    return "".join(parts)


def prompt_schedule(prompt: str, steps: int, *, old_scheduling: bool = False) -> list[tuple[int, str]]:
    """The texts a prompt takes over ``steps`` sampling steps, as A1111's ``get_learned_conditioning_prompt_schedules``.

    Returns ``[(end_step, text), ...]`` in increasing ``end_step``; the last ``end_step`` is ``steps``. Text ``k`` is
    used while the 0-based denoiser step ``s`` satisfies ``s <= end_step`` (see ``schedule_index``). Example, 10 steps:
    ``"a [b:c:0.5] d"`` → ``[(5, "a b d"), (10, "a c d")]``; ``"[x|y]"`` → ``[(1, "x"), (2, "y"), (3, "x"), ...]``.
    """
    if steps < 1:
        raise PromptError(f"steps must be at least 1 to schedule prompt {prompt!r}, got {steps}")
    try:
        nodes = _ScheduleParser(prompt).parse()
        ends = sorted(_switch_steps(nodes, steps, old_scheduling) | {steps})
        return [(end, _render(nodes, end, steps, old_scheduling)) for end in ends]
    except (_Unparsable, RecursionError):
        return [(steps, prompt)]


def prompt_schedules(
    prompts: Sequence[str], steps: int, *, old_scheduling: bool = False
) -> list[list[tuple[int, str]]]:
    """``prompt_schedule`` for each prompt of a batch."""
    return [prompt_schedule(p, steps, old_scheduling=old_scheduling) for p in prompts]


def schedule_index(end_steps: Sequence[int], step: int) -> int:
    """Index of the schedule entry used at 0-based denoiser step ``step``: the first with ``step <= end_step``.

    This is A1111's ``reconstruct_cond_batch`` rule (it counts denoiser calls from 0), so ``[a:b:3]`` uses ``a`` for
    steps 0..3. Past the last entry A1111 falls back to entry 0.
    """
    for k, end in enumerate(end_steps):
        if step <= end:
            return k
    return 0


_COMPOSABLE_AND = re.compile(r"\bAND\b")
_GUIDANCE_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_composable(prompt: str) -> list[tuple[str, float]]:
    """A1111's composable split of a positive prompt: sub-prompts at the word ``AND``, each with a guidance weight.

    ``"a cat :1.5"`` → ``[("a cat", 1.5)]``; ``"a AND b:0.5"`` → ``[("a", 1.0), (" b", 0.5)]``. Trailing whitespace
    is dropped as A1111 drops it. A1111 scales each sub-prompt's guidance term ``cond - uncond`` by its weight.
    """
    parts = []
    for sub in _COMPOSABLE_AND.split(prompt):
        m = _GUIDANCE_WEIGHT.search(sub)
        text, weight = m.groups() if m else (sub, None)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


# ---------------------------------------------------------------------------------------------------------------------
# Chunking into 77-token windows with per-token weights
# ---------------------------------------------------------------------------------------------------------------------


class _Chunker:
    """Collects (token, weight) pairs into chunks of ``CHUNK_TOKENS``, backing off to a recent comma when full."""

    def __init__(self, comma_id: int, comma_backtrack: int) -> None:
        self.comma_id = comma_id
        self.comma_backtrack = comma_backtrack
        self.chunks: list[tuple[list[int], list[float]]] = []
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.last_comma = -1

    def close(self) -> None:
        """End the current chunk (it may be empty) and start a new one."""
        self.chunks.append((self.tokens, self.weights))
        self.tokens, self.weights, self.last_comma = [], [], -1

    def add(self, token: int, weight: float) -> None:
        if token == self.comma_id:
            self.last_comma = len(self.tokens)
        elif (
            self.comma_backtrack
            and len(self.tokens) == CHUNK_TOKENS
            and self.last_comma != -1
            and len(self.tokens) - self.last_comma <= self.comma_backtrack
        ):
            cut = self.last_comma + 1
            moved = self.tokens[cut:], self.weights[cut:]
            self.tokens, self.weights = self.tokens[:cut], self.weights[:cut]
            self.close()
            self.tokens, self.weights = list(moved[0]), list(moved[1])
        if len(self.tokens) == CHUNK_TOKENS:
            self.close()
        self.tokens.append(token)
        self.weights.append(weight)


def _frame(tokens: list[int], weights: list[float], bos: int, eos: int, pad: int) -> tuple[list[int], list[float]]:
    """[BOS] + tokens + [EOS] + pad… to 77 ids; weight 1.0 on BOS, EOS and padding."""
    n_pad = CHUNK_TOKENS - len(tokens)
    ids = [bos, *tokens, eos] + [pad] * n_pad
    return ids, [1.0, *weights] + [1.0] * (n_pad + 1)


def chunk_prompt(
    text: str,
    tokenizer: Tokenizer,
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and emphasis weights of one prompt, cut into 77-token chunks as A1111 does.

    Each piece of ``parse_attention(text)`` is tokenized on its own; ``BREAK`` closes the current chunk. The
    tokenizer's ``pad_token_id`` fills a chunk after its EOS (SD1: the EOS id 49407; SD2: 0, as A1111's OpenCLIP
    path). ``comma_backtrack=0`` turns the comma back-off off.
    Returns ``ids: (n_chunks, 77)`` int64 and ``weights: (n_chunks, 77)`` float32.
    """
    comma = tokenizer.encode(",")
    if len(comma) != 1:
        raise PromptError(f"tokenizer encodes ',' as {comma}, expected one token")
    chunker = _Chunker(comma[0], comma_backtrack)
    for piece, weight in parse_attention(text):
        if piece == "BREAK" and weight == BREAK_WEIGHT:
            chunker.close()
            continue
        for token in tokenizer.encode(piece):
            chunker.add(token, weight)
    if chunker.tokens or not chunker.chunks:
        chunker.close()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    framed = [_frame(tokens, weights, bos, eos, pad) for tokens, weights in chunker.chunks]
    ids = torch.tensor([f[0] for f in framed], dtype=torch.int64)
    weights = torch.tensor([f[1] for f in framed], dtype=torch.float32)
    return ids, weights


# ---------------------------------------------------------------------------------------------------------------------
# Encoding with emphasis
# ---------------------------------------------------------------------------------------------------------------------


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: ``z·w`` rescaled so its mean equals the mean of ``z``.

    ``z: (B, 77, D)`` text-encoder hidden states of one chunk position for a batch of prompts; ``weights: (B, 77)``.
    The means run over the whole batch, as A1111 encodes all texts of a prompt schedule in one batch. Computed in
    float32 when ``z`` is half precision (A1111's float32 multipliers promote it the same way); returns ``z.dtype``.
    """
    if weights.shape != z.shape[:2]:
        raise PromptError(f"emphasis weights of shape {tuple(weights.shape)} do not fit hidden states {tuple(z.shape)}")
    if bool((weights == 1).all()):
        return z  # A1111's rescale is then exactly 1 (and 0/0 when the states have zero mean, e.g. untrained)
    original_mean = z.mean()
    weighted = z * weights.to(device=z.device, dtype=torch.float32).unsqueeze(-1)
    new_mean = weighted.mean()
    if new_mean == 0:
        return weighted.to(z.dtype)
    return (weighted * (original_mean / new_mean)).to(z.dtype)


def encode_weighted(
    texts: Sequence[str],
    tokenizer: Tokenizer,
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> torch.Tensor:
    """Encode prompts with A1111 emphasis and long-prompt chunking: ``(B, 77·n, D)``, n = most chunks of any text.

    ``encode`` maps ids ``(B, 77)`` to hidden states ``(B, 77, D)``, e.g. ``lambda ids: text_encoder(ids,
    clip_skip=2)``. Chunk ``i`` of every text is encoded as one batch (texts with fewer chunks get empty-prompt
    chunks), emphasis is applied per batch, and chunks are concatenated along the token axis.
    """
    if not texts:
        raise PromptError("no prompt texts to encode")
    chunked = {t: chunk_prompt(t, tokenizer, comma_backtrack=comma_backtrack) for t in set(texts)}
    empty_ids, empty_weights = chunk_prompt("", tokenizer)
    n_chunks = max(ids.shape[0] for ids, _ in chunked.values())
    encoded = []
    for i in range(n_chunks):
        ids = torch.stack([chunked[t][0][i] if i < len(chunked[t][0]) else empty_ids[0] for t in texts])
        weights = torch.stack([chunked[t][1][i] if i < len(chunked[t][1]) else empty_weights[0] for t in texts])
        encoded.append(apply_emphasis(encode(ids), weights))
    return torch.cat(encoded, dim=1)


def pad_conds(cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give cond and uncond the same token length by appending empty-prompt chunks to the shorter one.

    ``cond: (B, 77·n, D)``, ``uncond: (B, 77·m, D)``, ``empty: (1, 77, D)`` the encoding of ``""``. This is A1111's
    "Pad prompt/negative prompt" option (infotext ``Pad conds: True``); without it A1111 runs the U-Net separately on
    cond and uncond when their lengths differ, which is not the same numbers.
    """
    if cond.shape[1] % empty.shape[1] or uncond.shape[1] % empty.shape[1]:
        raise PromptError(
            f"cond {tuple(cond.shape)} / uncond {tuple(uncond.shape)} are not whole chunks of {empty.shape[1]} tokens"
        )
    repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
    if repeats > 0:
        uncond = torch.cat([uncond, empty.repeat(uncond.shape[0], repeats, 1)], dim=1)
    elif repeats < 0:
        cond = torch.cat([cond, empty.repeat(cond.shape[0], -repeats, 1)], dim=1)
    return cond, uncond


@dataclass(frozen=True)
class ScheduledCond:
    """A prompt's conditioning over a run: ``texts[k]`` holds up to ``end_steps[k]``; ``cond: (K, 77·n, D)``.

    ``weight`` is A1111's guidance weight of the prompt (``"a cat :1.5"``): the guidance term is scaled by it.
    """

    end_steps: list[int]
    texts: list[str]
    cond: torch.Tensor
    weight: float = 1.0

    def at_step(self, step: int) -> torch.Tensor:
        """Conditioning ``(77·n, D)`` at 0-based denoiser step ``step`` (A1111's rule, see ``schedule_index``)."""
        return self.cond[schedule_index(self.end_steps, step)]


def encode_prompt_schedule(
    prompt: str,
    steps: int,
    tokenizer: Tokenizer,
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    negative: bool = False,
    old_scheduling: bool = False,
) -> ScheduledCond:
    """Everything A1111 does to turn a prompt into conditioning for ``steps`` sampling steps.

    A positive prompt is split like A1111's composable prompts (raising PromptError on ``AND``, which nijimi does not
    implement), then scheduled (``prompt_schedule``) and all its texts encoded in one batch (``encode_weighted``).
    """
    weight = 1.0
    if not negative:
        parts = split_composable(prompt)
        if len(parts) > 1:
            raise PromptError(f"composable prompts with AND are not supported: {prompt!r} (write 'and' for plain text)")
        prompt, weight = parts[0]
    schedule = prompt_schedule(prompt, steps, old_scheduling=old_scheduling)
    texts = [text for _, text in schedule]
    cond = encode_weighted(texts, tokenizer, encode)
    return ScheduledCond([end for end, _ in schedule], texts, cond, weight)
