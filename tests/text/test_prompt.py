"""A1111 prompt encoding: chunking, emphasis on hidden states, scheduled conditioning.

Expected values are A1111's own: outputs of its ``tokenize_line``, checked with the real CLIP tokenizer.
"""

import pytest
import torch

from nijimi.errors import PromptError
from nijimi.text.prompt import (
    ScheduledCond,
    apply_emphasis,
    chunk_prompt,
    encode_prompt_schedule,
    encode_weighted,
    schedule_index,
)
from nijimi.text.tokenizer import ClipTokenizer

BOS, EOS, COMMA, A, B = 49406, 49407, 267, 320, 321


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


# ---------------------------------------------------------------------------------------------------------------------
# chunk_prompt (real CLIP tokenizer: "a" = 320, "b" = 321, "," = 267)
# ---------------------------------------------------------------------------------------------------------------------


def _window(tokens):
    return [BOS, *tokens, EOS] + [EOS] * (75 - len(tokens))


def test_chunk_short_prompt_with_emphasis(tok):
    ids, weights = chunk_prompt("a (b:1.5) [a]", tok)
    assert ids.shape == weights.shape == (1, 77)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids[0].tolist() == _window([A, B, A])
    expected = torch.ones(77)
    expected[1:4] = torch.tensor([1.0, 1.5, 1 / 1.1])
    assert torch.equal(weights[0], expected)


def test_chunk_empty_prompt(tok):
    ids, weights = chunk_prompt("", tok)
    assert ids.tolist() == [_window([])]
    assert torch.equal(weights, torch.ones(1, 77))


def test_chunk_sd2_pads_with_zero_after_eos():
    ids, _ = chunk_prompt("a b", ClipTokenizer(pad_token_id=0))
    assert ids[0].tolist() == [BOS, A, B, EOS] + [0] * 73


def test_long_prompt_splits_at_75_tokens_without_a_comma(tok):
    ids, weights = chunk_prompt(" ".join(["a"] * 80) + " (b)", tok)
    assert ids.tolist() == [_window([A] * 75), _window([A] * 5 + [B])]
    assert weights[1, 6].item() == pytest.approx(1.1) and weights[1, 1:6].eq(1).all()


def test_comma_back_off_moves_the_text_after_the_last_comma(tok):
    text = " ".join(["a"] * 60) + ", " + " ".join(["b"] * 20)
    ids, _ = chunk_prompt(text, tok)
    assert ids.tolist() == [_window([A] * 60 + [COMMA]), _window([B] * 20)]


def test_comma_further_back_than_20_tokens_is_ignored(tok):
    text = " ".join(["a"] * 50) + ", " + " ".join(["b"] * 30)
    ids, _ = chunk_prompt(text, tok)
    assert ids.tolist() == [_window([A] * 50 + [COMMA] + [B] * 24), _window([B] * 6)]


def test_comma_exactly_at_a_full_chunk_starts_the_next_chunk(tok):
    ids, _ = chunk_prompt(" ".join(["a"] * 75) + ", b", tok)
    assert ids.tolist() == [_window([A] * 75), _window([COMMA, B])]


def test_break_pads_the_chunk_and_starts_a_new_one(tok):
    ids, _ = chunk_prompt("a BREAK b", tok)
    assert ids.tolist() == [_window([A]), _window([B])]
    ids, _ = chunk_prompt("BREAK a", tok)
    assert ids.tolist() == [_window([]), _window([A])]
    ids, _ = chunk_prompt("a BREAK", tok)
    assert ids.tolist() == [_window([A])]


def test_break_inside_brackets_is_just_a_word(tok):
    ids, weights = chunk_prompt("(a BREAK b)", tok)
    assert ids.tolist() == [_window([A, *tok.encode("BREAK"), B])]
    assert weights[0, 2].item() == pytest.approx(-1.1)


# ---------------------------------------------------------------------------------------------------------------------
# apply_emphasis / encode_weighted / encode_prompt_schedule
# ---------------------------------------------------------------------------------------------------------------------


