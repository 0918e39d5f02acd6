"""``nijimi train-decoder`` (``nijimi.train.decoder``): a TAESD distilled from a model's VAE. A short run lowers the
loss on a fixed batch and saves the published key layout, which ``io.taesd`` loads back to the same decoder."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import TOY_F2, TOY_F4, random_model

from nijimi.cli import main
from nijimi.errors import ConfigError
from nijimi.io.safetensors import read_header
from nijimi.io.taesd import load_taesd
from nijimi.models.taesd import TAESDConfig
from nijimi.pipelines.pipeline import Pipeline
from nijimi.train.decoder import (
    ENCODER_FILE,
    DecoderTrainConfig,
    decoder_psnr,
    gradient_difference,
    heldout_images,
    prepare_decoder,
    psnr,
    train_decoder,
    vae_pairs,
)
from nijimi.train.finetune import open_images
from nijimi.train.trainer import step_generator
from nijimi.ui.train import sample_latents


def config(tmp_path, **changes) -> DecoderTrainConfig:
    values = dict(out=str(tmp_path / "taesd_decoder.safetensors"), data="shapes", data_count=4, steps=3,
                  batch_size=4, lr=3e-3, warmup_steps=1, sample_every=0, save_every=0)
    return DecoderTrainConfig(**{**values, **changes})


def test_three_steps_lower_the_loss_and_the_files_load_back_as_the_trained_taesd(tmp_path):
    model = random_model(TOY_F4, 0)
    cfg = config(tmp_path, encoder=True, l1=0.5)
    run = prepare_decoder(cfg, model)
    assert run.tiny.config == TAESDConfig(latent_channels=4, channels=32, blocks=(1, 2, 2))  # the f = 4 preset

    def loss() -> float:
        with torch.no_grad():
            return float(run.trainer.module([0, 1, 2, 3], step_generator(0, 0), slice(0, 4)))

    start = loss()
    run.trainer.run()
    assert loss() < 0.99 * start  # measured 1.141 → 1.122

    done = train_decoder(cfg, model=model, samples=False)
    assert "1.weight" in read_header(cfg.out) and "3.conv.0.weight" in read_header(cfg.out)  # published layout
    decoder, encoder = load_taesd(cfg.out), load_taesd(tmp_path / ENCODER_FILE)
    images = heldout_images(cfg, 32, 2)
    latents, _ = vae_pairs(model, images)
    with torch.no_grad():
        torch.testing.assert_close(decoder.decode_latents(latents), done.tiny.decode_latents(latents))
        torch.testing.assert_close(encoder.encode_latents(images), done.tiny.encode_latents(images))


def test_the_decoder_learns_the_vaes_decode_not_the_image(tmp_path):
    model = random_model(TOY_F4, 0)
    run = prepare_decoder(config(tmp_path, l1=0.25, edge=0.5), model)
    images, latents, target = run.trainer.module.examples([1, 0])
    torch.testing.assert_close(target, model.vae.decode(model.vae.encode(images).mean).detach())
    torch.testing.assert_close(latents, model.vae.encode(images).mean * model.vae.config.scaling_factor)
    decoded = run.tiny.decode_latents(latents)
    err = decoded - target
    expected = err.pow(2).mean() + 0.25 * err.abs().mean() + 0.5 * gradient_difference(decoded, target)
    assert decoder_psnr(run.tiny, model, images) == pytest.approx(psnr(run.tiny.decode_latents(latents), target))
    with torch.no_grad():
        assert run.trainer.module([1, 0], step_generator(0, 0), slice(0, 2)).item() == pytest.approx(expected.item())


def test_gradient_difference_is_its_formula_by_hand():
    a = torch.tensor([[0.0, 1.0], [3.0, 3.0]]).view(1, 1, 2, 2)
    b = torch.tensor([[1.0, 1.0], [1.0, 2.0]]).view(1, 1, 2, 2)
    # vertical |∇a| = (3, 2), |∇b| = (0, 1): mean(3, 1) = 2; horizontal |∇a| = (1, 0), |∇b| = (0, 1): mean(1, 1) = 1
    assert gradient_difference(a, b).item() == pytest.approx(3.0)
    assert gradient_difference(b, a).item() == pytest.approx(3.0)
    assert gradient_difference(a, a + 0.5).item() == 0.0  # same edges, other brightness
    assert gradient_difference(a, -a).item() == 0.0  # only edge magnitudes count


def test_psnr_is_its_formula():
    a = torch.zeros(1, 3, 4, 4)
    assert psnr(a + 0.1, a) == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.01)).item())
    assert psnr(a, a) == float("inf")


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="a VAE of factor 2 has no TAESD preset"):
        config(tmp_path).taesd_config(random_model(TOY_F2, 0))
    with pytest.raises(ConfigError, match="l1, edge and channels must be ≥ 0"):
        config(tmp_path, l1=-1.0)
    with pytest.raises(ConfigError, match="edge=-0.5"):
        config(tmp_path, edge=-0.5)
    with pytest.raises(ConfigError, match="recolours shapes scenes"):
        config(tmp_path, data=str(tmp_path), any_colour=0.5)
    with pytest.raises(ConfigError, match="sampled = 1.5: a share within"):
        config(tmp_path, sampled=1.5)
    with pytest.raises(ConfigError, match="no image to encode"):
        config(tmp_path, sampled=0.5, encoder=True)
    with pytest.raises(ConfigError, match="sampled = 1.0 needs a latent_fn"):
        prepare_decoder(config(tmp_path, sampled=1.0), random_model(TOY_F4, 0))


def test_sampled_scenes_train_on_the_latents_latent_fn_gives_for_their_captions(tmp_path):
    model = random_model(TOY_F4, 0)
    calls = []

    def latent_fn(m, prompt, seed):
        assert m is model
        calls.append((prompt, seed))
        return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))

    cfg = config(tmp_path, data_count=16, sampled=0.5, any_colour=0.5, captions="training", seed=3)
    objective = prepare_decoder(cfg, model, latent_fn=latent_fn).trainer.module
    assert 0 < len(objective.sampled) < 16  # about half the scenes
    drawn = min(objective.sampled)
    encoded = min(set(range(16)) - objective.sampled)
    images, latents, target = objective.examples([drawn, encoded, drawn])
    caption = open_images("shapes", 32, 3, 16, captions="training")[drawn][1]
    assert calls == [(caption, 3 + drawn)]  # once per scene, with the caption the recoloured image lacks
    torch.testing.assert_close(latents[0], latent_fn(model, "", 3 + drawn)[0])
    decode = model.vae.decode(latents[:1] / model.vae.config.scaling_factor).detach()[0]
    torch.testing.assert_close(target[0], decode)
    torch.testing.assert_close(images[0], decode)  # a sampled scene's image is its decode
    torch.testing.assert_close(latents[1], model.vae.encode(images[1:2]).mean[0] * model.vae.config.scaling_factor)
    assert len(prepare_decoder(config(tmp_path, data_count=16, sampled=1.0), model, latent_fn=latent_fn)
               .trainer.module.sampled) == 16


def test_init_starts_from_a_decoder_file_and_refuses_one_that_does_not_fit(tmp_path):
    model = random_model(TOY_F4, 0)
    first = train_decoder(config(tmp_path, steps=1), model=model, samples=False)
    cfg = config(tmp_path, out=str(tmp_path / "again.safetensors"), init=str(tmp_path / "taesd_decoder.safetensors"),
                 seed=5)
    again = prepare_decoder(cfg, model)
    for name, value in first.tiny.decoder.state_dict().items():
        torch.testing.assert_close(again.tiny.decoder.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="a TAESD decoder of shape"):
        prepare_decoder(dataclasses.replace(cfg, channels=16), model)
    train_decoder(config(tmp_path, out=str(tmp_path / "enc" / "taesd_decoder.safetensors"), steps=1, encoder=True),
                  model=model, samples=False)
    with pytest.raises(ConfigError, match="holds no TAESD decoder"):
        prepare_decoder(dataclasses.replace(cfg, init=str(tmp_path / "enc" / ENCODER_FILE)), model)


def test_sample_latents_are_the_latents_generate_makes():
    model = random_model(TOY_F4, 0)
    torch.testing.assert_close(sample_latents(model, "a red circle", 3),
                               Pipeline(model).generate("a red circle", seed=3).latents)



def test_cli_trains_a_decoder_that_eval_shapes_decodes_with(capsys, tmp_path):
    out = tmp_path / "taesd_decoder.safetensors"
    assert main(["train-decoder", "--base", "embedded", "--steps", "1", "--batch-size", "2", "--data-count", "2",
                 "--sampled", "0.5", "--out", str(out), "--no-samples", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{out}: PSNR ")
    assert printed.endswith(" dB against the VAE's decode (64 held-out scenes)\n")
    assert main(["eval", "shapes", "--n", "2", "--steps", "2", "--decoder", f"tiny:{out}", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("all              2 ")
