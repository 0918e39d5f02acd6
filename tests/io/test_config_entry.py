"""Configs where they enter: nijimi's own config in a model file's metadata and the config files of diffusers folders
are type-, range-, size- and depth-checked, and a network too big for this machine is refused before it is built;
every refusal is one CheckpointError naming the file and the key."""

import json
import time

import pytest
from helpers import SD1, random_model

from nijimi.errors import CheckpointError, ConfigError
from nijimi.io import limits
from nijimi.io.checkpoint import CONFIG_METADATA_KEY, load_model, save_diffusers, save_single
from nijimi.io.limits import MAX_JSON_DEPTH, check_model_fits, parse_json, read_json
from nijimi.io.safetensors import load_file, read_metadata, save_file
from nijimi.models.ldm import ModelConfig
from nijimi.models.text_encoder import TextEncoderConfig
from nijimi.models.unet import UNetConfig


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    save_single(random_model(SD1, 0), path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("folder") / "sd"
    save_diffusers(random_model(SD1, 0), path)
    return path


def _with_config(model_file, tmp_path, text: str):
    """A copy of ``model_file`` whose embedded config is ``text``."""
    path = tmp_path / "bad.safetensors"
    save_file(load_file(model_file), path, {**read_metadata(model_file), CONFIG_METADATA_KEY: text})
    return path


def _edited(model_file, edit) -> str:
    config = json.loads(read_metadata(model_file)[CONFIG_METADATA_KEY])
    edit(config)
    return json.dumps(config)


@pytest.mark.parametrize("edit, problem", [
    (lambda c: c["unet"].update(model_channels="32"), "UNetConfig.model_channels must be int, got '32'"),
    (lambda c: c["unet"].update(num_heads=0), "UNetConfig.num_heads must be ≥ 1, got 0"),
    (lambda c: c["unet"].update(channel_mult=[1, None]), r"UNetConfig.channel_mult must be tuple\[int, ...\]"),
    (lambda c: c["vae"].update(channels=-32), "VAEConfig.channels must be ≥ 1, got -32"),
    (lambda c: c["text"].update(num_layers=True), "TextEncoderConfig.num_layers must be int, got True"),
    (lambda c: c["text"].update(num_heads=0), "TextEncoderConfig.num_heads must be ≥ 1, got 0"),
    (lambda c: c.update(unet=[1, 2]), "UNetConfig must be a JSON object, got list"),
    (lambda c: c.update(family=1), "ModelConfig.family must be str, got 1"),
    (lambda c: c["schedule"].update(beta_start="0.1"), "NoiseSchedule.beta_start must be float, got '0.1'"),
    (lambda c: c["schedule"].update(num_train_timesteps=10**9), r"num_train_timesteps=1000000000 must be in \[2, "),
])
def test_embedded_config_of_wrong_type_or_range_names_file_and_key(model_file, tmp_path, edit, problem):
    path = _with_config(model_file, tmp_path, _edited(model_file, edit))
    with pytest.raises(CheckpointError, match=f"^{path}: invalid nijimi_config metadata: {problem}"):
        load_model(path)


def test_deep_or_huge_embedded_config_is_refused_before_parsing(model_file, tmp_path):
    path = _with_config(model_file, tmp_path, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=f"^{path}: invalid nijimi_config metadata: JSON nested deeper than 32"):
        load_model(path)
    path = _with_config(model_file, tmp_path, '"' + "x" * (limits.MAX_JSON_BYTES + 1) + '"')
    with pytest.raises(CheckpointError, match=r"metadata: JSON of \d+ bytes is over the limit of 33554432$"):
        load_model(path)


def test_config_asking_for_a_billion_layers_is_refused_before_building(model_file, tmp_path):
    path = _with_config(model_file, tmp_path, _edited(model_file, lambda c: c["text"].update(num_layers=10**9)))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"^{path}: the config asks for a network of about .* parameters in "
                                              r"\d+ blocks \(text.num_layers=1000000000, .*this machine has"):
        load_model(path)
    assert time.perf_counter() - start < 30  # generous: it is refused from numbers, nothing is allocated


