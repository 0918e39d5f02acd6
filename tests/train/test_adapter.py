"""Adapter training (``nijimi.train.adapter``) and the masked diffusion loss (``nijimi.train.ldm``) on a tiny model:
the loss falls while no base weight moves, checkpoints hold the adapter alone and a killed run resumes bit for bit,
every adapter type's saved file reproduces the trained model, and a zero mask means a zero gradient."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TOY_F2, random_model, run_gloo_ranks
from PIL import Image

from nijimi.adapters.formats import read_adapter
from nijimi.adapters.inject import adapted_layers, apply_adapter, remove_adapter
from nijimi.diffusion.forward import diffusion_loss
from nijimi.diffusion.schedules import NoiseSchedule
from nijimi.errors import CheckpointError, ConfigError
from nijimi.io.safetensors import read_metadata
from nijimi.models.ldm import TEXT_PREFIX, UNET_PREFIX, LatentDiffusion
from nijimi.train.adapter import (
    AdapterTrainConfig,
    prepare_training,
    train_adapter,
)
from nijimi.train.data import ImageFolder
from nijimi.train.ldm import DiffusionObjective, latent_mask, masked_diffusion_loss
from nijimi.train.shapes import CONCEPT_COLOURS, ConceptShapes, ShapesDataset
from nijimi.train.trainer import step_generator

# SD's architecture at toy size: 16×16 images, an f=2 VAE (8×8 latents), a 2-level U-Net, a 2-layer text encoder.
CONFIG = TOY_F2


def base_model(seed: int = 0) -> LatentDiffusion:
    """The same random model for the same seed: the init plus N(0, 0.05²), so zero-initialised output layers pass
    gradients to the adapters (:func:`helpers.random_model`)."""
    return random_model(CONFIG, seed)


def config(tmp_path, **changes) -> AdapterTrainConfig:
    values = dict(out=str(tmp_path / "adapter.safetensors"), data="shapes-pink", data_count=8, steps=4,
                  batch_size=2, lr=1e-2, warmup_steps=1, sample_every=0, save_every=0, min_snr_gamma=0.0)
    return AdapterTrainConfig(**{**values, **changes})


def eval_loss(module, n: int = 8) -> float:
    """The objective's loss on images 0-3 averaged over n fixed noise draws (the same before and after training)."""
    module.eval()
    with torch.no_grad():
        return sum(float(module([0, 1, 2, 3], step_generator(123, k), slice(0, 4))) for k in range(n)) / n


