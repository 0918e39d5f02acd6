"""LoRAs at generation time (``nijimi.pipelines.adapters``): ``--lora`` options and ``<lora:NAME:W>`` tags merged into
a pipeline's weights give diffusers' pixels with the same file, multiplier 0 is no LoRA at all, ``undo`` restores
every weight bit for bit (fp32 and bf16), the prompt cache follows the text encoder; and which model a file is for."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from nijimi.adapters.formats import read_adapter, save_adapter
from nijimi.adapters.inject import adapted_layers, adapter_parameters, apply_adapter, get_adapter, inject
from nijimi.adapters.targets import AdapterSpec
from nijimi.adapters.tools import lora_from_delta, module_shapes
from nijimi.adapters.weights import Adapter
from nijimi.embedded import ADAPTERS
from nijimi.errors import CheckpointError, ConfigError
from nijimi.models.ldm import TEXT_PREFIX, UNET_PREFIX, ModelConfig
from nijimi.pipelines.adapters import LoraRequest, adapter_model_config, apply_loras, lora_requests
from nijimi.pipelines.pipeline import Pipeline, load

TOLERANCE = 1e-4  # max |nijimi − diffusers| on pixels in [0, 1], fp32, as the txt2img parity tests
PROMPT = "a red cube on a blue sphere"
FAST = dict(steps=4, sampler="euler", guidance=6.0, seed=3, width=64, height=64)


def write_lora(model, path: Path, config: ModelConfig, seed: int = 5, fmt: str = "kohya",
               targets: str = "attn+ff") -> Path:
    """A rank-2 LoRA on every ``targets`` layer of the U-Net and text encoder with random non-zero weights."""
    inject(model, AdapterSpec(rank=2, alpha=1.0, targets=targets), "trained", torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, "trained"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 / p[0].numel() ** 0.5)
    save_adapter(get_adapter(model, "trained"), path, config, fmt)
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, make_model, config) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    (folder / "styles").mkdir()
    write_lora(make_model(config, 1), folder / "styles" / "ink.safetensors", config)
    write_lora(make_model(config, 1), folder / "other.safetensors", config, seed=6)
    write_lora(make_model(config, 1), folder / "locon.safetensors", config, seed=7, targets="all")
    return folder


@pytest.fixture
def pipe(make_model, config) -> Pipeline:
    return Pipeline(make_model(config, 1))


def weights(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.model.state_dict().items()}


def assert_same_weights(pipe: Pipeline, before: dict[str, torch.Tensor]) -> None:
    after = pipe.model.state_dict()
    assert after.keys() == before.keys()  # no adapter wrapper left
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


@pytest.mark.parametrize(("name", "weight"), [("styles/ink", 1.0), ("styles/ink", 0.6), ("locon", 0.8)])
def test_lora_equals_diffusers_with_the_same_file(sd_folder, lora_dir, max_abs, name, weight):
    """kohya files read by diffusers' own converter: a LoRA on attn+ff, and a LoCon (its convolution updates change
    diffusers' pixels by 0.1, checked once by hand)."""
    theirs_pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs_pipe.scheduler = EulerDiscreteScheduler.from_config(theirs_pipe.scheduler.config)
    theirs_pipe.load_lora_weights(lora_dir / f"{name}.safetensors", adapter_name="ink")
    theirs_pipe.set_adapters(["ink"], adapter_weights=[weight])
    theirs = theirs_pipe(PROMPT, num_inference_steps=4, guidance_scale=6.0, height=64, width=64, output_type="np",
                         generator=torch.Generator().manual_seed(3)).images
    ours_pipe = load(sd_folder)
    applied = apply_loras(ours_pipe, [], f"{PROMPT} <lora:{name}:{weight}>", lora_dir)
    assert applied.prompt == PROMPT + " "
    ours = ours_pipe.generate(PROMPT, **FAST)
    applied.undo()
    plain = ours_pipe.generate(PROMPT, **FAST)
    assert max_abs(ours.pixels, theirs) <= TOLERANCE  # measured 3.0e-6 (weight 1), 2.7e-6 (0.6), LoCon 3.1e-6
    assert max_abs(plain.pixels, theirs) > 100 * TOLERANCE  # the LoRA matters


