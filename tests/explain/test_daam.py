"""DAAM collection (nijimi.explain.daam): the probabilities it sums are softmax(QKᵀ/√d) of the conditional rows of
every recorded attn2 call, it leaves the U-Net's output untouched, it maps words to token positions as the prompt
encoding places them, and it upsamples as DAAM does."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize

from nijimi.errors import PromptError
from nijimi.explain.daam import AttentionRecorder, find_word, layer_size, prompt_words
from nijimi.io.embeddings import EmbeddingLibrary, save_embedding
from nijimi.models.layers import TransformerBlock
from nijimi.models.unet import UNetConfig, UNetModel
from nijimi.text.tokenizer import ClipTokenizer

CONFIG = UNetConfig(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=2,
                    context_dim=24, norm_groups=8)
"""Cross-attention at levels 0 and 1 (recorded) and in the middle block at level 2 (left out, as DAAM does)."""


@pytest.fixture(scope="module")
def unet() -> UNetModel:
    model = UNetModel(CONFIG).eval().requires_grad_(False)
    randomize(model, 0)
    return model


def _inputs(batch: int, h: int = 8, w: int = 8, tokens: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, h, w, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, tokens, CONFIG.context_dim, generator=g))


def _record(unet: UNetModel, x, t, context, is_cond=None) -> tuple[AttentionRecorder, torch.Tensor]:
    recorder = AttentionRecorder(unet)
    pipe = SimpleNamespace(probe_layer=None)
    with recorder.attached(pipe):
        net = pipe.probe_layer(lambda x, t, context, **kw: unet(x, t, context))
        out = net(x, t, context, step=0, is_cond=is_cond)
    return recorder, out


def _reference(unet: UNetModel, x, t, context, rows: list[int]) -> dict[tuple[int, int], torch.Tensor]:
    """Σ_heads softmax(q·kᵀ/√d) of ``rows`` per recorded resolution, from attn2's inputs captured by hooks."""
    sums: dict[tuple[int, int], torch.Tensor] = {}

    def capture(attn, args):
        inputs, ctx = args
        q = attn.to_q(inputs).view(*inputs.shape[:2], attn.heads, attn.head_dim).transpose(1, 2)
        k = attn.to_k(ctx).view(*ctx.shape[:2], attn.heads, attn.head_dim).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / attn.head_dim**0.5, dim=-1).sum(1)[rows]
        level, (h, w) = layer_size(tuple(x.shape[-2:]), probs.shape[1])
        if level < 2:
            sums[(h, w)] = sums.get((h, w), 0) + probs.transpose(1, 2).reshape(len(rows), -1, h, w)

    hooks = [m.attn2.register_forward_pre_hook(capture) for m in unet.modules() if isinstance(m, TransformerBlock)]
    try:
        unet(x, t, context)
    finally:
        for hook in hooks:
            hook.remove()
    return sums


def test_recorded_maps_are_the_conditional_rows_attention_probabilities(unet):
    x, t, context = _inputs(2)
    recorder, _ = _record(unet, x, t, context, is_cond=torch.tensor([False, True]))
    expected = _reference(unet, x, t, context, rows=[1])
    assert set(recorder.sums) == {(0, (8, 8), (8, 8)), (0, (8, 8), (4, 4))}  # the 2×2 middle block is left out
    for (_, _, size), sums in recorder.sums.items():
        torch.testing.assert_close(sums, expected[size], rtol=1e-5, atol=1e-6)
    assert recorder.calls == 3 + 3  # level 0: input + 2 output transformers; level 1: the same


def test_unconditional_calls_compute_nothing_and_all_true_rows_take_every_row(unet):
    x, t, context = _inputs(2)
    recorder, _ = _record(unet, x, t, context, is_cond=torch.tensor([False, False]))
    assert recorder.sums == {} and recorder.calls == 0
    recorder, _ = _record(unet, x, t, context, is_cond=None)
    expected = _reference(unet, x, t, context, rows=[0, 1])
    for (_, _, size), sums in recorder.sums.items():
        torch.testing.assert_close(sums, expected[size], rtol=1e-5, atol=1e-6)


def test_recording_leaves_the_unet_output_unchanged_and_detaches(unet):
    x, t, context = _inputs(2)
    plain = unet(x, t, context)
    recorder, recorded = _record(unet, x, t, context, is_cond=torch.tensor([False, True]))
    assert torch.equal(plain, recorded)
    assert all(layer.probe is None for layer in recorder.layers)
    assert torch.equal(unet(x, t, context), plain)


