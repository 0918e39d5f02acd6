"""Training configs where they enter: the file itself (UTF-8, a regular file), and every key's type and range, in one
ConfigError naming the file and the key (or only the key, for a command-line flag)."""

import os

import pytest
from helpers import without_hanging

from nijimi.errors import ConfigError
from nijimi.train.adapter import AdapterTrainConfig
from nijimi.train.config import build_config, read_toml
from nijimi.train.run import parse_config


def _recipe(tmp_path, text: str):
    path = tmp_path / "recipe.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _refused(path, flags: dict | None = None) -> str:
    values = read_toml(path)
    values.update(flags or {})
    with pytest.raises(ConfigError) as info:
        parse_config(values)
    return str(info.value)


@pytest.mark.parametrize("text, problem", [
    ("[unet]\nbatch_size = 0", "unet.batch_size must be ≥ 1, got 0"),
    ("[vae]\nbatch_size = -4", "vae.batch_size must be ≥ 1, got -4"),
    ("[unet]\nlr = nan", "unet.lr must be a finite number, got nan"),
    ("[unet]\nlr = inf", "unet.lr must be a finite number, got inf"),
    ("[unet]\nlr = 0.0", "unet.lr must be > 0, got 0.0"),
    ("[unet]\nsteps = -5", "unet.steps must be ≥ 1, got -5"),
    ("[unet]\nema_decay = 1.0", r"unet.ema_decay must be within \[0, 1\), got 1.0"),
    ("[unet]\nbetas = [0.9, 1.5]", r"unet.betas must be two numbers in \[0, 1\), got \(0.9, 1.5\)"),
    ("[unet]\ncaption_dropout = 2", r"unet.caption_dropout must be within \[0, 1\], got 2.0"),
    ("[arch.unet]\nnum_heads = 0", "UNetConfig.num_heads must be ≥ 1, got 0"),
    ("[arch.text]\nnum_heads = 0", "TextEncoderConfig.num_heads must be ≥ 1, got 0"),
    ("[unet]\nbatch_size = 'four'", "config key 'unet.batch_size': cannot read 'four' as int"),
    ("[unet]\nbatch_size = 4.5", "config key 'unet.batch_size': expected int, got 4.5"),
    ("data_count = 0", "data_count must be ≥ 1, got 0"),
    ("[unet]\nbogus = 1", r"unknown config key\(s\): unet.bogus \(known: "),
    ("[arch.unet]\nnum_res_blocks = 1000000000", "the config asks for a network of about .* blocks "
                                                 r"\(unet.num_res_blocks=1000000000"),
])
def test_bad_values_name_the_file_and_key(tmp_path, text, problem):
    path = _recipe(tmp_path, text)
    assert len(_refused(path).splitlines()) == 1
    with pytest.raises(ConfigError, match=f"^{path}: {problem}"):
        parse_config(read_toml(path))


def test_a_flag_overriding_the_file_is_named_as_a_flag(tmp_path):
    path = _recipe(tmp_path, "[unet]\nlr = 1e-4\nsteps = 10")
    assert _refused(path, {"unet.lr": "-1"}) == "unet.lr must be > 0, got -1.0"
    assert _refused(path, {"unet.steps": "-3"}) == "unet.steps must be ≥ 1, got -3"
    run, _, unet, _ = parse_config(read_toml(path))
    assert unet.lr == 1e-4 and unet.steps == 10 and run.model == "tiny"


def test_fine_tuning_settings_are_checked_the_same_way():
    with pytest.raises(ConfigError, match="^lr must be a finite number, got nan$"):
        build_config(AdapterTrainConfig, {"lr": "nan"})
    with pytest.raises(ConfigError, match="^steps must be ≥ 1, got -1$"):
        build_config(AdapterTrainConfig, {"steps": "-1"})
    with pytest.raises(ConfigError, match="^rank must be ≥ 1, got 0$"):
        build_config(AdapterTrainConfig, {"rank": 0})
    assert build_config(AdapterTrainConfig, {"steps": "3", "lr": "0.5"}).steps == 3


def test_files_that_are_not_configs(tmp_path):
    latin = tmp_path / "latin.toml"
    latin.write_bytes("name = 'café'".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"^{latin}: training config is not UTF-8 \\(invalid continuation byte"):
        read_toml(latin)
    with pytest.raises(ConfigError, match=f"^{tmp_path}: training config is a folder, not a file$"):
        read_toml(tmp_path)
    with pytest.raises(ConfigError, match="gone.toml: config file not found$"):
        read_toml(tmp_path / "gone.toml")
    broken = _recipe(tmp_path, "[unet\n")
    with pytest.raises(ConfigError, match=f"^{broken}: invalid TOML: "):
        read_toml(broken)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_config_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "recipe.toml"
    os.mkfifo(fifo)
    error = without_hanging(lambda: read_toml(fifo), fifo)
    assert isinstance(error, ConfigError)
    assert str(error) == f"{fifo}: training config is a FIFO (named pipe), not a file"