def test_multiplier_zero_is_no_lora_and_undo_restores_every_weight(pipe, lora_dir):
    before = weights(pipe)
    plain = pipe.generate(PROMPT, **FAST)
    ink = lora_dir / "styles" / "ink.safetensors"
    applied = apply_loras(pipe, [(ink, 0.0, 0.0)], PROMPT)
    assert (applied.applied, applied.text_encoder_changed) == ([], False)
    assert torch.equal(pipe.generate(PROMPT, **FAST).pixels, plain.pixels)
    applied.undo()

    applied = apply_loras(pipe, [(ink, 0.8, 1.0)], PROMPT)
    assert applied.applied == [LoraRequest(ink, 0.8, 1.0)] and applied.text_encoder_changed
    assert not list(adapted_layers(pipe.model))  # merged: the layers are plain again
    with_lora = pipe.generate(PROMPT, **FAST)
    assert (with_lora.pixels - plain.pixels).abs().max() > 1e-2
    applied.undo()
    assert_same_weights(pipe, before)
    assert torch.equal(pipe.generate(PROMPT, **FAST).pixels, plain.pixels)
    applied.undo()  # a second undo does nothing
    assert_same_weights(pipe, before)


def test_merged_loras_equal_the_live_adapters(make_model, config, lora_dir):
    """Two LoRAs, the text encoder of one left out: merging gives the pixels of the unmerged adapter stack."""
    files = [lora_dir / "styles" / "ink.safetensors", lora_dir / "other.safetensors"]
    merged = Pipeline(make_model(config, 1))
    applied = apply_loras(merged, [(files[0], 0.7, 1.2), (files[1], 0.0, 0.5)], PROMPT)
    assert applied.text_encoder_changed
    ours = merged.generate(PROMPT, **FAST)
    live = Pipeline(make_model(config, 1))
    for i, (file, te, unet) in enumerate([(files[0], 0.7, 1.2), (files[1], 0.0, 0.5)]):
        apply_adapter(live.model, read_adapter(file, config).adapter, f"a{i}", unet_multiplier=unet,
                      te_multiplier=te)
    reference = live.generate(PROMPT, **FAST)
    assert (ours.pixels - reference.pixels).abs().max() <= 1e-5


def test_prompt_cache_is_cleared_only_when_the_text_encoder_changes(pipe, lora_dir):
    ink = lora_dir / "styles" / "ink.safetensors"
    pipe.generate(PROMPT, **FAST)
    assert pipe.conditioner.cache
    applied = apply_loras(pipe, [(ink, 0.0, 1.0)], PROMPT)  # U-Net only
    assert not applied.text_encoder_changed and pipe.conditioner.cache
    applied.undo()
    assert pipe.conditioner.cache
    applied = apply_loras(pipe, [(ink, 1.0, 0.0)], PROMPT)  # text encoder only
    assert applied.text_encoder_changed and not pipe.conditioner.cache
    pipe.generate(PROMPT, **FAST)
    assert pipe.conditioner.cache
    applied.undo()
    assert not pipe.conditioner.cache  # encodings made with the LoRA are gone too


def test_bf16_weights_are_restored_bit_for_bit(make_model, config, lora_dir):
    pipe = Pipeline(make_model(config, 1), dtype=torch.bfloat16)
    before = weights(pipe)
    applied = apply_loras(pipe, [(lora_dir / "other.safetensors", 1.0, 1.0)], PROMPT)
    changed = [k for k, v in pipe.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith(UNET_PREFIX) for k in changed) and any(k.startswith(TEXT_PREFIX) for k in changed)
    applied.undo()
    assert_same_weights(pipe, before)


def test_tags_are_resolved_in_the_lora_folder(pipe, lora_dir):
    applied = apply_loras(pipe, [], "a cat <lora:ink:0.5> <lyco:other:0.25:0.75>, night", lora_dir)
    assert applied.prompt == "a cat  , night"
    assert applied.applied == [LoraRequest(lora_dir / "styles" / "ink.safetensors", 0.5, 0.5),
                               LoraRequest(lora_dir / "other.safetensors", 0.25, 0.75)]
    applied.undo()
    with pytest.raises(ConfigError, match="no LoRA named 'ink' in .*embedded.*adapters.*available: .*'pink'"):
        apply_loras(pipe, [], "a cat <lora:ink:0.5>")  # the default folder: the embedded model's demo adapters
    with pytest.raises(ConfigError, match="no LoRA named 'nope'"):
        apply_loras(pipe, [], "a cat <lora:nope>", lora_dir)


