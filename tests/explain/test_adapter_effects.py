"""The adapters view on a tiny model with a LoRA on one known layer: only that layer's block changes its weights, by
the hand-computed ‖ΔW‖/‖W‖; activations are unchanged upstream of it and change from it on; the U-Net output's
change equals the one of the LoRA merged by ``apply_loras``. On the embedded model, the pink LoRA of the demo."""

from __future__ import annotations

import pytest
import torch
from helpers import TOY_F8, random_model

from nijimi.adapters.formats import save_adapter
from nijimi.adapters.weights import Adapter, ModuleWeights
from nijimi.errors import ConfigError
from nijimi.explain.adapter_effects import adapter_effects, block_of, probe_steps, relative_change, step_inputs
from nijimi.pipelines.adapters import apply_loras
from nijimi.pipelines.pipeline import Pipeline
from nijimi.pipelines.request import GenerationRequest

LAYER = "model.diffusion_model.input_blocks.1.0.in_layers.2"
BLOCK = "input_blocks.1"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A TOY_F8 pipeline and a kohya LoRA (rank 2, alpha 1) on the 3×3 convolution of input block 1's ResBlock."""
    pipe = Pipeline(random_model(TOY_F8, 0))
    layer = pipe.model.get_submodule(LAYER)
    gen = torch.Generator().manual_seed(0)
    down = torch.randn(2, layer.in_channels, 3, 3, generator=gen) * 0.1
    up = torch.randn(layer.out_channels, 2, 1, 1, generator=gen) * 0.1
    path = tmp_path_factory.mktemp("lora") / "one.safetensors"
    save_adapter(Adapter({LAYER: ModuleWeights("lora", {"lora_down": down, "lora_up": up}, alpha=1.0)}), path,
                 TOY_F8, "kohya")
    return pipe, path, (up.reshape(-1, 2) @ down.reshape(2, -1)).reshape(layer.weight.shape) * 0.5


def test_one_block_changes_by_the_hand_computed_amount(tiny):
    pipe, path, delta = tiny
    request = GenerationRequest("a cube", seed=1, steps=3, width=64, height=64, loras=((path, 1.0, 0.5),))
    result = adapter_effects(pipe, request)
    block = pipe.model.unet.get_submodule(BLOCK)
    by_hand = float((0.5 * delta).double().norm() / torch.cat([p.double().flatten() for p in block.parameters()])
                    .norm())
    weights = result.info["weight_change"]
    assert weights[BLOCK] == pytest.approx(by_hand, rel=1e-5)
    assert {b for b, v in weights.items() if v != 0} == {BLOCK} and "text_encoder" not in weights
    assert result.info["steps"] == [1, 2, 3]
    blocks = result.info["blocks"]
    for step, row in result.info["activation_change"].items():
        changed = [b for b in blocks if row[b] != 0]
        assert changed[0] == BLOCK and all(row[b] > 0 for b in blocks[blocks.index(BLOCK):]), step
    assert result.info["adapters"] == [{"file": "one.safetensors", "te_multiplier": 1.0, "unet_multiplier": 0.5}]
    assert [p.name for p in result.panels] == ["blocks"]


def test_the_output_change_equals_the_merged_lora(tiny):
    pipe, path, _ = tiny
    request = GenerationRequest("a cube", seed=2, steps=2, width=64, height=64, loras=((path, 1.0, 1.0),))
    result = adapter_effects(pipe, request)
    inputs = step_inputs(pipe, request, [2], None)[2]
    with torch.inference_mode():
        plain = pipe.model.unet(*inputs)
        applied = apply_loras(pipe, request.loras)
        try:
            merged = pipe.model.unet(*inputs)
        finally:
            applied.undo()
    assert result.info["activation_change"]["step 2"]["out"] == pytest.approx(relative_change(merged, plain),
                                                                              rel=1e-4)


def test_the_embedded_pink_lora_touches_the_text_encoder_too(embedded):
    request = GenerationRequest("a pink circle <lora:pink:1>", seed=3, steps=2, width=64, height=64)
    result = adapter_effects(embedded, request)
    assert result.info["blocks"][:2] == ["text_encoder", "time_embed"]
    assert result.info["weight_change"]["text_encoder"] > 0
    assert result.info["activation_change"]["step 1"]["text_encoder"] > 0
    assert result.info["weight_change"]["input_blocks.0"] == 0 == result.info["activation_change"]["step 1"][
        "input_blocks.0"]


def test_no_adapter_is_refused(tiny):
    with pytest.raises(ConfigError, match="the request loads no adapter"):
        adapter_effects(tiny[0], GenerationRequest("a cube", steps=2))


def test_blocks_and_probed_steps():
    assert block_of("model.diffusion_model.input_blocks.4.1.proj_in") == "input_blocks.4"
    assert block_of("model.diffusion_model.middle_block.1.proj_out") == "middle_block"
    assert block_of("model.diffusion_model.output_blocks.11.0.skip_connection") == "output_blocks.11"
    assert block_of("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1") == "text_encoder"
    assert block_of("first_stage_model.decoder.conv_in") is None
    assert probe_steps(1) == [1] and probe_steps(4) == [1, 2, 4] and probe_steps(20) == [1, 10, 20]
