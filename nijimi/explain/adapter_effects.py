"""Where adapters act (view ``adapters``): for the LoRA / LoCon / LoHa / LoKr files a request loads (``loras`` and
``<lora:NAME:W>`` tags), per block of the U-Net (``input_blocks.N``, ``middle_block``, ``output_blocks.N``, and
``time_embed`` / ``out`` / the text encoder when the adapters touch them):

- the weight change ‖ΔW‖ / ‖W‖: the Frobenius norm of the updates of the block's layers (ΔW of each layer as the
  adapter stack computes it, :meth:`~nijimi.adapters.weights.ModuleWeights.delta`, times its multiplier) over the
  norm of all the block's parameters;
- the activation change ‖Δh‖ / ‖h‖ for this prompt: the request is generated (with its adapters, as ``generate``
  does) while the U-Net's inputs (x_t, t, text) are kept at a few steps; on those same inputs the U-Net then runs with
  and without the adapters, and each block's output h is compared (``out``: the U-Net's prediction). The text
  encoder's row compares the prompt's conditioning with and without the adapters. ControlNet residuals and DeepCache
  are left out of these extra passes.

Upstream of the first changed block the activations are bit-identical, so the first non-zero activation change is
where an adapter first acts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch import nn

from nijimi.adapters.inject import adapted_layers, remove_adapter
from nijimi.diffusion.samplers import StepInfo
from nijimi.errors import ConfigError
from nijimi.explain.panels import Explanation, Panel
from nijimi.explain.plots import bar_axes, figure, figure_image
from nijimi.models.ldm import TEXT_PREFIX, UNET_PREFIX
from nijimi.models.unet import UNetModel
from nijimi.pipelines.adapters import put_on, requested_loras
from nijimi.pipelines.pipeline import Pipeline
from nijimi.pipelines.request import GenerationRequest

TEXT = "text_encoder"
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""The U-Net's (x_t, t, context) of one step."""


def unet_blocks(unet: UNetModel) -> list[str]:
    """The U-Net's blocks in the order data flows through them: the timestep embedding ``time_embed``, the input
    blocks, the middle block, the output blocks, ``out``."""
    return ["time_embed", *(f"input_blocks.{i}" for i in range(len(unet.input_blocks))), "middle_block",
            *(f"output_blocks.{i}" for i in range(len(unet.output_blocks))), "out"]


def block_of(path: str) -> str | None:
    """The block of a native module path: ``model.diffusion_model.input_blocks.4.1.proj_in`` → ``input_blocks.4``,
    ``…middle_block.1…`` → ``middle_block``, ``…time_embed.0`` → ``time_embed``, the text encoder's → ``text_encoder``;
    None outside both."""
    if path.startswith(TEXT_PREFIX):
        return TEXT
    if not path.startswith(UNET_PREFIX):
        return None
    parts = path[len(UNET_PREFIX):].split(".")
    return ".".join(parts[:2]) if parts[0] in ("input_blocks", "output_blocks") else parts[0]


def _norm(tensors) -> float:
    return float(sum(t.detach().double().pow(2).sum() for t in tensors) ** 0.5)


def _module(pipe: Pipeline, block: str) -> nn.Module:
    return pipe.model.text_encoder if block == TEXT else pipe.model.unet.get_submodule(block)


def block_norms(pipe: Pipeline) -> dict[str, float]:
    """The Frobenius norm of all parameters of each block of the U-Net (:func:`unet_blocks`) and of the text
    encoder."""
    return {block: _norm(_module(pipe, block).parameters()) for block in [TEXT, *unet_blocks(pipe.model.unet)]}


def weight_changes(pipe: Pipeline, norms: dict[str, float]) -> dict[str, float]:
    """‖ΔW‖ / ‖W‖ per block of the adapters attached (unmerged) to the pipeline's model; ``norms``: ‖W‖ of every
    block (:func:`block_norms`), measured before they were attached."""
    squares: dict[str, float] = {}
    for path, layer in adapted_layers(pipe.model):
        block = block_of(path)
        if block is not None:
            squares[block] = squares.get(block, 0.0) + _norm([layer.weight - layer.base.weight]) ** 2
    return {block: (squares[block] ** 0.5) / norms[block] if norms[block] else 0.0 for block in squares}