def test_model_fit_is_measured_against_memory():
    check_model_fits(ModelConfig.sd15(), "sd15", memory=8 << 30)
    with pytest.raises(CheckpointError, match=r"^sd15: .*needing at least 2.0\d GiB; this machine has 1 GiB$"):
        check_model_fits(ModelConfig.sd15(), "sd15", memory=1 << 30)
    with pytest.raises(CheckpointError, match=r"^u: .*\(model_channels=100000000, "):
        check_model_fits(UNetConfig(model_channels=10**8, norm_groups=1, num_heads=1), "u")


@pytest.mark.parametrize("component, key, value, problem", [
    ("unet", "block_out_channels", [32, "64"], "a non-empty list of integers ≥ 1"),
    ("unet", "block_out_channels", [0, 0], "a non-empty list of integers ≥ 1"),
    ("unet", "layers_per_block", -1, "an integer ≥ 1"),
    ("unet", "attention_head_dim", "8", "an integer ≥ 1, a list or null"),
    ("vae", "scaling_factor", "0.18", "a finite number"),
    ("vae", "latent_channels", 4.0, "an integer ≥ 1"),
    ("text_encoder", "num_attention_heads", [2, 2], "an integer ≥ 1"),
    ("unet", "num_attention_heads", 0, "an integer ≥ 1, a list or null"),
    ("text_encoder", "hidden_act", ["gelu"], "a string"),
])
def test_diffusers_config_of_wrong_type_names_file_and_key(folder, tmp_path, component, key, value, problem):
    copy = tmp_path / "sd"
    copy.mkdir()
    for part in folder.iterdir():
        (copy / part.name).symlink_to(part)
    (copy / component).unlink()
    (copy / component).mkdir()
    for part in (folder / component).iterdir():
        (copy / component / part.name).symlink_to(part)
    config = json.loads((folder / component / "config.json").read_text())
    config.pop("_nijimi_config", None)
    (copy / component / "config.json").unlink()
    (copy / component / "config.json").write_text(json.dumps({**config, key: value}))
    (copy / "model_index.json").unlink()
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("_nijimi_config")
    (copy / "model_index.json").write_text(json.dumps(index))
    config_path = copy / component / "config.json"
    with pytest.raises(CheckpointError, match=f"^{config_path}: key '{key}' must be {problem}, got"):
        load_model(copy)


def test_scheduler_config_and_model_index_are_checked(folder, tmp_path):
    copy = tmp_path / "sd"
    copy.mkdir()
    for part in folder.iterdir():
        (copy / part.name).symlink_to(part)
    (copy / "scheduler").unlink()
    (copy / "scheduler").mkdir()
    (copy / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": "1000"}')
    with pytest.raises(CheckpointError, match="scheduler_config.json: key 'num_train_timesteps' must be an integer"):
        load_model(copy)
    (copy / "model_index.json").unlink()
    (copy / "model_index.json").write_text("{" * 1000)
    with pytest.raises(CheckpointError, match="model_index.json: JSON nested deeper than"):
        load_model(copy)


def test_parse_json_bounds():
    assert parse_json('{"a": [[["[[[[[[[["]]]}', "x") == {"a": [[["[[[[[[[["]]]}
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json(nested, "x") is not None
    with pytest.raises(CheckpointError, match="^x: JSON nested deeper than 32 levels$"):
        parse_json("[" + nested + "]", "x")
    with pytest.raises(ConfigError, match="^x: not valid JSON: "):
        parse_json('{"a": "\\"' + '\\"' * 40 + "[" * 40, "x", ConfigError)  # unterminated: the scan stops, linear
    with pytest.raises(CheckpointError, match="^x: not UTF-8"):
        parse_json(b"\xff{}", "x")


def test_read_json_refuses_folders(tmp_path):
    with pytest.raises(CheckpointError, match=f"^{tmp_path}: JSON file is a folder, not a file$"):
        read_json(tmp_path)


def test_text_encoder_config_types():
    with pytest.raises(ConfigError, match=r"TextEncoderConfig.projection_dim must be int \| None, got 'x'"):
        TextEncoderConfig.from_dict({**TextEncoderConfig.clip_l().to_dict(), "projection_dim": "x"})
    assert TextEncoderConfig.from_dict(TextEncoderConfig.clip_l().to_dict()) == TextEncoderConfig.clip_l()
