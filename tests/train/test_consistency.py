"""Latent consistency distillation (``nijimi.train.consistency``, ``train-adapter --type lcm``): its pieces against the
formulas and diffusers (boundary scalings = LCMScheduler's, the DDIM solver step = DDIMScheduler.step, the skipping
grid = LCMScheduler's 50-step schedule, pseudo-Huber), the whole loss against a hand computation, and a short run
that lowers the loss and saves an LCM adapter that the pipeline applies with ``--sampler lcm``."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from helpers import TOY_F2, random_model

from nijimi.adapters.formats import read_adapter
from nijimi.adapters.inject import adapted_layers, apply_adapter
from nijimi.diffusion.forward import convert_prediction
from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.errors import ConfigError
from nijimi.io.safetensors import read_metadata
from nijimi.pipelines.adapters import lora_requests
from nijimi.pipelines.pipeline import Pipeline
from nijimi.train.adapter import LCM_SAMPLER_KEY, AdapterTrainConfig, prepare_training, train_adapter
from nijimi.train.consistency import (
    boundary_scalings,
    consistency_function,
    ddim_step,
    pseudo_huber,
    skipping_timesteps,
    switched_off,
)
from nijimi.train.ldm import draw_diffusion_batch
from nijimi.train.trainer import step_generator


def config(tmp_path, **changes) -> AdapterTrainConfig:
    values = dict(out=str(tmp_path / "lcm.safetensors"), type="lcm", data="shapes", data_count=4, steps=3,
                  batch_size=4, lr=1e-2, warmup_steps=1, sample_every=0, save_every=0, rank=4)
    return AdapterTrainConfig(**{**values, **changes})


def test_boundary_scalings_are_lcm_schedulers():
    scheduler = LCMScheduler()
    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = boundary_scalings(t)
    for i, step in enumerate(t.tolist()):
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(float(ref_skip), rel=1e-6)
        assert c_out[i].item() == pytest.approx(float(ref_out), rel=1e-6)
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)  # f(x, 0) = x
    scaled = 10.0 * 259
    assert c_skip[3].item() == pytest.approx(0.25 / (scaled**2 + 0.25), rel=1e-6)
    assert c_out[3].item() == pytest.approx(scaled / (scaled**2 + 0.25) ** 0.5, rel=1e-6)


def test_consistency_function_is_c_skip_x_plus_c_out_x0():
    schedule = NoiseSchedule.sd("v_prediction")
    x, pred, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([3, 500])
    c_skip, c_out = boundary_scalings(t)
    x0 = convert_prediction(pred, x, t, schedule, "v_prediction", "sample")
    expected = c_skip.view(2, 1, 1, 1) * x + c_out.view(2, 1, 1, 1) * x0
    torch.testing.assert_close(consistency_function(pred, x, t, schedule), expected)


@pytest.mark.parametrize(("prediction", "zero_snr", "step"), [("epsilon", False, 499), ("epsilon", False, 39),
                                                              ("v_prediction", True, 979), ("v_prediction", True, 999)])
def test_ddim_step_is_diffusers_ddim_scheduler_step(prediction, zero_snr, step):
    """k = 20 on the 1000-step grid is DDIMScheduler at 50 steps (prev = t − 1000 // 50), η = 0."""
    schedule = NoiseSchedule(prediction_type=prediction, rescale_zero_terminal_snr=zero_snr)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction, rescale_betas_zero_snr=zero_snr, clip_sample=False)
    scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(step)
    x, pred = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ref = scheduler.step(pred.double(), step, x.double(), eta=0.0).prev_sample
    ours = ddim_step(pred.double(), x.double(), torch.tensor([step]), torch.tensor([step - 20]), schedule)
    # at t = 999 on the zero-SNR schedule nijimi keeps ᾱ = 2⁻²⁴ where diffusers' DDIM has 0 (σ finite for samplers)
    tol = 1e-3 if step == 999 else 1e-5  # diffusers keeps ᾱ in float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)


def test_skipping_grid_is_lcm_schedulers_50_step_schedule():
    scheduler = LCMScheduler()
    scheduler.set_timesteps(50, original_inference_steps=50)
    grid = skipping_timesteps(NoiseSchedule.sd(), 20)
    assert grid.flip(0).tolist() == scheduler.timesteps.tolist()
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1].item() == 999
    with pytest.raises(ConfigError, match="lcm skip 7 must divide the 1000 training timesteps"):
        skipping_timesteps(NoiseSchedule.sd(), 7)