def test_training_lowers_loss_and_leaves_every_base_weight_alone(tmp_path):
    model = base_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(tmp_path, steps=30, lr=3e-2, data_count=4, batch_size=4, text_encoder=True, warmup_steps=2)
    run = prepare_training(cfg, model)
    start = eval_loss(run.trainer.module)
    run.trainer.run()
    end = eval_loss(run.trainer.module)
    assert end < 0.9 * start, (start, end)  # measured 1.319 → 1.086
    trained = set(map(id, run.trainer.params))
    assert trained == {id(p) for _, layer in adapted_layers(model) for p in layer.adapters.parameters()}
    assert {p.split(".")[0] for p in run.paths} == {"model", "cond_stage_model"}
    remove_adapter(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"base weight {key} changed"


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    full = train_adapter(config(tmp_path / "full", steps=6, save_every=2), model=base_model())

    class Killed(Exception):
        pass

    def kill_at_5(trainer, loss, seconds):
        if trainer.step == 5:
            raise Killed

    cut = config(tmp_path / "cut", steps=6, save_every=2)
    with pytest.raises(Killed):
        train_adapter(cut, model=base_model(), on_step=kill_at_5)
    assert not (tmp_path / "cut" / "adapter.safetensors").exists()
    state = torch.load(cut.work_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    assert all(k.startswith("layers.") for k in state["model"])  # the adapter alone, no base weight
    resumed = train_adapter(cut, model=base_model(), resume=True)
    assert resumed.trainer.losses == full.trainer.losses
    a = read_adapter(tmp_path / "full" / "adapter.safetensors", CONFIG).adapter.modules
    b = read_adapter(tmp_path / "cut" / "adapter.safetensors", CONFIG).adapter.modules
    assert a.keys() == b.keys()
    for path in a:
        flat_a, flat_b = a[path].flat(), b[path].flat()
        assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), path


def _ddp_worker(rank: int, tmp_path, result) -> None:
    torch.set_num_threads(1)
    run = train_adapter(config(tmp_path / f"rank{rank}", steps=3, batch_size=4, text_encoder=True), model=base_model())
    if rank == 0:
        torch.save(run.trainer.module.state_dict(), result)


@pytest.mark.slow  # two spawned processes: ~20 s on 2 shared cores
def test_two_ddp_ranks_train_the_adapter_as_one_rank_with_their_combined_batch(tmp_path):
    run_gloo_ranks(_ddp_worker, 2, tmp_path, tmp_path, tmp_path / "ddp.pt")
    single = train_adapter(config(tmp_path / "single", steps=3, batch_size=4, text_encoder=True), model=base_model())
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp.keys() == single.trainer.module.state_dict().keys()
    start = prepare_training(config(tmp_path / "start", text_encoder=True), base_model()).trainer.module.state_dict()
    trained = single.trainer.module.state_dict()
    moved = torch.cat([(trained[k] - start[k]).flatten() for k in trained]).norm()
    apart = torch.cat([(ddp[k] - trained[k]).flatten() for k in trained]).norm()
    assert moved > 0.1
    # Adam divides each gradient by its own magnitude, so rounding differences of near-zero gradients show up in
    # its steps; the runs agree to 7e-5 (measured) of how far training moved the adapter.
    assert apart <= 1e-3 * moved


def test_resuming_another_adapter_is_refused(tmp_path):
    train_adapter(config(tmp_path, steps=2, save_every=2), model=base_model())
    with pytest.raises(CheckpointError, match="another adapter"):
        prepare_training(config(tmp_path, steps=2, rank=2), base_model(), resume=True)


@pytest.mark.parametrize(("kind", "fmt"), [("lora", "kohya"), ("lora", "peft"), ("locon", "kohya"),
                                           ("loha", "kohya"), ("lokr", "kohya"), ("dora", "kohya"),
                                           ("dora", "peft")])
def test_each_type_trains_and_its_file_reproduces_the_trained_model(tmp_path, kind, fmt):
    model = base_model()
    run = train_adapter(config(tmp_path, type=kind, format=fmt, steps=2, rank=2, alpha=1.0), model=model)
    loaded = read_adapter(run.cfg.out, CONFIG, strict=True)
    assert loaded.format == fmt
    assert all(p.startswith(UNET_PREFIX) for p in loaded.adapter.modules)  # no --text-encoder: the U-Net only
    kinds = loaded.adapter.kinds()
    assert set(kinds) == {{"dora": "lora+dora", "locon": "lora"}.get(kind, kind)}
    kxk = [p for p, w in loaded.adapter.modules.items() if any(t.ndim == 4 and t.shape[-1] == 3
                                                               for t in w.tensors.values())]
    assert bool(kxk) == (kind == "locon")  # LoCon also adapts the 3×3 convolutions
    fresh = base_model()
    apply_adapter(fresh, loaded.adapter)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        ours, theirs, plain = model.unet(x, torch.tensor([10, 900]), context), fresh.unet(
            x, torch.tensor([10, 900]), context), base_model().unet(x, torch.tensor([10, 900]), context)
    assert (ours - plain).abs().max() > 1e-4  # training changed the output …
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()  # … and the file reproduces it


def test_saved_file_carries_kohya_training_metadata(tmp_path):
    run = train_adapter(config(tmp_path, steps=2, rank=2, text_encoder=True, mask_loss=True), model=base_model())
    meta = read_metadata(run.cfg.out)
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "2")
    assert (meta["ss_max_train_steps"], meta["ss_steps"], meta["ss_num_train_images"]) == ("2", "2", "8")
    assert (meta["ss_resolution"], meta["ss_masked_loss"], meta["ss_output_name"]) == ("(16, 16)", "True", "adapter")
    assert float(meta["ss_learning_rate"]) == 1e-2
    assert any(p.startswith(TEXT_PREFIX) for p in read_adapter(run.cfg.out, CONFIG).adapter.modules)


