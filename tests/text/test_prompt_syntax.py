"""A1111 prompt grammar: tokens, syntax tree, emphasis, prompt editing, composable AND, numbers.

Expected values are A1111's own: the doctests of modules/prompt_parser.py, and outputs of its parser (lark 1.1.2,
the version A1111 pins) for the other cases.
"""

import pytest

from nijimi.errors import PromptError
from nijimi.text.prompt_syntax import (
    BREAK_WEIGHT,
    Alternation,
    Edit,
    Weighted,
    lex,
    parse,
    parse_attention,
    prompt_schedule,
    split_composable,
)

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
# lex / parse: one lexer, one syntax tree
# ---------------------------------------------------------------------------------------------------------------------

LEX_CASES = [
    ("", []),
    ("a (b:1.5) [c]", ["a ", "(", "b", ":", "1.5", ")", " ", "[", "c", "]"]),
    ("\\(a\\]\\\\b\\:c\\", ["\\(", "a", "\\]", "\\\\", "b", "\\", ":", "c", "\\"]),
    ("a BREAK b|BREAK", ["a", " BREAK ", "b", "|", "BREAK"]),
    ("aBREAK BREAKb x\\BREAK", ["aBREAK BREAKb x", "\\", "BREAK"]),
    ("[a:b:\n3]", ["[", "a", ":", "b", ":", "\n3", "]"]),
]


@pytest.mark.parametrize(("text", "tokens"), LEX_CASES)
def test_lex_cuts_tokens_that_join_to_the_prompt(text, tokens):
    assert lex(text) == tokens
    assert "".join(lex(text)) == text


PARSE_CASES = [
    ("a (b) [c]", ["a ", Weighted("(", ["b"]), " ", Weighted("[", ["c"])]),
    ("((a:1.2)):", [Weighted("(", [Weighted("(", ["a", ":", "1.2"])]), ":"]),
    ("(a:b)", [Weighted("(", ["a", ":", "b"])]),
    ("a [b:(c):0.5]", ["a ", Edit(["b"], [Weighted("(", ["c"])], "0.5")]),
    ("[b: 3 ]", [Edit(None, ["b"], "3")]),
    ("[a::1e-2]", [Edit(["a"], [], "1e-2")]),
    ("[a|[b|]]", [Alternation([["a"], [Alternation([["b"], []])]])]),
    ("[a\\:b:3]", [Edit(None, ["a", "\\", ":", "b"], "3")]),
    ("\\[a:3]", ["\\[", "a", ":", "3", "]"]),
    ("((a)[b|c]", ["(", Weighted("(", ["a"]), Alternation([["b"], ["c"]])]),
    ("[a (b] c)", ["[", "a ", "(", "b", "]", " c", ")"]),
    ("(a:b:1.5) BREAK", ["(", "a", ":", "b", ":", "1.5", ")", " BREAK"]),
    ("[a:b:c:3]", ["[", "a", ":", "b", ":", "c", ":", "3", "]"]),
]


@pytest.mark.parametrize(("text", "tree"), PARSE_CASES)
def test_parse(text, tree):
    assert parse(text) == tree


@pytest.mark.parametrize("text", ["a | [b:3]", "(a|b)", "[b:3] c\\", "[b:3]\\\nc", "(" * 3000 + "a"])
def test_a_prompt_outside_the_grammar_parses_as_its_tokens(text):
    assert parse(text) == lex(text)


def test_escapes_read_by_scheduling_and_by_emphasis():
    """Prompt editing escapes any character (lark's ``\\\\.``); emphasis only ``( ) [ ] \\\\`` and drops any other
    backslash (A1111's ``re_attention``), so ``\\:`` is text to the one and a weight's colon to the other."""
    assert prompt_schedule("[a\\:b:3]", 10) == [(3, ""), (10, "a\\:b")]
    assert parse_attention("(a\\:1.5)") == [("a", 1.5)]
    assert parse_attention("(a:b\\:1.5) \\|") == [("a:b", 1.5), (" |", 1.0)]
    assert parse_attention("x\\BREAK") == [("x", 1.0), ("BREAK", BREAK_WEIGHT), ("", 1.0)]


# ---------------------------------------------------------------------------------------------------------------------
# One number grammar: 1, 1., .5, -1, +2; an exponent only in an edit's ``when``
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("(a:1.)", [("a", 1.0)]), ("(a:.5)", [("a", 0.5)]), ("(a:-1)", [("a", -1.0)]), ("(a: +2 )", [("a", 2.0)]),
     ("(a:1e-2)", [("a:1e-2", 1.1)])],
)
def test_emphasis_weight_numbers(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize(
    ("when", "expected"),
    [("1.", [(10, "a")]), (".5", [(5, "a"), (10, "b")]), ("-1", [(10, "b")]), ("1e-2", [(10, "b")]),
     ("0.5e1", [(10, "a")]), ("3E0", [(3, "a"), (10, "b")]), ("1.2.3", [(10, "[a:b:1.2.3]")]),
     ("e1", [(10, "[a:b:e1]")])],
)
def test_edit_when_numbers(when, expected):
    assert prompt_schedule(f"[a:b:{when}]", 10) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a:1.", [("a", 1.0)]), ("a:.5", [("a", 0.5)]), ("a:-1", [("a", -1.0)]), ("a: +2 ", [("a", 2.0)]),
     ("a:1e-2", [("a:1e-2", 1.0)]), ("a:1.2.3", [("a:1.2.3", 1.0)])],
)
def test_guidance_weight_numbers(text, expected):
    assert split_composable(text) == expected


@pytest.mark.parametrize(
    "text", ["(", ")", "[", "]", ":", "|", "\\", "][)(", "[:]", "[|]", "(:)", "[::]", "[a:b:]", "((a]", "\n\\"]
)
def test_lone_and_unbalanced_brackets_never_raise(text):
    assert all(isinstance(weight, float) for _, weight in parse_attention(text))
    assert prompt_schedule(text, 3)[-1][0] == 3