def test_pseudo_huber_is_its_formula():
    a, b = torch.tensor([0.0, 0.0005, 1.0, -3.0]), torch.tensor([0.0, 0.0, 0.0, 1.0])
    expected = [0.0, (0.0005**2 + 1e-6) ** 0.5 - 1e-3, (1 + 1e-6) ** 0.5 - 1e-3, (16 + 1e-6) ** 0.5 - 1e-3]
    assert pseudo_huber(a, b).item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    assert pseudo_huber(a[2:3], b[2:3], c=0.5).item() == pytest.approx(1.25**0.5 - 0.5, rel=1e-6)


def test_switched_off_adapters_give_the_base_model_and_come_back(tmp_path):
    model, base = random_model(TOY_F2, 0), random_model(TOY_F2, 0)
    run = prepare_training(config(tmp_path), model)
    for layer in run.trainer.module.layers.values():
        torch.nn.init.normal_(layer.lora_up, std=0.1)  # a trained-looking adapter
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([100, 900]), torch.randn(2, 5, 32)
    with torch.no_grad():
        with switched_off(run.trainer.module.objective.adapters):
            torch.testing.assert_close(model.unet(x, t, ctx), base.unet(x, t, ctx))
        assert (model.unet(x, t, ctx) - base.unet(x, t, ctx)).abs().max() > 1e-3
    assert {a.multiplier for a in run.trainer.module.objective.adapters} == {1.0}


def test_loss_of_an_identity_adapter_is_the_hand_computed_consistency_loss(tmp_path):
    """A fresh adapter (up = 0) is the base model: at guidance 1 the teacher is the base's conditional prediction,
    so the loss is pseudo-Huber(f(x_t, t), f(DDIM(x_t, t → t − 20), t − 20)) with the draws of the trainer."""
    model = random_model(TOY_F2, 0)
    run = prepare_training(config(tmp_path, lcm_guidance=(1.0, 1.0)), model)
    objective, indices = run.trainer.module.objective, [0, 1, 2, 3]
    with torch.no_grad():
        loss = run.trainer.module(indices, step_generator(5, 0), slice(0, 4))
        posterior, cond, _ = objective.encode(indices)
        batch = draw_diffusion_batch(step_generator(5, 0), 4, slice(0, 4), posterior,
                                     model.vae.config.scaling_factor, model.config.schedule,
                                     timestep_weights=objective.timestep_weights)
        schedule, t = model.config.schedule, batch.t
        assert set(t.tolist()) <= set(range(19, 1000, 20))
        t_prev = (t - 20).clamp(min=0)
        x_prev = ddim_step(model.unet(batch.x_t, t, cond), batch.x_t, t, t_prev, schedule)
        target = consistency_function(model.unet(x_prev, t_prev, cond), x_prev, t_prev, schedule)
        student = consistency_function(model.unet(batch.x_t, t, cond), batch.x_t, t, schedule)
    assert loss.item() == pytest.approx(pseudo_huber(student, target).item(), rel=1e-5)


def test_three_steps_lower_the_loss_and_the_file_is_an_lcm_adapter_the_pipeline_applies(tmp_path):
    model = random_model(TOY_F2, 0)
    cfg = config(tmp_path)
    run = prepare_training(cfg, model)
    fixed = [0, 1, 2, 3]

    def loss() -> float:
        with torch.no_grad():
            return sum(float(run.trainer.module(fixed, step_generator(9, k), slice(0, 4))) for k in range(4)) / 4

    start = loss()
    run.trainer.run()
    assert loss() < start  # measured 0.14675 → 0.14611 (the target moves with the student)
    params = {id(p) for p in run.trainer.params}
    assert params == {id(p) for _, layer in adapted_layers(model) for p in layer.adapters.parameters()}

    done = train_adapter(cfg, model=random_model(TOY_F2, 0))
    metadata = read_metadata(cfg.out)
    assert (metadata[LCM_SAMPLER_KEY], metadata["lcm_target_ema"]) == ("lcm", "0.0")
    assert metadata["ss_lr_scheduler"] == "cosine_with_warmup"  # min_lr_ratio < 1; "constant_with_warmup" at 1
    loaded = read_adapter(cfg.out, TOY_F2, strict=True)
    assert any(w.tensors["lora_down"].ndim == 4 and w.tensors["lora_down"].shape[-1] == 3
               for w in loaded.adapter.modules.values())  # the 3×3 convolutions too, as LCM-LoRA
    fresh = random_model(TOY_F2, 0)
    apply_adapter(fresh, loaded.adapter)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([19, 999]), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(x, t, ctx), done.model.unet(x, t, ctx), rtol=0, atol=1e-5)
    pipe = Pipeline(random_model(TOY_F2, 0))
    plain = pipe.generate("a red circle", steps=2, sampler="lcm", guidance=1.0, seed=1).images[0]
    adapted = pipe.generate("a red circle", steps=2, sampler="lcm", guidance=1.0, seed=1,
                            loras=lora_requests([cfg.out])).images[0]
    assert plain.size == adapted.size and plain.tobytes() != adapted.tobytes()