@torch.inference_mode()
def block_outputs(unet: UNetModel, inputs: Inputs) -> dict[str, torch.Tensor]:
    """Each block's output (:func:`unet_blocks`) of one U-Net pass on ``inputs``, caught by forward hooks."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [unet.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: outputs.update({name: out}))
             for name in unet_blocks(unet)]
    try:
        unet(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def relative_change(changed: torch.Tensor, plain: torch.Tensor) -> float:
    """‖changed − plain‖ / ‖plain‖ (0 when ``plain`` is 0)."""
    size = _norm([plain])
    return _norm([changed - plain]) / size if size else 0.0


def probe_steps(steps: int) -> list[int]:
    """The sampling steps (1-based) whose U-Net inputs are probed: the first, the middle and the last."""
    return sorted({1, (steps + 1) // 2, steps})


def step_inputs(pipe: Pipeline, request: GenerationRequest, chosen: list[int],
                callback: Callable[[StepInfo], None] | None) -> dict[int, Inputs]:
    """Generate ``request`` and keep the U-Net's first (x_t, t, context) of each step in ``chosen`` (1-based)."""
    done, kept = [0], {}

    def catch(module: nn.Module, args: tuple) -> None:
        step = done[0] + 1
        if step in chosen and step not in kept:
            kept[step] = tuple(a.detach().clone() for a in args[:3])

    def count(info: StepInfo) -> None:
        done[0] = info.i + 1
        if callback is not None:
            callback(info)

    hook = pipe.model.unet.register_forward_pre_hook(catch)
    try:
        pipe.generate(request, callback=count)
    finally:
        hook.remove()
    return kept


def _text_conditioning(pipe: Pipeline, prompt: str, request: GenerationRequest, steps: list[int]) -> list[torch.Tensor]:
    pipe.conditioner.cache.clear()
    schedule = pipe.conditioner.schedule(prompt, request.steps, request.clip_skip, False)
    return [schedule.at_step(step - 1) for step in steps]


def adapter_effects(pipe: Pipeline, request: GenerationRequest, *,
                    callback: Callable[[StepInfo], None] | None = None) -> Explanation:
    """View ``adapters`` (see the module docstring): one bar-chart panel of the weight change per block and the
    activation change per block at the probed steps. ``info``: the adapters, the blocks, ``weight_change`` (block →
    ratio), ``activation_change`` (step → block → ratio). ConfigError when the request loads no adapter."""
    prompt, requests = requested_loras(request.loras, request.prompt, request.lora_dir)
    if not requests:
        raise ConfigError("adapters: the request loads no adapter; add <lora:NAME:W> to the prompt or give --lora FILE")
    unet = pipe.model.unet
    inputs = step_inputs(pipe, request, probe_steps(request.steps), callback)
    steps = sorted(inputs)
    plain = {step: block_outputs(unet, inputs[step]) for step in steps}
    norms = block_norms(pipe)
    text = _text_conditioning(pipe, prompt, request, steps)
    names, applied, _, text_changed = put_on(pipe.model, requests, request.strict_loras)
    try:
        weights = weight_changes(pipe, norms)
        changed = {step: block_outputs(unet, inputs[step]) for step in steps}
        text_with = _text_conditioning(pipe, prompt, request, steps) if text_changed else text
    finally:
        for name in names:
            remove_adapter(pipe.model, name)
        pipe.conditioner.cache.clear()
    blocks = [TEXT] * (TEXT in weights) + unet_blocks(unet)
    activation = {}
    for k, step in enumerate(steps):
        row = {block: relative_change(changed[step][block], plain[step][block]) for block in unet_blocks(unet)}
        activation[f"step {step}"] = {TEXT: relative_change(text_with[k], text[k]), **row}
    info = {"adapters": [{"file": r.path.name, "te_multiplier": r.te_multiplier,
                          "unet_multiplier": r.unet_multiplier} for r in applied],
            "blocks": blocks, "steps": steps, "weight_change": {b: weights.get(b, 0.0) for b in blocks},
            "activation_change": {step: {b: row.get(b, 0.0) for b in blocks} for step, row in activation.items()},
            "columns": 1}
    return Explanation("adapters", (Panel("where the adapters act, per block", "blocks", _chart(info)),), info)


def _chart(info: dict) -> Image.Image:
    fig = figure(max(6.0, 0.3 * len(info["blocks"])), 6)
    top, bottom = fig.subplots(2, 1)
    bar_axes(top, "weight change ‖ΔW‖ / ‖W‖", info["blocks"], {"weights": list(info["weight_change"].values())})
    bar_axes(bottom, "activation change ‖Δh‖ / ‖h‖ for this prompt", info["blocks"],
             {step: list(row.values()) for step, row in info["activation_change"].items()})
    fig.tight_layout()
    return figure_image(fig)
