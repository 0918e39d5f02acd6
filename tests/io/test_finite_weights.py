"""NaN and infinite weights are refused where a file is loaded, naming the file and the first bad key, and NaN,
infinite or overflowing LoRA multipliers where the option or prompt tag is parsed."""

import math

import pytest
import torch
from helpers import SD1, random_model

from nijimi.adapters.formats import read_adapter
from nijimi.adapters.tags import parse_lora_option, parse_lora_tags
from nijimi.errors import CheckpointError, ConfigError, PromptError
from nijimi.io.checkpoint import load_model, save_single
from nijimi.io.safetensors import load_file, read_metadata, save_file

BAD_KEY = "model.diffusion_model.out.2.bias"


@pytest.mark.parametrize("bad, kind", [(math.nan, "NaN"), (math.inf, "infinite")])
def test_model_file_with_non_finite_weights_names_file_and_key(tmp_path, bad, kind):
    good = tmp_path / "good.safetensors"
    save_single(random_model(SD1, 0), good, half=True)
    tensors = load_file(good)
    tensors[BAD_KEY] = tensors[BAD_KEY].clone()
    tensors[BAD_KEY][1] = bad
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path, read_metadata(good))
    with pytest.raises(CheckpointError, match=f"^{path}: tensor '{BAD_KEY}' holds {kind} values; the file is damaged$"):
        load_model(path)
    load_model(good)


def test_lora_file_with_nan_weights_names_file_and_key(tmp_path):
    path = tmp_path / "nan.safetensors"
    down = torch.zeros(2, 64)
    down[0, 3] = math.nan
    save_file({"lora_unet_a.alpha": torch.tensor(2.0), "lora_unet_a.lora_down.weight": down,
               "lora_unet_a.lora_up.weight": torch.zeros(64, 2)}, path)
    with pytest.raises(CheckpointError, match=f"^{path}: tensor 'lora_unet_a.lora_down.weight' holds NaN values"):
        read_adapter(path, SD1)


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e309", "NaN"])
def test_non_finite_lora_multipliers_are_refused_where_parsed(weight):
    with pytest.raises(ConfigError, match=f"^--lora ink.safetensors:{weight}: weight '{weight}' is not a finite"):
        parse_lora_option(f"ink.safetensors:{weight}")
    with pytest.raises(ConfigError, match=f"weight '{weight}' is not a finite number$"):
        parse_lora_option(f"ink:0.5:{weight}")
    with pytest.raises(PromptError, match=f"^<lora:ink:{weight}>: multiplier '{weight}' is not a finite number$"):
        parse_lora_tags(f"a cat <lora:ink:{weight}>")
    with pytest.raises(PromptError, match=f"^<lora:ink:1:unet={weight}>: multiplier '{weight}' is not a finite"):
        parse_lora_tags(f"a cat <lora:ink:1:unet={weight}>")


def test_finite_multipliers_still_parse():
    assert parse_lora_option("ink:0.5:1e3")[1:] == (0.5, 1000.0)
    assert parse_lora_tags("a <lora:ink:-1.5>")[1][0].te_multiplier == -1.5
