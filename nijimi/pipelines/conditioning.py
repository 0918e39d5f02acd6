"""Prompt → text-encoder conditioning, per sampling step, the way A1111 builds it (see :mod:`nijimi.text.prompt`).

A prompt's scheduled texts are encoded together (A1111's emphasis normalises over that batch), once per pipeline:
a second generation with the same prompt, steps and clip skip runs no text-encoder pass. The cache keeps the
:data:`CACHE_SIZE` most recently used prompts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nijimi.models.ldm import LatentDiffusion
from nijimi.text.prompt import ScheduledCond, encode_prompt_schedule

CACHE_SIZE = 32
"""Prompt encodings kept per pipeline (an SD 1.x encoding of one text is 77 × 768 floats, 236 kB)."""


@dataclass(frozen=True)
class StepConditioning:
    """The prompt's and (with guidance) the negative prompt's conditioning over the sampling steps."""

    cond: ScheduledCond
    uncond: ScheduledCond | None

    @property
    def guidance_weight(self) -> float:
        """A1111's prompt weight (``"a cat :1.5"``) multiplies the guidance scale."""
        return self.cond.weight

    def at(self, step: int, batch: int) -> tuple[dict, dict | None]:
        """The U-Net inputs for sampling step ``step`` (0-based), repeated for ``batch`` images: the text ``context``
        and ``is_cond`` (batch,) bool, True in the conditional branch (guided batches keep telling the rows apart)."""
        context = self.cond.at_step(step).expand(batch, -1, -1)
        c = {"context": context, "is_cond": torch.ones(batch, dtype=torch.bool, device=context.device)}
        if self.uncond is None:
            return c, None
        return c, {"context": self.uncond.at_step(step).expand(batch, -1, -1), "is_cond": ~c["is_cond"]}

    def per_step(self, denoiser: Callable[..., torch.Tensor], first: int, batch: int) -> Callable[..., torch.Tensor]:
        """The top of the model stack, what the sampler calls: ``model(x, σ, step=i)`` gives ``denoiser`` the
        conditioning of sampling step ``first + i`` (prompt editing picks the text per step; img2img samplers start
        at step ``first``) and that step index."""

        def model(x: torch.Tensor, sigma: torch.Tensor, *, step: int) -> torch.Tensor:
            cond, uncond = self.at(first + step, batch)
            return denoiser(x, sigma, cond=cond, uncond=uncond, step=first + step)

        return model


class Conditioner:
    """Encodes prompts with the model's tokenizer and text encoder, caching each prompt's encoding.

    Encodings come in the text encoder's dtype, on its device.
    """

    def __init__(self, model: LatentDiffusion) -> None:
        self.model = model
        self.tokenizer = model.config.tokenizer()
        self.cache: OrderedDict[tuple, ScheduledCond] = OrderedDict()

    @torch.inference_mode()
    def schedule(self, prompt: str, steps: int, clip_skip: int | None, negative: bool) -> ScheduledCond:
        """The encoded prompt schedule of ``prompt`` over ``steps`` steps (see ``encode_prompt_schedule``)."""
        key = (prompt, steps, clip_skip, negative)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        text_encoder = self.model.text_encoder
        device = next(text_encoder.parameters()).device
        encode = lambda ids: text_encoder(ids.to(device), clip_skip=clip_skip)  # noqa: E731
        self.cache[key] = encode_prompt_schedule(prompt, steps, self.tokenizer, encode, negative=negative)
        if len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        return self.cache[key]

    def step_conditioning(self, prompt: str, negative: str, steps: int, clip_skip: int | None,
                          guided: bool) -> StepConditioning:
        """Conditioning for every step; ``guided`` adds the negative prompt's (the unconditional branch)."""
        return StepConditioning(self.schedule(prompt, steps, clip_skip, False),
                                self.schedule(negative, steps, clip_skip, True) if guided else None)