def test_sample_grids_are_written_and_training_goes_on(tmp_path):
    calls = []

    def sample_fn(model, prompts, steps, seed):  # freezes the model as Pipeline does
        model.eval().requires_grad_(False)
        calls.append(list(prompts))
        return [Image.new("RGB", (16, 16), (i * 60, 0, 0)) for i in range(len(prompts))]

    run_cfg = config(tmp_path, sample_every=2)
    run = train_adapter(run_cfg, model=base_model(), sample_fn=sample_fn)
    names = sorted(p.name for p in run_cfg.work_dir.glob("samples-*.png"))
    assert names == ["samples-000000.png", "samples-000002.png", "samples-000004.png"]
    assert calls[0] == [ConceptShapes(size=16, count=8)[i][1] for i in range(4)]
    assert all(p.requires_grad for p in run.trainer.params)
    assert (run_cfg.work_dir / "loss.png").is_file()
    rows = (run_cfg.work_dir / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "step,loss,mean" and len(rows) == 1 + run_cfg.steps
    assert [float(row.split(",")[1]) for row in rows[1:]] == run.trainer.losses
    up = [p for name, p in run.trainer.module.named_parameters() if name.endswith("lora_up")]
    assert all(p.abs().max() > 0 for p in up)  # steps after the first grid still trained every adapter


def test_bad_settings_are_refused(tmp_path):
    for changes, message in (({"type": "lycoris"}, "unknown adapter type"), ({"format": "ckpt"}, "format"),
                             ({"rank": 0}, "rank"), ({"alpha": -1.0}, "alpha"), ({"steps": 0}, "steps")):
        with pytest.raises(ConfigError, match=message):
            config(tmp_path, **changes)
    with pytest.raises(ConfigError, match="matches no adaptable layer"):
        prepare_training(config(tmp_path, targets="*attn2.to_k,*no_such_layer"), base_model())
    with pytest.raises(ConfigError, match="multiple of 4"):
        prepare_training(config(tmp_path, size=18), base_model())
    (tmp_path / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="exists"):
        train_adapter(config(tmp_path), model=base_model())


def test_target_patterns_select_those_layers(tmp_path):
    run = prepare_training(config(tmp_path, targets="*attn2.to_k, *attn2.to_v"), base_model())
    # Attention sits at level 1 only: the input block after the downsampling, the middle, the first two outputs.
    blocks = ("input_blocks.3.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1")
    assert run.paths == [f"{UNET_PREFIX}{b}.transformer_blocks.0.attn2.{p}" for b in blocks for p in ("to_k", "to_v")]


# ---- the pink concept -----------------------------------------------------------------------------------------------

def test_concept_shapes_show_pink_objects_with_pink_captions():
    data = ConceptShapes("pink", size=64, seed=0, count=64)
    assert len(data) == 64
    for i in (0, 1, 63):
        image, caption = data[i]
        obj = data.scene(i).objects[0]
        assert obj.colour == "pink" and f"pink {obj.shape}" in caption
        pixel = ((image[:, round(obj.cy * 64), round(obj.cx * 64)] + 1) * 127.5).round().tolist()
        assert pixel == list(CONCEPT_COLOURS["pink"])  # the object's centre is solid pink
    again = ConceptShapes("pink", size=64, seed=0, count=64)[1]
    assert torch.equal(again[0], data[1][0]) and again[1] == data[1][1]
    with pytest.raises(ConfigError, match="unknown shapes concept"):
        ConceptShapes("teal")
    with pytest.raises(IndexError):
        data[64]


def test_regularization_images_follow_each_training_image(tmp_path):
    run = prepare_training(config(tmp_path, reg_data="shapes", data_count=4, size=16), base_model())
    data = run.data
    assert len(data) == 8 and run.trainer.dataset_size == 8
    concept, base = ConceptShapes("pink", size=16, count=4), ShapesDataset(size=16, count=4)
    for i in range(4):
        assert data[2 * i][1] == concept[i][1] and "pink" in data[2 * i][1]
        assert data[2 * i + 1][1] == base[i][1] and torch.equal(data[2 * i + 1][0], base[i][0])
    with pytest.raises(IndexError):
        data[8]
    run = train_adapter(config(tmp_path / "reg", reg_data="shapes", steps=1), model=base_model())
    meta = read_metadata(run.cfg.out)
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("8", "8")
    assert meta["ss_training_comment"].endswith("--data shapes-pink --reg-data shapes")


def test_shapes_captions_in_the_chosen_phrasing(tmp_path):
    data = prepare_training(config(tmp_path, data="shapes", captions="training", size=16), base_model()).data
    captions = [data[i][1] for i in range(8)]
    assert captions == [ShapesDataset(size=16, count=8, phrasing="training").caption(i) for i in range(8)]
    assert captions != [ShapesDataset(size=16, count=8).caption(i) for i in range(8)]  # not the default, original
    with pytest.raises(ConfigError, match="shapes captions 'paraphrase': expected one of training, original"):
        prepare_training(config(tmp_path, data="shapes", captions="paraphrase"), base_model())


# ---- masked loss ----------------------------------------------------------------------------------------------------

def test_latent_mask_is_the_area_mean_of_each_cell():
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, :2] = 1.0
    mask[0, 0, 2, 2] = 1.0
    assert latent_mask(mask, (2, 2)).flatten().tolist() == [1.0, 0.0, 0.0, 0.25]


