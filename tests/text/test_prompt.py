"""A1111 prompt syntax: emphasis, schedules, chunking, emphasis on hidden states.

Expected values are A1111's own: the doctests of modules/prompt_parser.py, and outputs of its parser (lark 1.1.2,
the version A1111 pins) and of its ``tokenize_line`` for the other cases, checked with the real CLIP tokenizer.
"""

import pytest
import torch

from nijimi.errors import PromptError
from nijimi.text.prompt import (
    BREAK_WEIGHT,
    ScheduledCond,
    apply_emphasis,
    chunk_prompt,
    encode_prompt_schedule,
    encode_weighted,
    pad_conds,
    parse_attention,
    prompt_schedule,
    prompt_schedules,
    schedule_index,
    split_composable,
)
from nijimi.text.tokenizer import ClipTokenizer

BOS, EOS, COMMA, A, B = 49406, 49407, 267, 320, 321


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer.sd1()


# ---------------------------------------------------------------------------------------------------------------------
# parse_attention
# ---------------------------------------------------------------------------------------------------------------------

ATTENTION_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("((a))", [("a", 1.2100000000000002)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 0.8264462809917354)]),
    ("(a: 1.5 ) b", [("a", 1.5), (" b", 1.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("a:1.5) b)", [("a:1.5) b)", 1.0)]),
    ("x ] y ) z", [("x ] y ) z", 1.0)]),
    ("[a (b] c)", [("a ", 1 / 1.1), ("b", 1.0), (" c", 1.1)]),
    ("a\\b\\\\c", [("ab\\c", 1.0)]),
    ("", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", BREAK_WEIGHT), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", BREAK_WEIGHT), ("", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("a:b", [("a:b", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION_CASES)
def test_parse_attention(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "x (a:1..5) y"])
def test_parse_attention_rejects_unreadable_weight(text):
    with pytest.raises(PromptError, match="bad emphasis weight"):
        parse_attention(text)


def test_unreadable_weight_without_open_bracket_is_text():
    assert parse_attention("a:1.2.3)") == [("a:1.2.3)", 1.0)]


# ---------------------------------------------------------------------------------------------------------------------
# prompt_schedule
# ---------------------------------------------------------------------------------------------------------------------

SCHEDULE_CASES_10 = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    ("a [b::0.6] c", [(6, "a b c"), (10, "a  c")]),
    ("[a:b:5 ]", [(5, "a"), (10, "b")]),
    ("[a: b :5]", [(5, "a"), (10, " b ")]),
    ("[a:b:2.0]", [(10, "a")]),
    ("[a:b:1.5]", [(10, "a")]),
    ("[a:b:0.05]", [(10, "b")]),
    ("[a:b:-1]", [(10, "b")]),
    ("[a:b:+3]", [(3, "a"), (10, "b")]),
    ("[a:b:1e0]", [(1, "a"), (10, "b")]),
    ("[a:b:100]", [(10, "a")]),
    ("[a|[b:c:3]]", [(s, "a" if s % 2 else "b" if s <= 3 else "c") for s in range(1, 11)]),
    ("[[a|b]:3]", [(1, ""), (2, ""), (3, ""), (4, "b"), (5, "a"), (6, "b"), (7, "a"), (8, "b"), (9, "a"), (10, "b")]),
    ("[a:b:c:3] [d:3]", [(3, "[a:b:c:3] "), (10, "[a:b:c:3] d")]),
    ("[[d:3]", [(3, "["), (10, "[d")]),
    ("x\\[a:3] [b:3]", [(3, "x\\[a:3] "), (10, "x\\[a:3] b")]),
    ("1girl, :d, [cat:dog:0.5], smile", [(5, "1girl, :d, cat, smile"), (10, "1girl, :d, dog, smile")]),
    ("[a:b:.]", [(10, "[a:b:.]")]),
    ("", [(10, "")]),
]


@pytest.mark.parametrize(("prompt", "expected"), SCHEDULE_CASES_10)
def test_prompt_schedule_10_steps(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


@pytest.mark.parametrize(
    "prompt",
    ["a | b [c:3]", "(a|b) [c:3]", "[a|b:3]", "[a:b:3|c]", "a [b:3] c\\", "a [b:3]\\\nc", "a [{b|d{:.5] c"],
)
def test_prompt_outside_the_grammar_is_used_unchanged(prompt):
    assert prompt_schedule(prompt, 10) == [(10, prompt)]


def test_prompt_schedules_batch():
    assert prompt_schedules(["a", "[b:2]", "a"], 4) == [[(4, "a")], [(2, ""), (4, "b")], [(4, "a")]]


def test_old_scheduling_reads_values_from_one_as_steps():
    assert prompt_schedule("[a:b:1.5]", 10, old_scheduling=True) == [(1, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0.5]", 10, old_scheduling=True) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:2.0]", 10) == [(10, "a")]


def test_a1111_readme_example_at_100_steps():
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("[d:3]]", [(3, "]"), (10, "d]")]), ("(a)[b:3]:", [(3, "(a):"), (10, "(a)b:")])],
)
def test_ambiguous_groups_are_read_as_groups(prompt, expected):
    """A1111 (lark 1.1.2) reads these either way depending on the hash seed; nijimi reads them one way, always."""
    assert prompt_schedule(prompt, 10) == expected


def test_deep_nesting_does_not_crash():
    prompt = "(" * 3000 + "a"
    assert prompt_schedule(prompt, 4) == [(4, prompt)]


def test_schedule_needs_a_step():
    with pytest.raises(PromptError, match="steps must be at least 1"):
        prompt_schedule("a", 0)


def test_schedule_index_counts_denoiser_calls_from_zero():
    assert [schedule_index([3, 10], s) for s in range(10)] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert [schedule_index([1, 2, 3], s) for s in range(3)] == [0, 0, 1]
    assert schedule_index([3, 10], 11) == 0


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("a cat :1.5", [("a cat", 1.5)]),
        ("a cat:  .5  ", [("a cat", 0.5)]),
        ("(a cat:1.5)", [("(a cat:1.5)", 1.0)]),
        ("a AND b:0.5", [("a", 1.0), (" b", 0.5)]),
        ("ANDROID", [("ANDROID", 1.0)]),
    ],
)
def test_split_composable(prompt, expected):
    assert split_composable(prompt) == expected


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
    ids, _ = chunk_prompt("a b", ClipTokenizer.sd2())
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


def test_comma_back_off_can_be_turned_off(tok):
    text = " ".join(["a"] * 60) + ", " + " ".join(["b"] * 20)
    ids, _ = chunk_prompt(text, tok, comma_backtrack=0)
    assert ids.tolist() == [_window([A] * 60 + [COMMA] + [B] * 14), _window([B] * 6)]


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
# apply_emphasis / encode_weighted / pad_conds
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


def test_pad_conds_appends_empty_chunks_to_the_shorter():
    g = torch.Generator().manual_seed(4)
    cond, uncond, empty = torch.randn(2, 231, 3, generator=g), torch.randn(2, 77, 3, generator=g), torch.randn(1, 77, 3)
    c, u = pad_conds(cond, uncond, empty)
    assert c is cond and u.shape == (2, 231, 3)
    assert torch.equal(u[:, :77], uncond) and torch.equal(u[1, 77:154], empty[0]) and torch.equal(u[0, 154:], empty[0])
    u2, c2 = pad_conds(uncond, cond, empty)
    assert torch.equal(u2, u) and c2 is cond
    with pytest.raises(PromptError, match="whole chunks"):
        pad_conds(torch.zeros(1, 80, 3), uncond[:1], empty)


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
