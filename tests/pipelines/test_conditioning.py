"""Prompt → U-Net conditioning inside the pipeline: A1111 emphasis computed by hand, prompt editing and alternation
reaching the network at the right steps (seen by a recording network), the guidance weight, long prompts, and the
prompt cache."""

from __future__ import annotations

import pytest
import torch

from nijimi.errors import PromptError
from nijimi.models.ldm import LatentDiffusion
from nijimi.pipelines import pipeline
from nijimi.pipelines.pipeline import Pipeline


class Recorder:
    """A fake U-Net call ``(x, t, context, …) → ε = 0`` that records every context it is given."""

    def __init__(self) -> None:
        self.contexts: list[torch.Tensor] = []

    def __call__(self, x, t, context, **_):
        self.contexts.append(context.clone())
        return torch.zeros_like(x)


@pytest.fixture
def pipe(make_model, config) -> Pipeline:
    """A fresh pipeline (its own prompt cache) over a small random model."""
    return Pipeline(make_model(config, seed=3))


def encode(pipe: Pipeline, text: str) -> torch.Tensor:
    """The plain encoding of one text (no emphasis): (77, D)."""
    with torch.no_grad():
        return pipe.model.text_encoder(pipe.conditioner.tokenizer([text]))[0]


def test_weighted_prompt_is_the_a1111_rule_by_hand(pipe):
    """A1111's "Original" emphasis: multiply each token's hidden state by its weight, then rescale the whole to the
    unweighted mean. ``(red:1.5)`` weighs 1.5, ``[blue]`` 1/1.1, BOS/EOS/padding 1."""
    tok = pipe.conditioner.tokenizer
    pieces = [("a ", 1.0), ("red", 1.5), (" cube, ", 1.0), ("blue", 1 / 1.1), (" sphere", 1.0)]
    ids, weights = [tok.bos_token_id], [1.0]
    for text, weight in pieces:
        piece = tok.encode(text)
        ids += piece
        weights += [weight] * len(piece)
    ids += [tok.eos_token_id] * (77 - len(ids))
    weights += [1.0] * (77 - len(weights))
    with torch.no_grad():
        z = pipe.model.text_encoder(torch.tensor([ids]))
    weighted = z * torch.tensor(weights)[None, :, None]
    expected = weighted * (z.mean() / weighted.mean())
    ours = pipe.conditioner.step_conditioning("a (red:1.5) cube, [blue] sphere", "", 10, None, guided=False)
    assert ours.cond.cond.shape == (1, 77, 32)
    assert float((ours.cond.at_step(0) - expected[0]).abs().max()) <= 1e-6
    assert float((ours.cond.at_step(0) - z[0]).abs().max()) > 0.1  # the weights did change it


def test_prompt_editing_switches_at_the_a1111_step(pipe, monkeypatch):
    """``[cat:dog:2]`` over 4 steps: A1111 uses "cat" while the 0-based step is <= 2, then "dog"; the guided batch
    is [negative; prompt] at every step."""
    recorder = Recorder()
    monkeypatch.setattr(pipe, "_unet", recorder)
    pipe.generate("a [cat:dog:2] in the snow", "bad", steps=4, sampler="euler", guidance=5.0, seed=0, width=64,
                  height=64)
    cat, dog, bad = (encode(pipe, t) for t in ("a cat in the snow", "a dog in the snow", "bad"))
    assert len(recorder.contexts) == 4
    for step, context in enumerate(recorder.contexts):
        assert context.shape == (2, 77, 32)
        assert torch.allclose(context[0], bad, atol=1e-5)
        expected, other = (cat, dog) if step <= 2 else (dog, cat)
        assert torch.allclose(context[1], expected, atol=1e-5)
        assert not torch.allclose(context[1], other, atol=1e-2)


def test_alternation_and_editing_in_the_negative_prompt(pipe, monkeypatch):
    """``[red|blue]`` over 4 steps is A1111's schedule red (to step 1), blue (2), red (3), blue (4), read with the
    0-based step: red, red, blue, red. The negative prompt is scheduled too: ``[ugly::1]`` drops "ugly" after
    step 1."""
    recorder = Recorder()
    monkeypatch.setattr(pipe, "_unet", recorder)
    pipe.generate("a [red|blue] ball", "[ugly::1]", steps=4, sampler="euler", guidance=5.0, seed=0, width=64,
                  height=64)
    red, blue, ugly, empty = (encode(pipe, t) for t in ("a red ball", "a blue ball", "ugly", ""))
    assert len(recorder.contexts) == 4
    for step, context in enumerate(recorder.contexts):
        assert torch.allclose(context[1], blue if step == 2 else red, atol=1e-5)
        assert torch.allclose(context[0], ugly if step <= 1 else empty, atol=1e-5)