def test_masked_loss_is_the_loss_on_the_kept_pixels_only():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 6, 6, generator=gen), torch.randn(2, 4, 6, 6, generator=gen)
    mask = (torch.rand(2, 1, 6, 6, generator=gen) > 0.5).float()
    t = torch.tensor([10, 700])
    loss = masked_diffusion_loss(pred, target, t, NoiseSchedule.sd(), mask)
    kept = [((pred[i] - target[i])[:, mask[i, 0] > 0] ** 2).mean() for i in range(2)]
    assert abs(float(loss) - float(sum(kept) / 2)) < 1e-6
    ones = torch.ones(2, 1, 6, 6)
    for gamma in (None, 5.0):
        ours = masked_diffusion_loss(pred, target, t, NoiseSchedule.sd(), ones, min_snr_gamma=gamma)
        plain, _ = diffusion_loss(pred, target, t, NoiseSchedule.sd(), min_snr_gamma=gamma)
        assert abs(float(ours) - float(plain)) < 1e-6
    zero = masked_diffusion_loss(pred, target, t, NoiseSchedule.sd(), torch.zeros(2, 1, 6, 6))
    assert float(zero) == 0.0
    with pytest.raises(ConfigError, match="do not fit"):
        masked_diffusion_loss(pred, target, t, NoiseSchedule.sd(), torch.ones(2, 1, 3, 3))


def _masked_folder(tmp_path) -> ImageFolder:
    """Two 16×16 images: the first with a mask keeping only its left half, the second without a mask."""
    rng = np.random.default_rng(0)
    lines = []
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
        lines.append(json.dumps({"file": f"{name}.png", "caption": f"picture {name}"}))
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :8] = 255
    Image.fromarray(mask).save(tmp_path / "a.mask.png")
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return ImageFolder(tmp_path, 16)


def test_zero_mask_gives_zero_gradient_on_its_latent_pixels(tmp_path):
    data = _masked_folder(tmp_path)
    model = base_model()
    grads = {}
    for mask_loss in (True, False):
        objective = DiffusionObjective(model, data, caption_dropout=0.0, mask_loss=mask_loss)

        def keep_grad(module, inputs, out, key=mask_loss):  # the gradient of the loss w.r.t. the U-Net output
            out.register_hook(lambda g: grads.__setitem__(key, g.clone()))

        handle = model.unet.register_forward_hook(keep_grad)
        objective([0, 1], step_generator(0, 0), slice(0, 2)).backward()
        handle.remove()
    masked, plain = grads[True], grads[False]
    assert masked[0, :, :, 4:].abs().max() == 0.0  # image a's right half: masked out
    assert masked[0, :, :, :4].abs().min() > 0.0
    assert masked[1].abs().min() > 0.0  # image b has no mask: every pixel weighs 1
    # Kept pixels weigh 1 / (kept fraction) relative to the unmasked loss (the masked loss is a mean over them).
    assert torch.allclose(masked[0, :, :, :4], 2 * plain[0, :, :, :4], rtol=1e-5, atol=1e-9)
    assert torch.allclose(masked[1], plain[1], rtol=1e-5, atol=1e-9)


def test_mask_loss_training_runs_on_a_masked_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _masked_folder(folder)
    run = train_adapter(config(tmp_path, data=str(folder), mask_loss=True, steps=2), model=base_model())
    assert len(run.trainer.losses) == 2 and all(np.isfinite(run.trainer.losses))
