import subprocess
import sys

import pytest

from nijimi.cli import build_parser, main
from nijimi.train.adapter import AdapterTrainConfig
from nijimi.train.config import build_config
from nijimi.train.controlnet import ControlNetTrainConfig
from nijimi.train.run import parse_config
from nijimi.ui.train import config_values


def test_unknown_command_exits_nonzero(capsys):
    try:
        main(["no-such-command"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("argparse accepted an unknown command")


def test_python_m_nijimi_prints_version():
    out = subprocess.run([sys.executable, "-m", "nijimi", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("nijimi ")


def test_training_flags_are_generated_from_the_config_and_override_its_toml(tmp_path):
    recipe = tmp_path / "cn.toml"
    recipe.write_text('steps = 3\nlr = 0.5\ncondition = "canny"\n')
    args = build_parser().parse_args(["train-controlnet", "--config", str(recipe), "--steps=7", "--sample_count", "2",
                                      "--half"])
    cfg = build_config(ControlNetTrainConfig, config_values(args))
    assert (cfg.steps, cfg.lr, cfg.condition, cfg.sample_count, cfg.half) == (7, 0.5, "canny", 2, True)
    args = build_parser().parse_args(["train-adapter", "--type", "locon", "--text-encoder", "--rank", "4",
                                      "--min-snr-gamma=0", "--batch-size", "8", "--half=false"])
    cfg = build_config(AdapterTrainConfig, config_values(args))
    assert (cfg.type, cfg.text_encoder, cfg.rank, cfg.min_snr_gamma, cfg.batch_size, cfg.half) == (
        "locon", True, 4, 0.0, 8, False)
    run, vae, unet, _ = parse_config(config_values(build_parser().parse_args(
        ["train", "--config", "configs/embedded.toml", "--unet.steps=5", "--init", "model.safetensors"])))
    assert (unet.steps, run.init, run.model) == (5, "model.safetensors", "tiny")


@pytest.mark.parametrize("command", ["train", "train-adapter", "train-controlnet"])
def test_an_unknown_training_key_is_one_error_line(command, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--no-such-key=1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --no-such-key=1\n"
    recipe = tmp_path / "bad.toml"
    recipe.write_text("no_such_key = 1\n")
    assert main([command, "--config", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key(s): no_such_key (known: ") and err.count("\n") == 1
