"""VAE parity with diffusers' AutoencoderKL on random weights, the full-size SD layout, tiling and the fp16 fallback."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from helpers import randomize, rel_err

from nijimi.errors import CheckpointError, ConfigError, ImageError, NijimiError
from nijimi.io.keys.vae import vae_config_from_diffusers, vae_config_to_diffusers, vae_key_table
from nijimi.models.vae import VAE, DiagonalGaussian, VAEConfig, _tiled

# Small config of the real architecture: three levels (so decoder.up is visibly reversed), width changes
# (nin_shortcut), two resnets per encoder level and three per decoder level, downscale factor 4.
SMALL = VAEConfig(channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, norm_groups=8)
TOLERANCE = 1e-4  # max |nijimi − diffusers| / max |diffusers|, fp32
SD_VAE_PARAMETERS = 83_653_863  # kl-f8 autoencoder of SD 1.x/2.x


def make_pair(cfg: VAEConfig = SMALL, seed: int = 0) -> tuple[VAE, AutoencoderKL]:
    """A random nijimi VAE and the diffusers AutoencoderKL holding the same weights, moved by nijimi's table."""
    ours = VAE(cfg).eval()
    randomize(ours, seed)
    theirs = AutoencoderKL.from_config(vae_config_to_diffusers(cfg)).eval()
    theirs.load_state_dict(vae_key_table(cfg).to_foreign(ours.state_dict()), strict=True)
    return ours, theirs


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=gen) * 2 - 1


def latents(batch: int = 2, size: int = 8, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair() -> tuple[VAE, AutoencoderKL]:
    return make_pair()


# ---- parity ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    ours, theirs = pair
    x = images()
    mine, ref = ours.encode(x), theirs.encode(x).latent_dist
    assert mine.mean.shape == (2, 4, 8, 8)
    assert rel_err(mine.mean, ref.mean) < TOLERANCE
    assert rel_err(mine.logvar, ref.logvar) < TOLERANCE


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    ours, theirs = pair
    z = latents()
    mine, ref = ours.decode(z), theirs.decode(z).sample
    assert mine.shape == (2, 3, 32, 32)
    assert rel_err(mine, ref) < TOLERANCE


@torch.no_grad()
def test_scaled_latent_helpers(pair):
    ours, _ = pair
    z = latents()
    assert rel_err(ours.decode_latents(z * 0.18215), ours.decode(z)) < 1e-5
    assert torch.equal(ours.decode_latents(z, tile=16), ours.tiled_decode(z / 0.18215, tile=16))
    assert torch.equal(ours.decode_latents(z, tile=32), ours.decode(z / 0.18215))


def test_posterior_matches_diffusers():
    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(3)) * 20  # logvar beyond the clamp
    mine, ref = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert torch.equal(mine.logvar, ref.logvar) and mine.logvar.min() == -30 and mine.logvar.max() == 20
    assert torch.equal(mine.mean, ref.mode()) and torch.equal(mine.std, ref.std)
    assert torch.equal(mine.sample(torch.Generator().manual_seed(7)), ref.sample(torch.Generator().manual_seed(7)))
    assert torch.allclose(mine.kl(), ref.kl(), rtol=1e-6)


# ---- full-size layout and key tables -------------------------------------------------------------------------------


def test_sd_vae_has_the_reference_parameters_and_keys():
    cfg = VAEConfig.sd()
    with torch.device("meta"):
        ours = VAE(cfg)
        theirs = AutoencoderKL.from_config(vae_config_to_diffusers(cfg))
    assert sum(p.numel() for p in ours.parameters()) == SD_VAE_PARAMETERS
    assert sum(p.numel() for p in theirs.parameters()) == SD_VAE_PARAMETERS
    converted = {k: tuple(v.shape) for k, v in vae_key_table(cfg).to_foreign(ours.state_dict()).items()}
    assert converted == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert cfg.downscale_factor == 8


def test_native_keys_are_the_original_ldm_keys():
    """diffusers' own single-file converter, fed our state dict as ``first_stage_model.*``, gives our table's result."""
    ours = VAE(SMALL)
    randomize(ours, 4)
    ldm = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    reference = convert_ldm_vae_checkpoint(ldm, vae_config_to_diffusers(SMALL))
    converted = vae_key_table(SMALL).to_foreign(ours.state_dict())
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)
    assert ("decoder.up.2.block.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight") in vae_key_table(SMALL)


def test_round_trips_are_exact():
    ours = VAE(SMALL)
    randomize(ours, 5)
    native = ours.state_dict()
    diffusers = vae_key_table(SMALL).to_foreign(native)
    assert diffusers["encoder.mid_block.attentions.0.to_q.weight"].shape == (32, 32)
    back = vae_key_table(SMALL).to_native(diffusers)
    assert list(back) == list(native) and all(torch.equal(back[k], native[k]) for k in native)
    again = vae_key_table(SMALL).to_foreign(back)
    assert all(torch.equal(again[k], diffusers[k]) for k in diffusers)


