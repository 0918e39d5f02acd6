"""Per-token cross-attention maps of a generation: DAAM (Tang et al. 2023, "What the DAAM: Interpreting Stable
Diffusion Using Cross Attention", arXiv:2210.04885, §3).

Every cross-attention layer (``attn2`` of each transformer block of the U-Net) computes, at every sampling step and
for each of its heads, the probabilities ``A = softmax(Q·Kᵀ/√d)`` (L latent cells × M prompt tokens). DAAM's map of
token ``j`` is ``D_j = Σ_steps Σ_layers Σ_heads F↑(A[:, j])``, each layer's map (h_l × w_l) upsampled bicubically to
the latent and then to the image size (F↑), clamped at 0; a word's map is the sum of its BPE tokens' maps. Only the
conditional rows count (the prompt's pass of classifier-free guidance, ``is_cond`` in the model stack). As DAAM's
reference code, which leaves out the maps at 1/8 of the latent side (SD's coarsest, the middle block's 8×8 at
512 px), the maps of the U-Net's deepest level are left out: for SD exactly DAAM's choice; for the embedded model
its 4×4 maps, which alone put a colour word on its object at 0.9× the object's area share — no better than
spread evenly — while its 8×8 maps put it there at 3.9× (medians over held-out captions, ``nijimi eval attention``).

:class:`AttentionRecorder` collects them: while :meth:`~AttentionRecorder.attached` to a pipeline, a probe on each
``attn2`` (:attr:`nijimi.models.layers.Attention.probe`) computes ``A`` for the conditional rows only, summed over
heads, and adds it to one running sum per layer resolution — bicubic interpolation is linear, so summing the layers
of one resolution first and upsampling each sum once at the end gives DAAM's numbers (up to where the final clamp
at 0 acts) at a fraction of the cost. Detached, the U-Net is untouched: no probe, no layer in the model stack.

:func:`prompt_words` maps a prompt's words to their token positions in the conditioning (``chunk · 77 + index``),
following the prompt encoding of :mod:`nijimi.text.prompt`: emphasis ``(red:1.2)`` and ``BREAK`` are syntax, long
prompts run over several 77-token chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nijimi.errors import PromptError
from nijimi.models.layers import TransformerBlock
from nijimi.models.unet import UNetModel
from nijimi.pipelines.pipeline import Pipeline
from nijimi.text.prompt import chunk_prompt, schedule_index
from nijimi.text.prompt_syntax import BREAK_WEIGHT, parse_attention
from nijimi.text.tokenizer import ClipTokenizer
from nijimi.text.vocabulary import ExtraVocabulary

Network = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class PromptWord:
    """One piece of a prompt as the tokenizer cuts it (a lower-cased word, a digit, a run of punctuation) and the
    positions of its tokens in the prompt's conditioning (``chunk · 77 + index``; index 0 of a chunk is BOS)."""

    text: str
    positions: tuple[int, ...]


def prompt_words(text: str, tokenizer: ClipTokenizer, vocabulary: ExtraVocabulary | None = None) -> list[PromptWord]:
    """The words of one prompt text (no ``<lora:…>`` tags, no prompt editing: one entry of its schedule) in order,
    each with its token positions. The prompt is chunked as its encoding is (with ``vocabulary``, the
    textual-inversion embeddings it may name); PromptError when its tokens are not its words' (an embedding)."""
    ids, _ = chunk_prompt(text, tokenizer, vocabulary)
    eos = tokenizer.eos_token_id
    found = [(c * len(row) + j, row[j]) for c, row in enumerate(ids.tolist()) for j in range(1, row.index(eos, 1))]
    pieces = [p for piece, weight in parse_attention(text) if weight != BREAK_WEIGHT or piece != "BREAK"
              for p in tokenizer.pieces(piece)]
    if [i for _, piece_ids in pieces for i in piece_ids] != [i for _, i in found]:
        raise PromptError(f"cannot map the words of the prompt {text!r} to its tokens (a textual-inversion "
                          "embedding's tokens are not words)")
    words, at = [], 0
    for piece, piece_ids in pieces:
        words.append(PromptWord(piece, tuple(position for position, _ in found[at : at + len(piece_ids)])))
        at += len(piece_ids)
    return words


def find_word(word: str, words: Sequence[PromptWord], tokenizer: ClipTokenizer) -> tuple[int, ...]:
    """Token positions of every occurrence of ``word`` (cut by the tokenizer: ``"Red"`` is ``red``, ``"t-shirt"``
    three pieces in a row) in ``words``; empty when it does not occur."""
    wanted = [piece for piece, _ in tokenizer.pieces(word)]
    texts = [w.text for w in words]
    found: list[int] = []
    for start in range(len(words) - len(wanted) + 1) if wanted else ():
        if texts[start : start + len(wanted)] == wanted:
            found += [p for w in words[start : start + len(wanted)] for p in w.positions]
    return tuple(found)


