"""A1111's prompt encoding: 77-token chunks with per-token emphasis, scheduled over the sampling steps.

The grammar (emphasis, BREAK, prompt editing, alternation, ``AND``) is :mod:`nijimi.text.prompt_syntax`; this module
turns its output into conditioning as A1111 does (modules/sd_hijack_clip.py, modules/sd_emphasis.py, default settings).

Long prompts — ``chunk_prompt``
    Token ids are cut into chunks of [BOS] + 75 + [EOS]; when a chunk is full and its last comma lies within the last
    20 tokens, the text after that comma moves to the next chunk. Each token carries its emphasis weight.
Emphasis on embeddings — ``apply_emphasis``
    A1111's "Original" mode: hidden states × per-token weight, then rescaled to the unweighted mean.
In a pipeline — ``encode_prompt_schedule``
    Once for the prompt and once (``negative=True``) for the negative prompt, then ``.at_step(i)`` with ``i`` counting
    denoiser calls from 0. A1111 schedules over ``2·steps`` for samplers that call the model twice per step (Heun,
    DPM2, DPM++ 2S a, DPM++ SDE). A1111 denoises the sub-prompts of a positive prompt split at ``AND`` separately;
    nijimi does not implement that and raises PromptError (negative prompts are plain text in A1111 too). A single
    prompt ending in ``:1.5`` is A1111's guidance weight and is honoured.
Textual-inversion embeddings — ``vocabulary``
    With an :class:`~nijimi.text.vocabulary.ExtraVocabulary`, an embedding's name in a piece of the prompt becomes its
    extra ids, each with the piece's emphasis weight. As in A1111, an embedding is never split across chunks: when it
    does not fit in what is left of a chunk, the chunk is closed early (padded) and the embedding starts the next one;
    a comma back-off moves the embedding's ids along with the text after the comma.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nijimi.errors import PromptError
from nijimi.text.prompt_syntax import BREAK_WEIGHT, parse_attention, prompt_schedule, split_composable
from nijimi.text.tokenizer import ClipTokenizer
from nijimi.text.vocabulary import ExtraVocabulary

CHUNK_TOKENS = 75
"""Prompt tokens per chunk; a chunk is [BOS] + 75 + [EOS] = 77 ids, CLIP's context length."""
COMMA_BACKTRACK = 20
"""A1111's default ``comma_padding_backtrack``: how far back a comma may be to end a full chunk early."""


# ---- Chunking into 77-token windows with per-token weights -----------------------------------------------------------


class _Chunker:
    """Collects (token, weight) pairs into chunks of ``CHUNK_TOKENS``, backing off to a recent comma when full."""

    def __init__(self, comma_id: int) -> None:
        self.comma_id = comma_id
        self.chunks: list[tuple[list[int], list[float]]] = []
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.last_comma = -1

    def close(self) -> None:
        """End the current chunk (it may be empty) and start a new one."""
        self.chunks.append((self.tokens, self.weights))
        self.tokens, self.weights, self.last_comma = [], [], -1

    def add(self, token: int, weight: float, ids: list[int] | None = None) -> None:
        """Add the prompt's ``token`` — or, for an embedding whose name starts with it, the embedding's ``ids``,
        all in one chunk (A1111's ``tokenize_line``)."""
        if token == self.comma_id:
            self.last_comma = len(self.tokens)
        elif len(self.tokens) == CHUNK_TOKENS and CHUNK_TOKENS - self.last_comma <= COMMA_BACKTRACK:  # -1: none
            cut = self.last_comma + 1
            moved = self.tokens[cut:], self.weights[cut:]
            self.tokens, self.weights = self.tokens[:cut], self.weights[:cut]
            self.close()
            self.tokens, self.weights = list(moved[0]), list(moved[1])
        ids = [token] if ids is None else ids
        if len(self.tokens) == CHUNK_TOKENS or len(self.tokens) + len(ids) > CHUNK_TOKENS:
            self.close()
        self.tokens += ids
        self.weights += [weight] * len(ids)


def _frame(tokens: list[int], weights: list[float], bos: int, eos: int, pad: int) -> tuple[list[int], list[float]]:
    """[BOS] + tokens + [EOS] + pad… to 77 ids; weight 1.0 on BOS, EOS and padding."""
    n_pad = CHUNK_TOKENS - len(tokens)
    ids = [bos, *tokens, eos] + [pad] * n_pad
    return ids, [1.0, *weights] + [1.0] * (n_pad + 1)


