"""Textual-inversion embeddings in prompts, by A1111's rules (``EmbeddingDatabase.find_embedding_at_position`` and
``tokenize_line``): names match by token ids (so case does not matter, longest first), an embedding's vectors carry
the piece's emphasis, and an embedding is never split across 75-token chunks."""

from __future__ import annotations

import pytest
import torch

from nijimi.errors import PromptError
from nijimi.text.prompt import chunk_prompt, encode_prompt_schedule
from nijimi.text.tokenizer import ClipTokenizer
from nijimi.text.vocabulary import ExtraVocabulary

BOS, EOS, COMMA, A = 49406, 49407, 267, 320
V = 49408  # the first extra id


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


def vocabulary(tok, sizes: dict[str, int], loaded: list | None = None) -> ExtraVocabulary:
    """Embedding ``name`` has ``sizes[name]`` vectors of width 4, all equal to its place in sorted order + 1
    ("Style" < "bad" < "bad-hands")."""
    def load(name: str) -> torch.Tensor:
        if loaded is not None:
            loaded.append(name)
        return torch.full((sizes[name], 4), float(sorted(sizes).index(name) + 1))

    return ExtraVocabulary(tok, sizes, load)


def test_names_match_by_tokens_longest_first_and_load_on_first_use(tok):
    loaded = []
    voc = vocabulary(tok, {"bad-hands": 2, "bad": 1, "Style": 3}, loaded)
    ids, _ = chunk_prompt("a BAD-hands, bad style, badly", tok, voc)
    # "badly" is one other token; "bad-hands" wins over "bad"; "style" matches "Style" (CLIP lower-cases)
    assert ids[0, :12].tolist() == [BOS, A, V, V + 1, COMMA, V + 2, V + 3, V + 4, V + 5, COMMA,
                                    *tok.encode("badly"), EOS]
    assert loaded == ["bad-hands", "bad", "Style"]
    assert torch.equal(voc.vectors, torch.tensor([3.0, 3, 2, 1, 1, 1]).unsqueeze(1).expand(6, 4))
    assert [voc.name_of(i) for i in (V, V + 2, V + 5)] == ["bad-hands", "bad", "Style"]
    assert chunk_prompt("bad-hands", tok, voc)[0][0, 1:3].tolist() == [V, V + 1]  # the same ids again


def test_emphasis_applies_to_every_vector_and_editing_and_break_work(tok):
    voc = vocabulary(tok, {"emb": 3})
    ids, weights = chunk_prompt("(emb:1.3) a BREAK [emb]", tok, voc)
    assert ids[0, :6].tolist() == [BOS, V, V + 1, V + 2, A, EOS]
    assert weights[0, 1:5].tolist() == pytest.approx([1.3, 1.3, 1.3, 1.0])
    assert ids[1, :5].tolist() == [BOS, V, V + 1, V + 2, EOS]
    assert weights[1, 1:4].tolist() == pytest.approx([1 / 1.1] * 3)
    encoded = []
    schedule = encode_prompt_schedule("a [emb:b:2]", 4, tok, lambda i: encoded.append(i) or torch.ones(2, 77, 4),
                                      negative=True, vocabulary=voc)
    assert schedule.texts == ["a emb", "a b"] and schedule.embeddings == ("emb",)
    assert encoded[0][0, 2:5].tolist() == [V, V + 1, V + 2] and V not in encoded[0][1].tolist()


def test_an_embedding_is_never_split_across_chunks(tok):
    """73 tokens then a 3-vector embedding: it does not fit the 2 places left, so the chunk closes early (padded)
    and the embedding starts the next one; a 2-vector embedding still fits."""
    voc = vocabulary(tok, {"three": 3, "two": 2})
    ids, weights = chunk_prompt(" ".join(["a"] * 73) + " three a", tok, voc)
    assert ids[0].tolist() == [BOS, *[A] * 73, EOS, EOS, EOS]
    assert ids[1, :6].tolist() == [BOS, V, V + 1, V + 2, A, EOS]
    assert weights.shape == (2, 77)
    ids, _ = chunk_prompt(" ".join(["a"] * 73) + " two a", tok, voc)
    assert ids[0].tolist() == [BOS, *[A] * 73, V + 3, V + 4, EOS] and ids[1, :3].tolist() == [BOS, A, EOS]


def test_a_comma_back_off_moves_the_embedding_with_the_text_after_the_comma(tok):
    voc = vocabulary(tok, {"emb": 2})
    ids, _ = chunk_prompt(" ".join(["a"] * 70) + " , emb a a a a", tok, voc)
    # chunk full at 75 (70 a, comma, emb ×2, a a); the next "a" backs off to the comma
    assert ids[0].tolist() == [BOS, *[A] * 70, COMMA, EOS] + [EOS] * 4
    assert ids[1, :8].tolist() == [BOS, V, V + 1, A, A, A, A, EOS]


def test_names_that_read_alike_and_bad_vectors_are_refused(tok):
    alike = ExtraVocabulary(tok, ["Foo", "foo"], lambda name: torch.ones(1, 4))
    with pytest.raises(PromptError, match="embedding names \\['Foo', 'foo'\\] read the same in a prompt"):
        chunk_prompt("a foo", tok, alike)
    assert chunk_prompt("a b", tok, alike)[0][0, :4].tolist() == [BOS, A, 321, EOS]  # unused: no error
    long = ExtraVocabulary(tok, ["long"], lambda name: torch.ones(76, 4))
    with pytest.raises(PromptError, match="embedding 'long' has vectors of shape \\(76, 4\\); 1 to 75 vectors"):
        chunk_prompt("long", tok, long)


def test_substitute_replaces_names_in_plain_token_lists(tok):
    voc = vocabulary(tok, {"pink": 2})
    assert voc.substitute(tok.encode("a pink star, pink")) == [A, V, V + 1, *tok.encode("star,"), V, V + 1]