def layer_size(latent: tuple[int, int], cells: int) -> tuple[int, tuple[int, int]]:
    """The U-Net level (0 = the latent's resolution) with ``cells`` = h·w cells for a latent of (H, W), and its
    (h, w): each level halves the sides, rounding up (a stride-2 convolution with padding 1)."""
    (h, w), level = latent, 0
    while h * w > cells:
        h, w, level = (h + 1) // 2, (w + 1) // 2, level + 1
    if h * w != cells:
        raise ValueError(f"{cells} attention cells fit no level of a {latent[0]}×{latent[1]} latent")
    return level, (h, w)


class AttentionRecorder:
    """Sums of a U-Net's cross-attention probabilities over heads, steps and layers, per prompt-schedule entry,
    latent size and layer resolution (see the module docstring).

    Layers at the U-Net's deepest level are not recorded (see the module docstring), unless no shallower level has
    cross-attention. ``end_steps``: the prompt schedule's entries
    (:func:`nijimi.text.prompt_syntax.prompt_schedule`); a step's maps go to the entry it encodes with (prompt
    editing), all to entry 0 without. ``sums[(entry, latent (h, w),
    layer (h_l, w_l))]``: (B, M, h_l, w_l) float32, B the conditional rows of each U-Net call (one per image).
    """

    def __init__(self, unet: UNetModel, end_steps: Sequence[int] = ()) -> None:
        self.layers = [m.attn2 for m in unet.modules() if isinstance(m, TransformerBlock)]
        levels = len(unet.config.channel_mult)
        shallower = [level for level in unet.config.attention_levels if level < levels - 1]
        self.deepest = levels - 1 if shallower else levels  # with attention only there, the deepest level stays
        self.end_steps = list(end_steps)
        self.sums: dict[tuple[int, tuple[int, int], tuple[int, int]], torch.Tensor] = {}
        self.calls = 0
        self._rows: torch.Tensor | None = None
        self._skip = False
        self._where: tuple[int, tuple[int, int]] = (0, (0, 0))

    @contextlib.contextmanager
    def attached(self, pipe: Pipeline) -> Iterator[AttentionRecorder]:
        """While the block runs, ``pipe`` (whose U-Net this is) records into this recorder; probes and stack layer
        are removed afterwards, also on errors."""
        for layer in self.layers:
            layer.probe = self._probe
        pipe.probe_layer = self.stack_layer
        try:
            yield self
        finally:
            pipe.probe_layer = None
            for layer in self.layers:
                layer.probe = None

    def stack_layer(self, net: Network) -> Network:
        """The model-stack layer right above the U-Net: it notes each call's latent size, conditional rows and
        schedule entry for the probes, then calls ``net`` unchanged."""

        def observed(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *, step: int | None = None,
                     is_cond: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
            entry = schedule_index(self.end_steps, step) if self.end_steps and step is not None else 0
            self._where = (entry, (x.shape[-2], x.shape[-1]))
            rows = None if is_cond is None else is_cond.to(x.device)
            self._skip = rows is not None and not bool(rows.any())
            self._rows = None if rows is None or bool(rows.all()) else rows.nonzero().squeeze(1)
            return net(x, t, context, step=step, is_cond=is_cond, **kwargs)

        return observed

    def _probe(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """q: (B, heads, L, d), k: (B, heads, M, d) of one ``attn2`` call: add Σ_heads softmax(q·kᵀ/√d) of the
        conditional rows to the running sum of its resolution (nothing at the deepest level)."""
        entry, latent = self._where
        level, (h, w) = layer_size(latent, q.shape[2])
        if self._skip or level >= self.deepest:
            return
        if self._rows is not None:
            q, k = q.index_select(0, self._rows), k.index_select(0, self._rows)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
        probs = scores.softmax(dim=-1).sum(dim=1)  # (B, L, M)
        maps = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], h, w)
        key = (entry, latent, (h, w))
        if key in self.sums:
            self.sums[key] += maps
        else:
            self.sums[key] = maps
        self.calls += 1

    def maps(self, size: tuple[int, int]) -> dict[int, torch.Tensor]:
        """Per schedule entry, DAAM's token maps (B, M, H, W) float32 on the CPU at image ``size`` (H, W): each
        resolution's sum upsampled bicubically to its latent, the latents' sums to ``size``, clamped at 0."""
        latents: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}
        for (entry, latent, _), sums in self.sums.items():
            up = F.interpolate(sums, size=latent, mode="bicubic", align_corners=False)
            latents[(entry, latent)] = latents[(entry, latent)] + up if (entry, latent) in latents else up
        out: dict[int, torch.Tensor] = {}
        for (entry, _), sums in latents.items():
            up = F.interpolate(sums, size=size, mode="bicubic", align_corners=False).float().cpu()
            out[entry] = out[entry] + up if entry in out else up
        return {entry: summed.clamp_(min=0) for entry, summed in out.items()}