def test_bad_lcm_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"lcm guidance range \(8.0, 4.0\) must be LOW ≤ HIGH, both ≥ 1"):
        config(tmp_path, lcm_guidance=(8.0, 4.0))
    with pytest.raises(ConfigError, match="lcm_guidance must be two scales"):
        config(tmp_path, lcm_guidance=(3.0,))
    with pytest.raises(ConfigError, match="huber_c must be > 0, got 0.0"):
        config(tmp_path, huber_c=0.0)
    with pytest.raises(ConfigError, match=r"target_ema must be within \[0, 1\), got 1.0"):
        config(tmp_path, target_ema=1.0)


def test_ema_target_follows_lcm_rule_and_the_target_is_computed_with_it(tmp_path):
    """``target_ema`` μ: each training call first moves θ⁻ ← μ·θ⁻ + (1 − μ)·θ (LCM Alg. 1), then the target
    f(x̂_{t_n}, t_n) is the model with θ⁻ while the student keeps θ; checkpoints carry θ⁻."""
    model = random_model(TOY_F2, 0)
    run = prepare_training(config(tmp_path, target_ema=0.9, lcm_guidance=(1.0, 1.0)), model)
    module, objective, indices = run.trainer.module, run.trainer.module.objective, [0, 1, 2, 3]
    ups = [a.lora_up for a in objective.adapters]
    for up in ups:
        torch.nn.init.normal_(up, std=0.1)  # θ moved away from θ⁻ = the fresh adapter (up = 0)
    live = [up.detach().clone() for up in ups]
    loss = module(indices, step_generator(5, 0), slice(0, 4))
    shadow = {id(param): getattr(objective.target, key) for param, key in objective.target.pairs}
    for up, value in zip(ups, live, strict=True):
        torch.testing.assert_close(up.detach(), value)  # θ restored
        torch.testing.assert_close(shadow[id(up)], 0.1 * value)  # 0.9·0 + 0.1·θ
    assert all(torch.equal(shadow[id(a.lora_down)], a.lora_down) for a in objective.adapters)  # θ did not move
    assert {k.split(".")[0] for k in module.state_dict()} == {"layers", "target"}

    with torch.no_grad():
        posterior, cond, _ = objective.encode(indices)
        batch = draw_diffusion_batch(step_generator(5, 0), 4, slice(0, 4), posterior,
                                     model.vae.config.scaling_factor, model.config.schedule,
                                     timestep_weights=objective.timestep_weights)
        schedule, t = model.config.schedule, batch.t
        t_prev = (t - 20).clamp(min=0)
        student = consistency_function(model.unet(batch.x_t, t, cond), batch.x_t, t, schedule)
        with switched_off(objective.adapters):
            x_prev = ddim_step(model.unet(batch.x_t, t, cond), batch.x_t, t, t_prev, schedule)
        for up in ups:
            up.mul_(0.1)  # the adapters at θ⁻
        target = consistency_function(model.unet(x_prev, t_prev, cond), x_prev, t_prev, schedule)
    assert loss.item() == pytest.approx(pseudo_huber(student, target).item(), rel=1e-5)

    before = {key: value.clone() for key, value in shadow.items()}
    module.eval()  # a call outside training (measuring the loss, say) leaves θ⁻ alone
    module(indices, step_generator(5, 1), slice(0, 4))
    assert all(torch.equal(shadow[key], value) for key, value in before.items())
    module.train()
    with torch.no_grad():
        for up, value in zip(ups, live, strict=True):
            up.copy_(2 * value)  # the next step's θ
    module(indices, step_generator(5, 1), slice(0, 4))
    for up, value in zip(ups, live, strict=True):
        torch.testing.assert_close(shadow[id(up)], 0.9 * (0.1 * value) + 0.1 * (2 * value))
    run.trainer.save()  # a resumed run continues the same average
    resumed = prepare_training(config(tmp_path, target_ema=0.9), random_model(TOY_F2, 0), resume=True)
    torch.testing.assert_close(dict(resumed.trainer.module.target.named_buffers()),
                               dict(objective.target.named_buffers()), rtol=0, atol=0)
