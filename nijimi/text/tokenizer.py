"""The CLIP text tokenizer: byte-level byte-pair encoding (BPE) into 77-token windows.

BPE after Sennrich et al. (arXiv 1508.07909), byte-level as in GPT-2, with CLIP's vocabulary and pre-tokenizing
pattern (Radford et al., arXiv 2103.00020). The merge list ships with nijimi
(``nijimi/data/bpe_simple_vocab_16e6.txt.gz``, MIT, see ``nijimi/data/THIRD_PARTY_NOTICES``). Vocabulary (49408
ids): the 256 byte symbols, the same with the end-of-word mark ``</w>``, one id per merge (48894, in file order),
then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Ids equal those of transformers' ``CLIPTokenizer`` (5.x, ``tokenizers``-backed), which SD pipelines run today: the
exact strings ``<|startoftext|>``/``<|endoftext|>`` become their ids; other text is NFC-normalised and lower-cased
per character (a final capital sigma becomes ``σ``, not ``str.lower``'s ``ς``), cut by the CLIP pattern (contractions
``'s 't 're 've 'm 'll 'd``, letter runs L*, single digits N*, runs of anything else but Unicode ``White_Space``,
which separates pieces and is dropped), UTF-8 encoded, mapped byte by byte to printable symbols, marked ``</w>`` at
the end and merged pair by pair in merge-list order. Like transformers (its fast tokenizer never ran them), and
unlike the original CLIP code, there is no ``ftfy.fix_text`` or (twice) ``html.unescape``: ``&amp;`` stays four pieces
and curly quotes, ligatures and full-width letters are not folded (plain-text prompts tokenize the same under all
three). Letter/number classes come from
Python's ``unicodedata``: characters newer than its Unicode version may be classified unlike the Rust reference.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import re
import sys
import unicodedata
from dataclasses import dataclass

import torch

from nijimi.errors import ConfigError, PromptError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
"""The merge list in ``nijimi/data``; sha256 924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a."""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_N_MERGES = 49152 - 256 - 2
_END_OF_WORD = "</w>"
_CACHE_LIMIT = 200_000
_LAST_LETTER_PLANE_END = 0x40000
"""No letter or number is assigned above plane 3 (planes 4–13 are empty, 14 holds tags and selectors, 15–16 are
private use), so the category scan stops here."""

# Unicode White_Space: what the reference's regex engine (Oniguruma) calls ``\s``. Python's ``\s`` would also
# include U+001C..U+001F, which the reference tokenizes as symbols.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SPECIAL_SPLIT = re.compile(f"({re.escape(BOS_TOKEN)}|{re.escape(EOS_TOKEN)})")


def byte_symbols() -> list[tuple[int, str]]:
    """(byte, printable stand-in) for bytes 0..255, in vocabulary order (GPT-2's byte-to-unicode table).

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves and come first; the other
    68 bytes, in byte order, stand for U+0100, U+0101, …
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + i)) for i, b in enumerate(others)]


def _letter_number_classes() -> tuple[str, str]:
    """Regex character-class bodies (escaped ranges) of Unicode letters (category L*) and numbers (category N*)."""
    ranges: dict[str, list[list[int]]] = {"L": [], "N": []}
    category = unicodedata.category
    for cp in range(_LAST_LETTER_PLANE_END):
        runs = ranges.get(category(chr(cp))[0])
        if runs is None:
            continue
        if runs and runs[-1][1] == cp - 1:
            runs[-1][1] = cp
        else:
            runs.append([cp, cp])
    body = {
        major: "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in runs)
        for major, runs in ranges.items()
    }
    return body["L"], body["N"]


@functools.cache
def _piece_pattern() -> re.Pattern[str]:
    """CLIP's pre-tokenizing pattern with \\p{L}, \\p{N} and \\s spelled out as explicit classes."""
    letters, numbers = _letter_number_classes()
    specials = f"{re.escape(BOS_TOKEN)}|{re.escape(EOS_TOKEN)}"
    contractions = "'s|'t|'re|'ve|'m|'ll|'d"
    return re.compile(f"{specials}|{contractions}|[{letters}]+|[{numbers}]|[^{_WHITESPACE}{letters}{numbers}]+")


@dataclass(frozen=True)
class _Vocabulary:
    """Token string ↔ id tables and merge ranks, built once from the shipped merge list."""

    encoder: dict[str, int]
    decoder: list[str]
    ranks: dict[tuple[str, str], int]
    byte_encoder: dict[int, str]
    byte_decoder: dict[str, int]


