"""``load_vae``: standalone VAE files in the original layout (bare or ``first_stage_model.`` keys, EMA and loss keys
ignored) and diffusers ``AutoencoderKL`` folders saved by diffusers decode as diffusers' AutoencoderKL does; a VAE
for other latents, or with keys that are no VAE's, is refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL
from helpers import TOY_F8, randomize, rel_err
from safetensors.torch import save_file

from nijimi.errors import CheckpointError, ConfigError
from nijimi.io.keys.vae import vae_config_to_diffusers, vae_key_table
from nijimi.io.vae_file import load_vae
from nijimi.models.vae import VAEConfig

CFG = TOY_F8.vae
TOLERANCE = 1e-4  # max |nijimi − diffusers| / max |diffusers|, fp32, as tests/models/test_vae.py


def diffusers_vae(cfg: VAEConfig = CFG, seed: int = 3) -> AutoencoderKL:
    """A random diffusers AutoencoderKL of ``cfg``'s architecture."""
    vae = AutoencoderKL.from_config(vae_config_to_diffusers(cfg)).eval()
    randomize(vae, seed)
    return vae


def original_file(path, vae: AutoencoderKL, cfg: VAEConfig = CFG, prefix: str = "", extra: dict | None = None):
    """``vae``'s weights saved at ``path`` in the original layout, keys behind ``prefix``, plus ``extra`` tensors."""
    native = vae_key_table(cfg).to_native(vae.state_dict())
    save_file({**{prefix + k: v.contiguous() for k, v in native.items()}, **(extra or {})}, path)
    return path


@pytest.fixture(scope="module")
def theirs() -> AutoencoderKL:
    return diffusers_vae()


@torch.no_grad()
def assert_decodes_like(ours, theirs):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert rel_err(ours.decode(z), theirs.decode(z).sample) < TOLERANCE


def test_diffusers_folder(theirs, tmp_path):
    theirs.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae", CFG)
    assert ours.config == CFG and not ours.training
    assert_decodes_like(ours, theirs)


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_original_file(theirs, tmp_path, prefix):
    extra = {prefix + "loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.9999),
             prefix + "model_ema.num_updates": torch.tensor(5)}
    ours = load_vae(original_file(tmp_path / "vae.safetensors", theirs, prefix=prefix, extra=extra), CFG)
    assert ours.config == CFG
    assert_decodes_like(ours, theirs)


def test_model_scaling_factor_and_norm_groups_are_kept(theirs, tmp_path):
    like = dataclasses.replace(CFG, scaling_factor=0.5)
    assert load_vae(original_file(tmp_path / "vae.safetensors", theirs), like).config == like


@pytest.mark.parametrize("cfg, message", [
    (dataclasses.replace(CFG, z_channels=8), "a VAE of 8 latent channels and factor 8; .* need 4 channels"),
    (dataclasses.replace(CFG, channel_mult=(1, 2)), "a VAE of 4 latent channels and factor 2"),
])
def test_other_latents_are_refused(tmp_path, cfg, message):
    path = original_file(tmp_path / "vae.safetensors", diffusers_vae(cfg), cfg)
    with pytest.raises(ConfigError, match=f"vae.safetensors: {message}"):
        load_vae(path, CFG)
    diffusers_vae(cfg).save_pretrained(tmp_path / "folder")
    with pytest.raises(ConfigError, match=f"folder: {message}"):
        load_vae(tmp_path / "folder", CFG)


def test_unknown_keys_and_non_vae_files_are_refused(theirs, tmp_path):
    path = original_file(tmp_path / "vae.safetensors", theirs, extra={"model.diffusion_model.x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"1 unexpected keys, e.g. \['model.diffusion_model.x'\]"):
        load_vae(path, CFG)
    save_file({"weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.safetensors: not an SD VAE in the original layout"):
        load_vae(tmp_path / "other.safetensors", CFG)
    with pytest.raises(CheckpointError, match="missing: no such VAE file or folder"):
        load_vae(tmp_path / "missing", CFG)