def chunk_prompt(text: str, tokenizer: ClipTokenizer,
                 vocabulary: ExtraVocabulary | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and emphasis weights of one prompt, cut into 77-token chunks as A1111 does.

    Each piece of ``parse_attention(text)`` is tokenized on its own; ``BREAK`` closes the current chunk; embedding
    names of ``vocabulary`` become their extra ids (see the module docstring). The tokenizer's ``pad_token_id`` fills a
    chunk after its EOS (SD1: the EOS id 49407; SD2: 0, as A1111's OpenCLIP path). Returns ``ids: (n_chunks, 77)``
    int64 and ``weights: (n_chunks, 77)`` float32.
    """
    chunker = _Chunker(tokenizer.encode(",")[0])  # "," is one CLIP token (267)
    for piece, weight in parse_attention(text):
        if piece == "BREAK" and weight == BREAK_WEIGHT:
            chunker.close()
            continue
        tokens, position = tokenizer.encode(piece), 0
        while position < len(tokens):
            found = vocabulary and vocabulary.match(tokens, position)
            chunker.add(tokens[position], weight, vocabulary.ids(found[0]) if found else None)
            position += found[1] if found else 1
    if chunker.tokens or not chunker.chunks:
        chunker.close()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    framed = [_frame(tokens, weights, bos, eos, pad) for tokens, weights in chunker.chunks]
    ids = torch.tensor([f[0] for f in framed], dtype=torch.int64)
    weights = torch.tensor([f[1] for f in framed], dtype=torch.float32)
    return ids, weights


# ---- Encoding with emphasis ------------------------------------------------------------------------------------------


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


def _chunk_batches(texts: Sequence[str], tokenizer: ClipTokenizer,
                   vocabulary: ExtraVocabulary | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, weights) ``(B, 77)`` of chunk ``i`` of every text, for each i; texts with fewer chunks get empty ones."""
    if not texts:
        raise PromptError("no prompt texts to encode")
    chunked = {t: chunk_prompt(t, tokenizer, vocabulary) for t in dict.fromkeys(texts)}
    empty_ids, empty_weights = chunk_prompt("", tokenizer)
    n_chunks = max(ids.shape[0] for ids, _ in chunked.values())
    return [(torch.stack([chunked[t][0][i] if i < len(chunked[t][0]) else empty_ids[0] for t in texts]),
             torch.stack([chunked[t][1][i] if i < len(chunked[t][1]) else empty_weights[0] for t in texts]))
            for i in range(n_chunks)]


def encode_weighted(
    texts: Sequence[str], tokenizer: ClipTokenizer, encode: Callable[[torch.Tensor], torch.Tensor],
    vocabulary: ExtraVocabulary | None = None,
) -> torch.Tensor:
    """Encode prompts with A1111 emphasis and long-prompt chunking: ``(B, 77·n, D)``, n = most chunks of any text.

    ``encode`` maps ids ``(B, 77)`` to hidden states ``(B, 77, D)``, e.g. ``lambda ids: text_encoder(ids,
    clip_skip=2)``; with a ``vocabulary``, ids from ``vocabulary.first_id`` on are its embeddings' rows, which
    ``encode`` must look up (``text_encoder(ids, extra=vocabulary.vectors)``, read when called: every text is chunked
    first). Chunk ``i`` of every text is encoded as one batch (texts with fewer chunks get empty-prompt chunks),
    emphasis is applied per batch, and chunks are concatenated along the token axis.
    """
    return _encode_batches(_chunk_batches(texts, tokenizer, vocabulary), encode)


def _encode_batches(batches: list[tuple[torch.Tensor, torch.Tensor]],
                    encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return torch.cat([apply_emphasis(encode(ids), weights) for ids, weights in batches], dim=1)


def embeddings_in(batches: Sequence[tuple[torch.Tensor, torch.Tensor]], vocabulary: ExtraVocabulary) -> list[str]:
    """Names of the embeddings in chunk batches, in A1111's order (its ``used_embeddings``): chunk by chunk, text by
    text, left to right, each name once."""
    names = (vocabulary.name_of(i) for ids, _ in batches for i in ids.flatten().tolist() if i >= vocabulary.first_id)
    return list(dict.fromkeys(names))


def schedule_index(end_steps: Sequence[int], step: int) -> int:
    """Index of the schedule entry used at 0-based denoiser step ``step``: the first with ``step <= end_step``.

    This is A1111's ``reconstruct_cond_batch`` rule (it counts denoiser calls from 0), so ``[a:b:3]`` uses ``a`` for
    steps 0..3. Past the last entry A1111 falls back to entry 0.
    """
    for k, end in enumerate(end_steps):
        if step <= end:
            return k
    return 0


@dataclass(frozen=True)
class ScheduledCond:
    """A prompt's conditioning over a run: ``texts[k]`` holds up to ``end_steps[k]``; ``cond: (K, 77·n, D)``.

    ``weight`` is A1111's guidance weight of the prompt (``"a cat :1.5"``): the guidance term is scaled by it.
    ``embeddings``: the names of the textual-inversion embeddings the texts use.
    """

    end_steps: list[int]
    texts: list[str]
    cond: torch.Tensor
    weight: float = 1.0
    embeddings: tuple[str, ...] = ()

    def at_step(self, step: int) -> torch.Tensor:
        """Conditioning ``(77·n, D)`` at 0-based denoiser step ``step`` (A1111's rule, see ``schedule_index``)."""
        return self.cond[schedule_index(self.end_steps, step)]


def encode_prompt_schedule(
    prompt: str,
    steps: int,
    tokenizer: ClipTokenizer,
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    negative: bool = False,
    vocabulary: ExtraVocabulary | None = None,
) -> ScheduledCond:
    """Everything A1111 does to turn a prompt into conditioning for ``steps`` sampling steps.

    A positive prompt is split like A1111's composable prompts (raising PromptError on ``AND``, which nijimi does not
    implement), then scheduled (``prompt_schedule``) and all its texts encoded in one batch (``encode_weighted``;
    ``vocabulary``: the textual-inversion embeddings it may name, see there).
    """
    weight = 1.0
    if not negative:
        parts = split_composable(prompt)
        if len(parts) > 1:
            raise PromptError(f"composable prompts with AND are not supported: {prompt!r} (write 'and' for plain text)")
        prompt, weight = parts[0]
    schedule = prompt_schedule(prompt, steps)
    texts = [text for _, text in schedule]
    batches = _chunk_batches(texts, tokenizer, vocabulary)
    cond = _encode_batches(batches, encode)
    used = tuple(embeddings_in(batches, vocabulary)) if vocabulary else ()
    return ScheduledCond([end for end, _ in schedule], texts, cond, weight, used)