@functools.cache
def _vocabulary() -> _Vocabulary:
    """Read ``nijimi/data/bpe_simple_vocab_16e6.txt.gz`` and number the vocabulary as CLIP does."""
    with importlib.resources.files("nijimi").joinpath("data", VOCAB_FILE).open("rb") as raw:
        lines = gzip.decompress(raw.read()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    pairs = byte_symbols()
    symbols = [s for _, s in pairs]
    decoder = symbols + [s + _END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return _Vocabulary(
        encoder={token: i for i, token in enumerate(decoder)},
        decoder=decoder,
        ranks={m: i for i, m in enumerate(merges)},
        byte_encoder=dict(pairs),
        byte_decoder={s: b for b, s in pairs},
    )


def _merge(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to a list of symbols: repeatedly join every occurrence of the best-ranked adjacent pair."""
    while len(word) > 1:
        best = min(zip(word, word[1:], strict=False), key=lambda pair: ranks.get(pair, sys.maxsize))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


class ClipTokenizer:
    """CLIP BPE tokenizer with Stable Diffusion's 77-token windows.

    ``pad_token_id`` fills a window after ``<|endoftext|>``: 49407 (EOS) for SD 1.x, 0 (``!``) for SD 2.x. Only
    padding uses it: a ``!`` in the text is an ordinary token, as in OpenCLIP, which SD 2.x was trained with
    (transformers' SD 2 tokenizer, whose pad token is ``!``, would turn every ``!`` into id 0).
    """

    def __init__(self, pad_token_id: int = 49407, max_length: int = 77) -> None:
        self._vocab = _vocabulary()
        if not 0 <= pad_token_id < len(self._vocab.decoder):
            raise ConfigError(f"pad_token_id {pad_token_id} is outside the vocabulary 0..{self.vocab_size - 1}")
        if max_length < 2:
            raise ConfigError(f"max_length {max_length} leaves no room for <|startoftext|> and <|endoftext|>")
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self._pattern = _piece_pattern()
        self._cache: dict[str, list[int]] = {}

    @property
    def bos_token_id(self) -> int:
        """Id of ``<|startoftext|>`` (49406)."""
        return self._vocab.encoder[BOS_TOKEN]

    @property
    def eos_token_id(self) -> int:
        """Id of ``<|endoftext|>`` (49407)."""
        return self._vocab.encoder[EOS_TOKEN]

    @property
    def vocab_size(self) -> int:
        """Number of ids (49408)."""
        return len(self._vocab.decoder)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without ``<|startoftext|>``/``<|endoftext|>`` around it and without truncation."""
        return [i for _, ids in self.pieces(text) for i in ids]

    def pieces(self, text: str) -> list[tuple[str, list[int]]]:
        """``text`` cut as :meth:`encode` cuts it before BPE — lower-cased words, single digits, runs of punctuation,
        special tokens — each with its ids, in order (their ids joined are ``encode(text)``)."""
        if not isinstance(text, str):
            raise PromptError(f"a prompt must be a str, got {type(text).__name__}: {text!r:.80}")
        pieces: list[tuple[str, list[int]]] = []
        for i, segment in enumerate(_SPECIAL_SPLIT.split(text)):
            if i % 2:
                pieces.append((segment, [self._vocab.encoder[segment]]))
                continue
            lowered = unicodedata.normalize("NFC", segment).replace("Σ", "σ").lower()
            pieces += [(piece, list(self._piece_ids(piece))) for piece in self._pattern.findall(lowered)]
        return pieces

    def _piece_ids(self, piece: str) -> list[int]:
        """BPE ids of one pre-tokenized piece, cached."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        if piece in (BOS_TOKEN, EOS_TOKEN):
            # The reference's byte-level step cuts a lower-cased special name into "<|", name, "|>".
            ids = [i for part in ("<|", piece[2:-2], "|>") for i in self._piece_ids(part)]
        else:
            symbols = [self._vocab.byte_encoder[b] for b in piece.encode("utf-8")]
            symbols[-1] += _END_OF_WORD
            ids = [self._vocab.encoder[s] for s in _merge(symbols, self._vocab.ranks)]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of token ids: bytes re-joined (invalid UTF-8 becomes U+FFFD), ``</w>`` read as a space, stripped.

        Special tokens are kept as ``<|startoftext|>``/``<|endoftext|>``.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise PromptError(f"token ids {bad[:5]} are outside the vocabulary 0..{self.vocab_size - 1}")
        data = bytes(self._vocab.byte_decoder[c] for i in ids for c in self._vocab.decoder[i])
        return data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").strip()

    def __call__(self, texts: str | list[str], truncation: bool = True) -> torch.Tensor:
        """Token windows ``(B, max_length)`` int64: BOS, ids, EOS, then padding.

        With ``truncation`` a text longer than ``max_length - 2`` tokens keeps its first ``max_length - 2``;
        without it such a text raises ``PromptError``.
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        rows = [self.encode(text) for text in batch]
        room = self.max_length - 2
        for ids, text in zip(rows, batch, strict=True):
            if len(ids) > room and not truncation:
                raise PromptError(f"prompt has {len(ids)} tokens, more than {room}: {text[:80]!r}")
        return self.windows(rows)

    def windows(self, rows: list[list[int]]) -> torch.Tensor:
        """Token windows ``(B, max_length)`` int64 of token id lists: BOS, the first ``max_length - 2`` ids, EOS,
        then padding."""
        out = torch.full((len(rows), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, ids in enumerate(rows):
            window = [self.bos_token_id, *ids[: self.max_length - 2], self.eos_token_id]
            out[row, : len(window)] = torch.tensor(window, dtype=torch.long)
        return out