def test_probes_are_removed_when_the_generation_fails(unet):
    recorder, pipe = AttentionRecorder(unet), SimpleNamespace(probe_layer=None)
    with pytest.raises(RuntimeError, match="boom"), recorder.attached(pipe):
        assert all(layer.probe is not None for layer in recorder.layers)
        raise RuntimeError("boom")
    assert pipe.probe_layer is None and all(layer.probe is None for layer in recorder.layers)


def test_a_unet_with_attention_only_at_its_deepest_level_keeps_it():
    model = UNetModel(dataclasses.replace(CONFIG, attention_levels=(2,))).eval()
    x, t, context = _inputs(1)
    recorder, _ = _record(model, x, t, context)
    assert {key[2] for key in recorder.sums} == {(2, 2)}


def test_odd_latents_map_to_their_levels():
    assert layer_size((9, 7), 63) == (0, (9, 7))
    assert layer_size((9, 7), 20) == (1, (5, 4))
    assert layer_size((9, 7), 6) == (2, (3, 2))
    with pytest.raises(ValueError, match="21 attention cells"):
        layer_size((9, 7), 21)


def test_maps_upsample_each_resolution_to_the_latent_then_to_the_image():
    recorder = AttentionRecorder(UNetModel(CONFIG))
    g = torch.Generator().manual_seed(0)
    fine, coarse = torch.rand(1, 3, 8, 8, generator=g), torch.rand(1, 3, 4, 4, generator=g)
    recorder.sums = {(0, (8, 8), (8, 8)): fine, (0, (8, 8), (4, 4)): coarse}
    up = F.interpolate(coarse, size=(8, 8), mode="bicubic", align_corners=False)
    expected = F.interpolate(fine + up, size=(32, 32), mode="bicubic", align_corners=False).clamp(min=0)
    maps = recorder.maps((32, 32))
    assert list(maps) == [0]
    torch.testing.assert_close(maps[0], expected)
    constant = AttentionRecorder(UNetModel(CONFIG))
    constant.sums = {(0, (8, 8), (4, 4)): torch.full((1, 2, 4, 4), 0.25)}
    torch.testing.assert_close(constant.maps((40, 24))[0], torch.full((1, 2, 40, 24), 0.25))


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def test_words_of_a_plain_prompt_and_their_positions(tokenizer):
    words = prompt_words("a red circle, a blue square", tokenizer)
    assert [(w.text, w.positions) for w in words] == [
        ("a", (1,)), ("red", (2,)), ("circle", (3,)), (",", (4,)), ("a", (5,)), ("blue", (6,)), ("square", (7,))]
    assert find_word("Red", words, tokenizer) == (2,)
    assert find_word("a", words, tokenizer) == (1, 5)
    assert find_word("green", words, tokenizer) == ()


def test_emphasis_is_syntax_and_multi_token_words_keep_all_their_tokens(tokenizer):
    words = prompt_words("a (red:1.3) [circle] (t-shirt)", tokenizer)
    assert [w.text for w in words] == ["a", "red", "circle", "t", "-", "shirt"]
    assert find_word("t-shirt", words, tokenizer) == (4, 5, 6)
    unknown = prompt_words("a zyxwvutsrq", tokenizer)  # one word, several BPE tokens
    assert len(unknown[1].positions) > 1 and unknown[1].positions[0] == 2


def test_long_prompts_and_break_continue_in_the_next_chunk(tokenizer):
    words = prompt_words("red BREAK blue", tokenizer)
    assert [(w.text, w.positions) for w in words] == [("red", (1,)), ("blue", (77 + 1,))]
    long = prompt_words(" ".join(["cat"] * 80), tokenizer)
    assert [w.positions[0] for w in long[74:77]] == [75, 77 + 1, 77 + 2]


def test_a_textual_inversion_embedding_has_no_words(tmp_path, tokenizer):
    save_embedding(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), tmp_path / "glow.safetensors")
    vocabulary = EmbeddingLibrary(tmp_path, (), 32).vocabulary(tokenizer)
    with pytest.raises(PromptError, match="cannot map the words of the prompt 'a glow circle'"):
        prompt_words("a glow circle", tokenizer, vocabulary)
    assert [w.text for w in prompt_words("a red circle", tokenizer, vocabulary)] == ["a", "red", "circle"]