def test_conversion_reports_missing_and_unexpected_keys():
    native = VAE(SMALL).state_dict()
    native.pop("encoder.conv_in.bias")
    native["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"encoder\.conv_in\.bias.*encoder\.extra\.weight"):
        vae_key_table(SMALL).to_foreign(native)


def test_configs_round_trip():
    for cfg in (VAEConfig.sd(), VAEConfig.tiny(), SMALL):
        assert VAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert vae_config_from_diffusers(vae_config_to_diffusers(cfg)) == cfg
        with torch.device("meta"):
            theirs = AutoencoderKL.from_config(vae_config_to_diffusers(cfg))
        assert vae_config_from_diffusers(dict(theirs.config)) == cfg
    assert VAEConfig.tiny().downscale_factor == 4


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="norm_groups"):
        VAEConfig(channels=24, norm_groups=32)
    with pytest.raises(ConfigError, match="colour"):
        VAEConfig.from_dict({"colour": 1})
    with pytest.raises(ConfigError, match="shift_factor"):
        vae_config_from_diffusers({**vae_config_to_diffusers(SMALL), "shift_factor": 0.1159})
    with pytest.raises(ImageError, match=r"\(B, 3, H, W\).*\(1, 4, 32, 32\)"):
        VAE(SMALL).encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ImageError, match=r"multiples of 4, got \(1, 3, 32, 30\)"):
        VAE(SMALL).encode(torch.zeros(1, 3, 32, 30))
    with pytest.raises(ConfigError, match=r"\(B, 4, H, W\).*\(1, 3, 8, 8\)"):
        VAE(SMALL).decode(torch.zeros(1, 3, 8, 8))


# ---- tiling ------------------------------------------------------------------------------------------------------


def test_tile_stitching_is_seamless_for_a_pointwise_map():
    """Tiles of a map that commutes with cropping blend back into exactly the untiled result, at any size."""
    x = torch.randn(1, 2, 23, 37, generator=torch.Generator().manual_seed(6))
    up = lambda t: F.interpolate(t, scale_factor=4.0, mode="nearest")  # noqa: E731
    out = _tiled(up, x, (8, 6), (32, 24))
    assert out.shape == (1, 2, 92, 148)
    assert torch.allclose(out, up(x), rtol=0, atol=1e-6)


@torch.no_grad()
def test_tiled_decode_matches_diffusers_tiling(pair):
    ours, theirs = pair
    z = latents(batch=1, size=20)
    theirs.enable_tiling()
    theirs.tile_sample_min_size, theirs.tile_latent_min_size = 32, 8
    try:
        ref = theirs.decode(z).sample
        ref_moments = theirs._tiled_encode(images(batch=1, size=80))
    finally:
        theirs.disable_tiling()
    assert rel_err(ours.tiled_decode(z, tile=32), ref) < TOLERANCE
    moments = torch.cat([(p := ours.tiled_encode(images(batch=1, size=80), tile=32)).mean, p.logvar], dim=1)
    assert rel_err(moments, ref_moments) < TOLERANCE


def smooth_init(model: torch.nn.Module, seed: int) -> None:
    """Seeded default-scale init (U(±1/√fan_in)) with centre-dominated 3×3 kernels: a local, smooth network like a
    trained VAE, for which tiling converges to the untiled result."""
    gen = torch.Generator().manual_seed(seed)
    rim = ([0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 0, 2, 0, 1, 2])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                bound = m.weight[0].numel() ** -0.5
                m.weight.copy_((torch.rand(m.weight.shape, generator=gen) * 2 - 1) * bound)
                m.bias.copy_((torch.rand(m.bias.shape, generator=gen) * 2 - 1) * bound)
                if m.kernel_size == (3, 3):
                    m.weight[:, :, rim[0], rim[1]] *= 0.05


def mean_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().mean() / b.abs().mean()).item()


@torch.no_grad()
def test_tiled_decode_and_encode_are_close_to_untiled():
    """Tiles see their own GroupNorm statistics and attention context, so tiling is close, not exact; a misplaced
    or unblended tile would be off by ~100%. norm_groups=1 pools statistics over all channels (least tile noise)."""
    ours = VAE(VAEConfig(channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=1)).eval()
    smooth_init(ours, 1)
    z = latents(batch=1, size=48)
    full, tiled = ours.decode(z), ours.tiled_decode(z, tile=128)
    assert tiled.shape == full.shape == (1, 3, 192, 192)
    assert mean_rel_err(tiled, full) < 0.02 and rel_err(tiled, full) < 0.1
    x = images(batch=1, size=192)
    full_mean, tiled_mean = ours.encode(x).mean, ours.tiled_encode(x, tile=128).mean
    assert mean_rel_err(tiled_mean, full_mean) < 0.01 and rel_err(tiled_mean, full_mean) < 0.05


# ---- half-precision fallback --------------------------------------------------------------------------------------


def _overflow_in_half(module, args, output):
    return output * float("inf") if output.dtype == torch.float16 else output


@torch.no_grad()
def test_half_precision_overflow_falls_back_to_float32():
    ours = VAE(SMALL).eval()
    randomize(ours, 8)
    ours.half()
    expected = VAE(SMALL).eval()
    expected.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    hook = ours.decoder.mid.block_1.register_forward_hook(_overflow_in_half)
    z = latents().half()
    with pytest.warns(UserWarning, match="float32"):
        image = ours.decode_latents(z)
    hook.remove()
    assert image.dtype == torch.float16 and torch.isfinite(image).all()
    assert next(ours.parameters()).dtype == torch.float16
    assert torch.equal(image, expected.decode_latents(z.float()).half())


@torch.no_grad()
def test_float32_nan_is_an_error_not_a_black_image():
    ours = VAE(SMALL).eval()
    z = latents()
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(NijimiError, match=r"torch.float32 \(1 non-finite latents\)"):
        ours.decode_latents(z)