def test_heun_second_call_uses_the_next_steps_conditioning(pipe, monkeypatch):
    """Heun evaluates at σ_i and σ_{i+1}; the second call already counts as step i + 1, as A1111 counts calls."""
    recorder = Recorder()
    monkeypatch.setattr(pipe, "_unet", recorder)
    pipe.generate("[cat:dog:1]", steps=3, sampler="heun", guidance=1.0, seed=0, width=64, height=64)
    cat, dog = encode(pipe, "cat"), encode(pipe, "dog")
    used = ["cat" if torch.allclose(c[0], cat, atol=1e-5) else "dog" if torch.allclose(c[0], dog, atol=1e-5)
            else "?" for c in recorder.contexts]
    # calls: (σ0, σ1), (σ1, σ2), (σ2) — steps 0, 1 | 1, 2 | 2; cat while step <= 1.
    assert used == ["cat", "cat", "cat", "dog", "dog"]


def test_guidance_weight_multiplies_the_cfg_scale(pipe):
    """A1111's ``"prompt :1.5"`` guidance weight: the same pixels as the bare prompt at 1.5 × cfg."""
    weighted = pipe.generate("a red cube :1.5", "blue", steps=3, sampler="euler", guidance=2.0, seed=4, width=64,
                             height=64)
    plain = pipe.generate("a red cube", "blue", steps=3, sampler="euler", guidance=3.0, seed=4, width=64, height=64)
    other = pipe.generate("a red cube", "blue", steps=3, sampler="euler", guidance=2.0, seed=4, width=64, height=64)
    assert torch.equal(weighted.pixels, plain.pixels)
    assert float((weighted.pixels - other.pixels).abs().max()) > 1e-3


def test_long_prompt_runs_cond_and_uncond_separately(pipe, monkeypatch):
    """A prompt of more than 75 tokens is two 77-token chunks (154 tokens) while the negative prompt is one: the
    U-Net is called once per branch, as A1111 does without "pad conds"."""
    recorder = Recorder()
    monkeypatch.setattr(pipe, "_unet", recorder)
    long_prompt = "a red cube, " * 30
    assert 75 < len(pipe.conditioner.tokenizer.encode(long_prompt)) <= 150
    pipe.generate(long_prompt, "bad", steps=2, sampler="euler", guidance=5.0, seed=0, width=64, height=64)
    assert [tuple(c.shape) for c in recorder.contexts] == [(1, 77, 32), (1, 154, 32)] * 2


def test_same_prompt_twice_runs_the_text_encoder_once(pipe):
    calls = []
    hook = pipe.model.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    try:
        pipe.generate("a red cube", "blue", steps=2, sampler="euler", seed=1, width=64, height=64)
        assert len(calls) == 2  # prompt and negative prompt
        pipe.generate("a red cube", "blue", steps=2, sampler="euler", seed=2, width=64, height=64)
        assert len(calls) == 2
        pipe.generate("a [red:green:1] cube", "blue", steps=2, sampler="euler", seed=1, width=64, height=64)
        assert calls[2:] == [torch.Size([2, 77])]  # both scheduled texts in one batch; the negative is cached
    finally:
        hook.remove()


def test_cache_keeps_the_most_recent_prompts(pipe, monkeypatch):
    monkeypatch.setattr(pipeline, "CACHE_SIZE", 2)
    for prompt in ("one", "two", "one", "three"):
        pipe.conditioner.schedule(prompt, 4, None, False)
    assert [key[0] for key in pipe.conditioner.cache] == ["one", "three"]


def test_fresh_text_encoder_gives_finite_conditioning(config):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LatentDiffusion(config)
    cond = Pipeline(model).conditioner.schedule("a boat", 4, None, False).cond
    assert torch.isfinite(cond).all()


def test_prompt_errors(pipe):
    with pytest.raises(PromptError, match="the prompt is empty"):
        pipe.generate("", steps=2)
    pipe.generate("", steps=1, guidance=1.0, seed=0, width=64, height=64)  # unconditional is fine
    with pytest.raises(PromptError, match="AND"):
        pipe.generate("a cat AND a dog", steps=2)
