"""``nijimi eval shapes --phrasing``: the held-out captions in the first phrasing (default), the wider training
phrasing or paraphrases."""

import pytest

from nijimi.cli import main
from nijimi.eval.adherence import parse_caption, phrasing_of
from nijimi.train.shapes import sample_captions, split_of
from nijimi.ui import eval as eval_ui


@pytest.mark.parametrize("phrasing", [None, "original", "training", "paraphrase"])
def test_eval_shapes_scores_the_phrasing_asked_for(phrasing, monkeypatch, capsys) -> None:
    seen, evaluate = [], eval_ui.evaluate

    def recording(generate_fn, captions, seeds, palette):
        seen.append(captions)
        return evaluate(generate_fn, captions, seeds=seeds, palette=palette)

    monkeypatch.setattr(eval_ui, "evaluate", recording)
    extra = [] if phrasing is None else ["--phrasing", phrasing]
    assert main(["eval", "shapes", "--n", "2", "--steps", "1", "--seed", "3", "--quiet", *extra]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("all              2 ")
    expected = phrasing or "original"
    assert seen == [sample_captions(2, seed=3, phrasing=expected)]
    assert {phrasing_of(c) for c in seen[0]} == {"paraphrase" if expected == "paraphrase" else "training"}
    assert {split_of(parse_caption(c)) for c in seen[0]} == {"heldout"}


def test_eval_shapes_refuses_an_unknown_phrasing(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "shapes", "--n", "1", "--phrasing", "formal"])
    assert exit_.value.code == 2
    assert "argument --phrasing: invalid choice: 'formal'" in capsys.readouterr().err


@pytest.mark.parametrize("lora, expected", [
    (None, {"steps": 20, "deepcache": 2, "guidance_interval": (0.28, 1e4), "guidance": None}),
    ("lcm", {"steps": 4, "sampler": "lcm", "guidance": 1.0}),
])
def test_eval_shapes_fast_generates_with_generate_fasts_settings(lora, expected, monkeypatch, capsys) -> None:
    """Without an adapter, FAST (the user's --steps 1 is replaced); with the shipped LCM-LoRA, its recipe."""
    calls, load = [], eval_ui.load

    def recording_load(*args, **kwargs):
        pipe = load(*args, **kwargs)
        generate = pipe.generate
        pipe.generate = lambda prompt, **kw: calls.append(kw) or generate(prompt, **kw)
        return pipe

    monkeypatch.setattr(eval_ui, "load", recording_load)
    extra = [] if lora is None else ["--lora", lora]
    assert main(["eval", "shapes", "--n", "1", "--steps", "1", "--fast", "--quiet", *extra]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("all              1 ")
    assert len(calls) == 1 and {k: calls[0][k] for k in expected} == expected