def test_lora_options_become_requests(lora_dir, tmp_path):
    ink = lora_dir / "styles" / "ink.safetensors"
    assert lora_requests([f"{ink}:0.5:0.7", str(ink), "ink:0.3", "styles/ink"], lora_dir) == [
        LoraRequest(ink, 0.5, 0.7), LoraRequest(ink, 1.0, 1.0), LoraRequest(ink, 0.3, 0.3), LoraRequest(ink, 1, 1)]
    with pytest.raises(ConfigError, match="no LoRA named"):
        lora_requests(["missing"], lora_dir)
    with pytest.raises(ConfigError, match=r"no LoRA named '.*missing\.safetensors' in .*embedded"):
        lora_requests([str(tmp_path / "missing.safetensors")])
    assert lora_requests(["pink:0.5"]) == [LoraRequest(ADAPTERS / "pink.safetensors", 0.5, 0.5)]
    assert lora_requests(["lcm"]) == [LoraRequest(ADAPTERS / "lcm.safetensors", 1.0, 1.0)]  # the shipped LCM-LoRA


def test_a_file_for_another_model_changes_nothing(pipe, config, lora_dir, tmp_path):
    """The second file's module names exist but its shapes (a 48-wide context) fit no layer: the first, already
    attached, is taken off again."""
    before = weights(pipe)
    wide = dataclasses.replace(config, unet=dataclasses.replace(config.unet, context_dim=48),
                               text=dataclasses.replace(config.text, width=48))
    path = UNET_PREFIX + "input_blocks.3.1.transformer_blocks.0.attn2.to_k"
    save_adapter(Adapter({path: lora_from_delta(torch.randn(module_shapes(wide)[path]), 2)}),
                 tmp_path / "wide.safetensors", wide)
    with pytest.raises(CheckpointError, match="wide.safetensors.*no module of the adapter fits"):
        apply_loras(pipe, [(lora_dir / "other.safetensors", 1.0, 1.0), (tmp_path / "wide.safetensors", 1.0, 1.0)])
    assert_same_weights(pipe, before)


def test_the_model_an_adapter_is_for_is_recognised(tmp_path, config, lora_dir):
    """SD 1.x and SD 2.x LoRAs share their U-Net names: the shapes tell them apart."""
    path = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    for name, preset in (("sd15", ModelConfig.sd15()), ("sd21", ModelConfig.sd21())):
        shape = module_shapes(preset)[path]
        save_adapter(Adapter({path: lora_from_delta(torch.randn(shape), 2)}), tmp_path / f"{name}.safetensors",
                     preset)
        found, loaded = adapter_model_config(tmp_path / f"{name}.safetensors")
        assert found.unet.context_dim == preset.unet.context_dim and list(loaded.adapter.modules) == [path]
    with pytest.raises(ConfigError, match="--base"):
        adapter_model_config(lora_dir / "other.safetensors")


def test_generate_applies_tags_and_options_then_restores(pipe, lora_dir):
    """``generate`` itself merges ``loras=`` and the prompt's tags for one call only; the settings record them."""
    before = weights(pipe)
    plain = pipe.generate(PROMPT, **FAST)
    tagged = pipe.generate(f"{PROMPT} <lora:other:0.8>", lora_dir=str(lora_dir), **FAST)
    assert (tagged.pixels - plain.pixels).abs().max() > 1e-3
    assert_same_weights(pipe, before)
    by_option = pipe.generate(PROMPT, loras=[(lora_dir / "other.safetensors", 0.8, 0.8)], **FAST)
    assert torch.equal(by_option.pixels, tagged.pixels)
    assert by_option.request.loras == (LoraRequest((lora_dir / "other.safetensors").resolve(), 0.8, 0.8),)
    assert tagged.request.prompt == f"{PROMPT} <lora:other:0.8>"
    assert torch.equal(pipe.generate(PROMPT, **FAST).pixels, plain.pixels)
