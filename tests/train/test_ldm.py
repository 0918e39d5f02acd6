import torch

from nijimi.diffusion.forward import q_sample, timestep_weights
from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.models.ldm import LatentDiffusion, ModelConfig
from nijimi.models.text_encoder import TextEncoderConfig
from nijimi.models.unet import UNetConfig
from nijimi.models.vae import VAE, VAEConfig
from nijimi.train.ldm import AutoencoderObjective, DiffusionObjective, draw_diffusion_batch, measure_scaling_factor
from nijimi.train.shapes import ShapesDataset
from nijimi.train.trainer import LoopConfig, Trainer

DATA = ShapesDataset(size=32, count=64)
VAE_CFG = VAEConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1)
TEXT_CFG = TextEncoderConfig(width=64, num_layers=2, num_heads=2, mlp_width=128)
UNET_CFG = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                      context_dim=64)
MODEL_CFG = ModelConfig(UNET_CFG, VAE_CFG, TEXT_CFG, schedule=NoiseSchedule.sd())


def _mean(xs):
    return sum(xs) / len(xs)


def test_vae_stage_lowers_reconstruction_loss(tmp_path):
    torch.manual_seed(0)
    vae = VAE(VAE_CFG)
    cfg = LoopConfig(steps=30, batch_size=8, lr=2e-3, warmup_steps=3, save_every=0)
    trainer = Trainer(AutoencoderObjective(vae, DATA), len(DATA), cfg, tmp_path)
    trainer.run()
    assert _mean(trainer.losses[-5:]) < 0.6 * _mean(trainer.losses[:5])
    scale = measure_scaling_factor(vae, DATA, count=32, batch=16)
    with torch.no_grad():
        z = vae.encode(torch.stack([DATA[i][0] for i in range(32)])).mean
    assert abs(float((z * scale).std()) - 1.0) < 1e-4


def test_diffusion_stage_lowers_loss_and_trains_text_encoder(tmp_path):
    torch.manual_seed(0)
    model = LatentDiffusion(MODEL_CFG)
    te, vae = model.text_encoder, model.vae
    te_before = te.text_model.final_layer_norm.weight.detach().clone()
    vae_before = {k: v.clone() for k, v in vae.state_dict().items()}
    objective = DiffusionObjective(model, DATA, min_snr_gamma=5.0)
    cfg = LoopConfig(steps=30, batch_size=8, lr=2e-3, warmup_steps=3, save_every=0)
    trainer = Trainer(objective, len(DATA), cfg, tmp_path)
    trainer.run()
    assert _mean(trainer.losses[-5:]) < 0.8 * _mean(trainer.losses[:5])
    assert not torch.equal(te.text_model.final_layer_norm.weight, te_before)
    for k, v in vae.state_dict().items():
        assert torch.equal(v, vae_before[k]), f"frozen VAE weight {k} changed"


def test_frozen_text_encoder_is_not_trained(tmp_path):
    torch.manual_seed(0)
    model = LatentDiffusion(MODEL_CFG)
    te = model.text_encoder
    before = {k: v.clone() for k, v in te.state_dict().items()}
    objective = DiffusionObjective(model, DATA, train_text_encoder=False)
    Trainer(objective, len(DATA), LoopConfig(steps=2, batch_size=4, save_every=0), tmp_path).run()
    for k, v in te.state_dict().items():
        assert torch.equal(v, before[k])


def test_frozen_unet_trains_the_text_encoder_alone(tmp_path):
    torch.manual_seed(0)
    model = LatentDiffusion(MODEL_CFG)
    unet, te = model.unet, model.text_encoder
    unet_before, te_before = ({k: v.clone() for k, v in m.state_dict().items()} for m in (unet, te))
    objective = DiffusionObjective(model, DATA, train_unet=False)
    trainer = Trainer(objective, len(DATA), LoopConfig(steps=2, batch_size=4, save_every=0), tmp_path)
    assert {id(p) for p in trainer.params} == {id(p) for p in te.parameters()}
    trainer.run()
    assert all(torch.equal(v, unet_before[k]) for k, v in unet.state_dict().items())
    assert not torch.equal(te.text_model.final_layer_norm.weight, te_before["text_model.final_layer_norm.weight"])


def test_timestep_weights_decide_which_timesteps_are_trained():
    torch.manual_seed(0)
    model = LatentDiffusion(MODEL_CFG)
    seen = []
    model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    weights = timestep_weights(1000, "range", multiplier=1e12, begin=990, end=1000)
    objective = DiffusionObjective(model, DATA, timestep_weights=weights)
    objective(list(range(16)), torch.Generator().manual_seed(0), slice(0, 16))
    objective.timestep_weights = None
    objective(list(range(16)), torch.Generator().manual_seed(0), slice(0, 16))
    biased, uniform = seen
    assert biased.min() >= 990 and len(set(biased.tolist())) > 3
    assert uniform.min() < 900


def test_draw_diffusion_batch_draws_for_the_global_batch_in_one_fixed_order():
    """ε_z, t, ε, the caption coins: each for the whole global batch of 4, of which this rank keeps items 2 and 3."""
    torch.manual_seed(0)
    with torch.no_grad():
        posterior = VAE(VAE_CFG).encode(torch.stack([DATA[i][0] for i in (2, 3)]))
    schedule = NoiseSchedule.sd()
    batch = draw_diffusion_batch(torch.Generator().manual_seed(7), 4, slice(2, 4), posterior, 0.5, schedule,
                                 caption_dropout=0.5)
    g = torch.Generator().manual_seed(7)
    shape = (4, *posterior.mean.shape[1:])
    z_eps = torch.randn(shape, generator=g)[2:]
    t = torch.randint(0, 1000, (4,), generator=g)[2:]
    noise = torch.randn(shape, generator=g)[2:]
    drop = (torch.rand(4, generator=g) < 0.5)[2:]
    x0 = (posterior.mean + posterior.std * z_eps) * 0.5
    assert torch.equal(batch.t, t) and batch.drop == drop.tolist()
    assert torch.equal(batch.x_t, q_sample(x0, t, noise, schedule)) and torch.equal(batch.target, noise)  # ε-pred
