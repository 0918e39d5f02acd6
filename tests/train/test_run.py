import subprocess
import sys

import pytest

from nijimi.cli import build_parser, finish_distributed, main
from nijimi.errors import ConfigError
from nijimi.io.checkpoint import load_model
from nijimi.train.run import model_config, open_data, parse_config
from nijimi.ui.train import config_values


def test_command_line_architecture_overrides_are_typed():
    args = build_parser().parse_args(["train", "--arch.unet.model_channels=32", "--arch.unet.channel_mult=1,2",
                                      "--arch.unet.attention_levels=1", "--arch.text.width=64", "--unet.steps=7",
                                      "--prediction_type=v_prediction", "--rescale-zero-terminal-snr",
                                      "--timestep_spacing=trailing", "--vae.any_colour=0.5"])
    values = config_values(args)
    run, vae, unet, arch = parse_config(values)
    cfg = model_config(run, arch, scaling_factor=0.5)
    assert cfg.unet.model_channels == 32 and cfg.unet.channel_mult == (1, 2) and cfg.unet.attention_levels == (1,)
    assert cfg.text.width == 64 and cfg.unet.context_dim == 64  # the U-Net follows the text encoder's width
    assert cfg.vae.scaling_factor == 0.5 and cfg.prediction_type == "v_prediction"
    assert cfg.schedule.rescale_zero_terminal_snr and cfg.schedule.timestep_spacing == "trailing"
    assert cfg.schedule.alphas_cumprod[-1] < 1e-6  # what the exported model samples with
    assert unet.steps == 7 and vae.steps == 1000 and vae.any_colour == 0.5


def test_unknown_architecture_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): arch\.unet\.channels"):
        parse_config({"arch.unet.channels": "32"})


def test_two_objects_reaches_the_shapes_data_and_is_refused_for_a_folder():
    run, *_ = parse_config({"two_objects": "0.75", "data_count": "400"})
    scenes = open_data(run)
    assert scenes.two_objects == 0.75 and 250 < sum(len(scenes.scene(i).objects) == 2 for i in range(400)) < 350
    with pytest.raises(ConfigError, match=r"two_objects = 0.75 sets the shapes world's scenes; data 'photos'"):
        parse_config({"data": "photos", "two_objects": "0.75"})


def test_any_colour_on_a_folder_of_images_is_refused():
    with pytest.raises(ConfigError, match=r"vae.any_colour = 0.5 recolours shapes scenes; data 'photos'"):
        parse_config({"data": "photos", "vae.any_colour": "0.5"})


@pytest.mark.parametrize("code", [0, 3])
def test_finish_distributed_leaves_the_group_and_exits_with_the_code(tmp_path, code):
    script = (f"import torch; from nijimi.cli import finish_distributed\n"
              f"torch.distributed.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, "
              f"world_size=1)\nprint('written', flush=False)\nfinish_distributed({code})\nprint('not reached')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (code, "written\n"), done.stderr


def test_finish_distributed_outside_a_process_group_returns():
    assert finish_distributed(0) is None


def test_timestep_bias_is_read_and_checked_with_the_config():
    _, _, unet, _ = parse_config({"unet.timestep_bias_strategy": "later", "unet.timestep_bias_portion": "0.4"})
    assert unet.timestep_weights(1000)[600:].sum().item() == pytest.approx(0.4)  # multiplier 1: still uniform
    with pytest.raises(ConfigError, match="unknown timestep bias strategy 'last'"):
        parse_config({"unet.timestep_bias_strategy": "last"})


def test_train_unet_is_read_and_one_network_must_learn():
    _, _, unet, _ = parse_config({"unet.train_unet": False})
    assert not unet.train_unet and unet.train_text_encoder
    with pytest.raises(ConfigError, match="unet.train_unet and unet.train_text_encoder are both false: nothing would "
                                          "learn"):
        parse_config({"unet.train_unet": False, "unet.train_text_encoder": False})


def test_captions_key_picks_the_data_phrasing():
    run, *_ = parse_config({"captions": "training"})
    assert open_data(run).phrasing == "training" and open_data(parse_config({})[0]).phrasing == "original"
    with pytest.raises(ConfigError, match="captions = 'paraphrase': expected one of training, original"):
        parse_config({"captions": "paraphrase"})


def test_default_guidance_goes_into_the_export_and_a_fine_tune_keeps_it(tmp_path):
    """``default_guidance`` names the export's generation guidance (``ModelConfig.guidance``); without it a new
    model names 7 and a fine-tune keeps its init's."""
    tiny = ["--vae.steps=1", "--unet.steps=1", "--data-count=2", "--vae.batch-size=1", "--unet.batch-size=1",
            "--size=16", "--quiet"]
    assert main(["train", f"--out={tmp_path}/a", *tiny]) == 0
    assert load_model(tmp_path / "a" / "model.safetensors")[0].config.guidance == 7.0
    assert main(["train", f"--out={tmp_path}/b", "--default-guidance=3.5", *tiny]) == 0
    assert load_model(tmp_path / "b" / "model.safetensors")[0].config.guidance == 3.5
    assert main(["train", f"--out={tmp_path}/c", f"--init={tmp_path}/b/model.safetensors", *tiny]) == 0
    assert load_model(tmp_path / "c" / "model.safetensors")[0].config.guidance == 3.5
    with pytest.raises(ConfigError, match=r"default_guidance.* within \[0, 100\]"):
        parse_config({"default_guidance": "150"})
