"""Less U-Net work per image: model-stack layers for guidance only inside a σ interval and DeepCache, and the
``--fast`` settings that use them.

Both wrap the step-aware stack of :meth:`Pipeline.model_stack <nijimi.pipelines.pipeline.Pipeline.model_stack>`, so
they work with every sampler (a call belongs to the step index the sampler gives it: Heun's second call, at
``sigmas[i+1]``, to step i + 1), LoRA (merged weights: nothing to do) and ControlNet; switched off they are not in
the stack at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nijimi.adapters.fewstep import FewStep
from nijimi.models.unet import FeatureCache

Network = Callable[..., torch.Tensor]


def with_guidance_interval(denoiser: Network, low: float, high: float) -> Network:
    """Classifier-free guidance only for σ in (``low``, ``high``], "Applying guidance in a limited interval"
    (Kynkäänniemi et al. 2024, arXiv:2404.07724, eq. 2); elsewhere one conditional pass (B rows, no unconditional
    branch), which is what guidance scale 1 gives. Wraps ``denoiser(x, σ, cond=…, uncond=…, **kw)``."""

    def windowed(x: torch.Tensor, sigma: torch.Tensor, *, cond: Any, uncond: Any = None, **kwargs: Any) -> torch.Tensor:
        inside = low < float(torch.as_tensor(sigma).flatten()[0]) <= high
        return denoiser(x, sigma, cond=cond, uncond=uncond if inside else None, **kwargs)

    return windowed


def with_deepcache(full: Network, shallow: Network, interval: int, first: int, depth: int = 1) -> Network:
    """DeepCache (Ma et al. 2024, arXiv:2312.00858, uniform 1:N strategy): ``full`` (the stack down to the U-Net)
    runs on sampling steps ``first``, ``first + interval``, … and refreshes the cached deep feature
    (:class:`~nijimi.models.unet.FeatureCache` of ``depth``); the other steps run ``shallow`` (the stack without
    ControlNets) on the cache. ControlNet residuals thus enter on full steps only, through the cached feature; the
    ControlNets do not run on cached steps. Each row layout (a guided [uncond; cond] batch, a conditional-only
    batch, the separate calls of unbatchable prompts) keeps its own cache; a layout with none yet runs full.
    Layers called ``net(x, t, context, *, step, is_cond, **kw)``; the U-Net gets ``cache=``."""
    caches: dict[tuple, FeatureCache] = {}

    def cached(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *, step: int,
               is_cond: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        key = (tuple(x.shape), None if is_cond is None else tuple(is_cond.tolist()))
        if (step - first) % interval == 0 or key not in caches:
            caches[key] = FeatureCache(depth)
            return full(x, t, context, step=step, is_cond=is_cond, cache=caches[key], **kwargs)
        return shallow(x, t, context, step=step, is_cond=is_cond, cache=caches[key], **kwargs)

    return cached


FAST: dict[str, Any] = {"steps": 20, "deepcache": 2, "guidance_interval": (0.28, 1e4)}
"""``--fast`` for any checkpoint without a few-step adapter: the training-free settings that kept the embedded
model's adherence (``nijimi eval shapes``) within 3 points of the defaults at the least U-Net work: DeepCache every
other step, and no guidance below σ = 0.28 (the lower end of the interval Kynkäänniemi et al. found for SD-XL; their
upper end, 5.42, cost the embedded model 20 points). Fewer steps cost it more: 15 steps −4 points, 10 steps −24 (the
README's speed section has the measurements)."""


def fast_settings(adapters: Sequence[tuple[Path, FewStep]]) -> dict[str, Any]:
    """The request fields ``--fast`` sets (where the user set none): the recipe of the first of the few-step
    ``adapters`` a request loads (:func:`~nijimi.pipelines.adapters.few_step_adapters`), else :data:`FAST`."""
    return dict(adapters[0][1].settings) if adapters else dict(FAST)