def test_apply_emphasis_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 8, generator=g, dtype=torch.float64)
    w = 1 + 0.3 * torch.rand(2, 77, generator=g, dtype=torch.float64)
    out = apply_emphasis(z.float(), w.float()).double()
    zn, wn = z.numpy(), w.numpy()
    weighted = zn * wn[:, :, None]
    reference = weighted * (zn.sum() / zn.size) / (weighted.sum() / weighted.size)
    torch.testing.assert_close(out, torch.from_numpy(reference), rtol=2e-5, atol=2e-6)
    assert out.mean().item() == pytest.approx(z.mean().item(), rel=1e-5)


def test_apply_emphasis_with_unit_weights_is_identity_and_keeps_dtype():
    z = torch.randn(1, 77, 4, generator=torch.Generator().manual_seed(1)).half()
    out = apply_emphasis(z, torch.ones(1, 77))
    assert out.dtype == torch.float16 and torch.equal(out, z)


def test_apply_emphasis_checks_shapes():
    with pytest.raises(PromptError, match="do not fit"):
        apply_emphasis(torch.zeros(1, 77, 4), torch.ones(2, 77))


class RandomEncoder:
    """A stand-in text encoder: embedding table lookup plus a position signal. ids (B, 77) → (B, 77, 6)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.table = torch.randn(49408, 6, generator=g)
        self.position = torch.randn(77, 6, generator=g)
        self.calls: list[torch.Tensor] = []

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(ids)
        return self.table[ids] + self.position


def test_encode_weighted_batches_chunks_and_fills_short_texts_with_empty_chunks(tok):
    enc = RandomEncoder()
    long_text = " ".join(["a"] * 80) + " (b:1.4)"
    out = encode_weighted(["(b)", long_text], tok, enc)
    assert out.shape == (2, 154, 6)
    assert len(enc.calls) == 2 and all(c.shape == (2, 77) for c in enc.calls)
    short_ids, short_w = chunk_prompt("(b)", tok)
    long_ids, long_w = chunk_prompt(long_text, tok)
    empty_ids, empty_w = chunk_prompt("", tok)
    for call, pair in zip(enc.calls, [(short_ids[0], long_ids[0]), (empty_ids[0], long_ids[1])], strict=True):
        assert torch.equal(call, torch.stack(pair))
    first = apply_emphasis(enc(torch.stack([short_ids[0], long_ids[0]])), torch.stack([short_w[0], long_w[0]]))
    second = apply_emphasis(enc(torch.stack([empty_ids[0], long_ids[1]])), torch.stack([empty_w[0], long_w[1]]))
    assert torch.equal(out, torch.cat([first, second], dim=1))


def test_encode_weighted_needs_texts(tok):
    with pytest.raises(PromptError, match="no prompt texts"):
        encode_weighted([], tok, RandomEncoder())


def test_schedule_index_counts_denoiser_calls_from_zero():
    assert [schedule_index([3, 10], s) for s in range(10)] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert [schedule_index([1, 2, 3], s) for s in range(3)] == [0, 0, 1]
    assert schedule_index([3, 10], 11) == 0


def test_encode_prompt_schedule(tok):
    enc = RandomEncoder()
    sc = encode_prompt_schedule("a [b:c:0.5] :2", 4, tok, enc)
    assert isinstance(sc, ScheduledCond)
    assert sc.end_steps == [2, 4] and sc.texts == ["a b", "a c"] and sc.weight == 2.0
    assert sc.cond.shape == (2, 77, 6)
    assert torch.equal(sc.cond, encode_weighted(["a b", "a c"], tok, RandomEncoder()))
    assert torch.equal(sc.at_step(2), sc.cond[0]) and torch.equal(sc.at_step(3), sc.cond[1])


def test_encode_prompt_schedule_rejects_and_only_in_positive_prompts(tok):
    with pytest.raises(PromptError, match="AND"):
        encode_prompt_schedule("a cat AND a dog", 4, tok, RandomEncoder())
    negative = encode_prompt_schedule("a cat AND a dog", 4, tok, RandomEncoder(), negative=True)
    assert negative.texts == ["a cat AND a dog"] and negative.weight == 1.0
