"""The denoising trajectory of a generation (view ``trajectory``): after every sampling step, the latent x_t the
sampler moved to and the denoiser's prediction x̂₀ of the clean latent made on the way, both decoded by the VAE.

The pipeline's step callback already sees both (:class:`~nijimi.diffusion.samplers.StepInfo` ``x`` and
``denoised``); this view only keeps a copy of each, so a plain generation pays nothing for it. The last x_t is the
latent the generation returns, so its panel is the generated image.
"""

from __future__ import annotations

from collections.abc import Callable

from nijimi.diffusion.samplers import StepInfo
from nijimi.errors import ConfigError
from nijimi.explain.panels import Explanation, Panel
from nijimi.pipelines.images import to_pil
from nijimi.pipelines.pipeline import Pipeline
from nijimi.pipelines.request import GenerationRequest


def trajectory(pipe: Pipeline, request: GenerationRequest, *,
               callback: Callable[[StepInfo], None] | None = None) -> Explanation:
    """View ``trajectory``: generate ``request`` (one image; ``callback`` sees every step, as the pipeline's does)
    and return one panel of x_t per step, then one of x̂₀ per step, decoded as the generation decodes its image
    (``columns``: the steps, so the grid shows x_t above x̂₀). ``info``: the steps' σ before and after, the request's
    seed, sampler and size."""
    if request.batch != 1:
        raise ConfigError(f"trajectory shows one image; batch {request.batch} must be 1")
    steps: list[StepInfo] = []

    def keep(info: StepInfo) -> None:
        steps.append(StepInfo(info.i, info.steps, info.sigma, info.sigma_next, info.x[:1].detach().float().cpu(),
                              info.denoised[:1].detach().float().cpu()))
        if callback is not None:
            callback(info)

    ran = pipe.generate(request, callback=keep).request
    with pipe.vae_swapped(ran.vae):
        decode = lambda latents: to_pil(pipe.decode(latents, ran.vae_tile or None, ran.decoder))  # noqa: E731
        noisy = [decode(s.x)[0] for s in steps]
        clean = [decode(s.denoised)[0] for s in steps]
    count = len(steps)
    panels = [Panel(f"step {k + 1}/{count}: x_t, σ = {s.sigma_next:.3g}", f"x_t-{k + 1:03d}", image)
              for k, (s, image) in enumerate(zip(steps, noisy, strict=True))]
    panels += [Panel(f"step {k + 1}/{count}: x̂₀ at σ = {s.sigma:.3g}", f"x0_hat-{k + 1:03d}", image)
               for k, (s, image) in enumerate(zip(steps, clean, strict=True))]
    info = {"steps": count, "sigma": [s.sigma for s in steps], "sigma_next": [s.sigma_next for s in steps],
            "seed": ran.seed, "sampler": ran.sampler.name if ran.sampler else None, "size": [ran.width, ran.height],
            "columns": count}
    return Explanation("trajectory", tuple(panels), info)
