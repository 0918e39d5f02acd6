"""Parity with peft: LoRA, DoRA, LoHa and LoKr adapters with identical weights give the same outputs.

peft puts the adapters on a diffusers ``UNet2DConditionModel`` and a transformers ``CLIPTextModel`` (random base
weights, adapter weights randomised to non-zero values); its state dict is written as a peft folder or a diffusers
LoRA file, read back through nijimi's peft reader and applied to the nijimi model holding the same base weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from nijimi.adapters.formats import read_adapter
from nijimi.adapters.inject import adapted_layers, apply_adapter, remove_adapter
from nijimi.io.keys.clip import text_encoder_config_to_transformers, text_encoder_transformers_table
from nijimi.io.keys.unet import unet_config_to_diffusers, unet_key_table
from nijimi.models.ldm import TEXT_PREFIX, UNET_PREFIX
from nijimi.models.text_encoder import TextEncoder
from nijimi.models.unet import UNetModel

TOLERANCE = 1e-5  # max |nijimi − peft| / max |peft|, fp32
# Every kind of U-Net layer: attention, feed-forward, proj_in/out (1×1 conv), ResBlock 3×3 and skip convs, the
# time-embedding Linear of a ResBlock, down/up-sampling convs.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def peft_config(name: str, targets: list[str]):
    """The peft configs compared: plain and rsLoRA with rank/alpha patterns (on the second and last target), DoRA,
    LoHa (flat and Tucker), LoKr (whole or low-rank second factor; both factors low-rank with Tucker)."""
    configs = {
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=targets),
        "lora-rslora-patterns": lambda: LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=targets,
                                                   rank_pattern={targets[1]: 2}, alpha_pattern={targets[-1]: 5}),
        "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True),
        "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=targets),
        "loha-tucker": lambda: LoHaConfig(r=3, alpha=5, target_modules=targets, use_effective_conv2d=True),
        "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=targets),
        "lokr-both-tucker": lambda: LoKrConfig(r=2, alpha=3, target_modules=targets, decompose_both=True,
                                               use_effective_conv2d=True),
    }
    return configs[name]()


def randomize_adapter(model: torch.nn.Module, seed: int) -> int:
    """Non-zero random adapter weights (~0.3/√fan_in; LoHa factors, multiplied twice, ~1/√fan_in), DoRA magnitudes
    ±10 %; returns how many tensors changed."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif any(tag in name for tag in ("lora_", "hada_", "lokr_")):
                size = 1.0 if "hada_" in name else 0.3
                p.copy_(torch.randn(p.shape, generator=gen) * size / max(p[0].numel(), 1) ** 0.5)
            else:
                continue
            count += 1
    return count


def peft_folder(model: torch.nn.Module, config, folder) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json``, as peft's ``save_pretrained`` writes them."""
    state = get_peft_model_state_dict(model)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "adapter_model.safetensors")
    config.save_pretrained(folder)


@pytest.mark.parametrize("name", ["lora", "lora-rslora-patterns", "dora", "loha", "loha-tucker", "lokr",
                                  "lokr-both-tucker"])
def test_unet_matches_peft(name, tmp_path, bare, small, randomize, rel_err, unet_inputs) -> None:
    cfg = small.unet
    ours = UNetModel(cfg).eval()
    randomize(ours, 0)
    theirs = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)).eval()
    theirs.load_state_dict(unet_key_table(cfg).to_foreign(ours.state_dict()))
    config = peft_config(name, UNET_TARGETS)
    inject_adapter_in_model(config, theirs)
    assert randomize_adapter(theirs, 2) > 0
    peft_folder(theirs, config, tmp_path)

    loaded = read_adapter(tmp_path, small.model, strict=True)
    assert loaded.format == "peft" and not loaded.unmatched
    x, t, context = unet_inputs(cfg)
    with torch.no_grad():
        plain = ours(x, t, context)
        want = theirs(x, t, encoder_hidden_states=context).sample
    assert apply_adapter(ours, bare(loaded.adapter, UNET_PREFIX)) == {}
    assert len(list(adapted_layers(ours))) == sum(isinstance(m, BaseTunerLayer) for m in theirs.modules())
    with torch.no_grad():
        got = ours(x, t, context)
    trained_path = ours(x, t, context)  # gradients recorded: the low-rank path for plain LoRA
    assert rel_err(want, plain) > 0.05  # the adapter changes the output
    assert rel_err(got, want) <= TOLERANCE
    assert rel_err(trained_path.detach(), want) <= TOLERANCE
    remove_adapter(ours)
    with torch.no_grad():
        assert torch.equal(ours(x, t, context), plain)


def clip_pair(cfg, randomize) -> tuple[TextEncoder, CLIPTextModel]:
    ours = TextEncoder(cfg).eval()
    randomize(ours, 0)
    theirs = CLIPTextModel(CLIPTextConfig(**text_encoder_config_to_transformers(cfg))).eval()
    state = text_encoder_transformers_table(cfg).to_foreign(ours.state_dict())
    theirs.load_state_dict({k.removeprefix("text_model."): v for k, v in state.items()})  # transformers 5's names
    return ours, theirs


@pytest.mark.parametrize("name", ["lora", "lora-rslora-patterns", "dora", "loha", "lokr"])
def test_text_encoder_matches_peft(name, tmp_path, bare, small, randomize, rel_err, token_ids) -> None:
    """Written as a diffusers LoRA file: ``text_encoder.`` keys, the peft config in ``lora_adapter_metadata``."""
    ours, theirs = clip_pair(small.text, randomize)
    config = peft_config(name, TEXT_TARGETS)
    inject_adapter_in_model(config, theirs)
    randomize_adapter(theirs, 3)
    state = {f"text_encoder.{k}": v.contiguous() for k, v in get_peft_model_state_dict(theirs).items()}
    packed = {f"text_encoder.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, default=str)}
    save_file(state, tmp_path / "pytorch_lora_weights.safetensors", metadata)

    loaded = read_adapter(tmp_path / "pytorch_lora_weights.safetensors", small.model, strict=True)
    ids = token_ids(small.text)
    with torch.no_grad():
        plain = ours(ids)
        want = theirs(ids).last_hidden_state
    assert apply_adapter(ours, bare(loaded.adapter, TEXT_PREFIX)) == {}
    assert len(list(adapted_layers(ours))) == 12
    with torch.no_grad():
        got = ours(ids)
    assert rel_err(want, plain) > 0.05
    assert rel_err(got, want) <= TOLERANCE
    assert rel_err(ours(ids).detach(), want) <= TOLERANCE
