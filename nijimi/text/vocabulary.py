"""Textual-inversion embeddings in prompts: extra token ids past the CLIP vocabulary, found by name as A1111 finds them.

Textual inversion (Gal et al., arXiv 2208.01618) learns new token-embedding vectors for a word; a prompt that names the
embedding uses those vectors in place of the word's tokens. A1111 (modules/textual_inversion/textual_inversion.py,
``EmbeddingDatabase``) names an embedding by its file's stem and finds it in a prompt by *token ids*: the name is
tokenized like the prompt (so matching ignores case, as CLIP lower-cases), and wherever the prompt's tokens continue
with the name's tokens the embedding is used, the longest name first. nijimi does the same.

An :class:`ExtraVocabulary` gives every embedding a prompt uses a range of ids from ``first_id`` (the tokenizer's
vocabulary size, 49408) on, in order of first use; :attr:`ExtraVocabulary.vectors` holds their rows ``(E, width)``,
which the text encoder looks up for those ids (``TextEncoder(ids, extra=vectors)``). Files are read only when a prompt
uses them, through the ``load`` function given (the I/O layer's reader), so a folder of many embeddings costs nothing
until one is named.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from nijimi.errors import PromptError
from nijimi.text.tokenizer import ClipTokenizer

MAX_VECTORS = 75
"""Most vectors an embedding may have: one 75-token prompt chunk (an embedding is never split across chunks)."""


class ExtraVocabulary:
    """Embeddings a prompt may name (``names``, A1111's file stems), read by ``load(name) → (n, width)`` on first use.

    ``match(tokens, i)`` finds a name at position ``i`` of a prompt's token ids, ``ids(name)`` gives its extra ids
    (reading it on first use), ``vectors`` the rows of every embedding used so far.
    """

    def __init__(self, tokenizer: ClipTokenizer, names: Iterable[str],
                 load: Callable[[str], torch.Tensor]) -> None:
        self.first_id = tokenizer.vocab_size
        self._load = load
        self._names: dict[tuple[int, ...], list[str]] = {}
        for name in sorted(set(names)):
            tokens = tuple(tokenizer.encode(name))
            if tokens:
                self._names.setdefault(tokens, []).append(name)
        self._by_first: dict[int, list[tuple[int, ...]]] = {}
        for tokens in sorted(self._names, key=len, reverse=True):
            self._by_first.setdefault(tokens[0], []).append(tokens)
        self._rows: list[torch.Tensor] = []
        self._spans: dict[str, tuple[int, int]] = {}  # name → (first row, rows)
        self._owner: list[str] = []

    @property
    def vectors(self) -> torch.Tensor | None:
        """Rows of the extra ids ``(E, width)``: row ``j`` is id ``first_id + j``; None before any use."""
        return torch.cat(self._rows) if self._rows else None

    def match(self, tokens: Sequence[int], position: int) -> tuple[str, int] | None:
        """(name, number of tokens it spans) of the longest embedding name starting at ``tokens[position]``."""
        for name_tokens in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position : position + len(name_tokens)]) == name_tokens:
                names = self._names[name_tokens]
                if len(names) > 1:
                    raise PromptError(f"embedding names {names} read the same in a prompt; rename one of the files")
                return names[0], len(name_tokens)
        return None

    def ids(self, name: str) -> list[int]:
        """The extra token ids of embedding ``name``, read (``load``) and given ids on first use."""
        if name not in self._spans:
            rows = self._load(name)
            if rows.ndim != 2 or not 1 <= rows.shape[0] <= MAX_VECTORS:
                raise PromptError(f"embedding {name!r} has vectors of shape {tuple(rows.shape)}; 1 to {MAX_VECTORS} "
                                  "vectors fit a prompt chunk")
            self._spans[name] = (len(self._owner), rows.shape[0])
            self._rows.append(rows)
            self._owner += [name] * rows.shape[0]
        start, count = self._spans[name]
        return list(range(self.first_id + start, self.first_id + start + count))

    def name_of(self, token_id: int) -> str:
        """The embedding an extra id belongs to."""
        return self._owner[token_id - self.first_id]

    def substitute(self, tokens: Sequence[int]) -> list[int]:
        """``tokens`` with every embedding name replaced by the embedding's extra ids (plain tokenization, as training
        captions use; prompts go through :func:`nijimi.text.prompt.chunk_prompt`, which keeps an embedding in one
        chunk)."""
        out: list[int] = []
        position = 0
        while position < len(tokens):
            found = self.match(tokens, position)
            if found is None:
                out.append(tokens[position])
                position += 1
            else:
                out += self.ids(found[0])
                position += found[1]
        return out
