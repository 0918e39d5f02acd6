import pytest
import torch
from helpers import run_gloo_ranks
from torch import nn

from nijimi.errors import CheckpointError, ConfigError
from nijimi.train.config import build_config
from nijimi.train.trainer import LoopConfig, Trainer, batch_indices, lr_factor, open_trainer

N = 64
X = torch.randn(N, 8, generator=torch.Generator().manual_seed(0))
W_TRUE = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
Y = X @ W_TRUE


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 3))

    def forward(self, indices, g, part):
        noise = torch.randn(len(indices), 3, generator=g) * 0.01  # drawn for the whole global batch
        idx = torch.tensor(indices)[part]
        return ((self.net(X[idx]) - (Y[idx] + noise[part])) ** 2).mean()


def make_trainer(tmp_path, steps=20, batch=8):
    torch.manual_seed(0)
    cfg = LoopConfig(steps=steps, batch_size=batch, lr=3e-2, warmup_steps=2, save_every=5, ema_decay=0.9)
    return Trainer(Regression(), N, cfg, tmp_path)


def test_loss_decreases(tmp_path):
    t = make_trainer(tmp_path, steps=100)
    t.run()
    assert sum(t.losses[-5:]) / 5 < 0.3 * sum(t.losses[:5]) / 5


def test_kill_and_resume_is_bit_identical(tmp_path):
    full = make_trainer(tmp_path / "full")
    full.run()
    part = make_trainer(tmp_path / "part")
    part.run(until=10)  # "killed" after the checkpoint at step 10
    resumed = make_trainer(tmp_path / "part")
    resumed.resume()
    assert resumed.step == 10
    resumed.run()
    assert resumed.losses == full.losses
    for a, b in zip(full.module.state_dict().values(), resumed.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for k, v in full.ema.shadow.items():
        assert torch.equal(v, resumed.ema.shadow[k])


def test_batches_cover_each_epoch_once():
    seen = [i for s in range(8) for i in batch_indices(s, 8, N, seed=3)]
    assert sorted(seen) == list(range(N))
    assert batch_indices(2, 8, N, 3) == batch_indices(2, 8, N, 3)
    assert batch_indices(0, 8, N, 3) != batch_indices(0, 8, N, 4)


def test_lr_schedule_warms_up_then_decays():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)


def test_resume_without_checkpoint_names_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        make_trainer(tmp_path).resume()


def test_config_overrides_are_typed_and_checked():
    cfg = build_config(LoopConfig, {"steps": 5, **{"lr": "0.5", "batch_size": "4"}})
    assert (cfg.steps, cfg.lr, cfg.batch_size) == (5, 0.5, 4)
    with pytest.raises(ConfigError, match="nope"):
        build_config(LoopConfig, {"nope": 1})
    with pytest.raises(ConfigError, match="steps"):
        build_config(LoopConfig, {"steps": "many"})


def _ddp_worker(rank, tmp, result_path):
    t = make_trainer(tmp, steps=6)
    t.run()
    if rank == 0:
        torch.save(t.module.state_dict(), result_path)


def test_ddp_two_ranks_equal_one_rank_with_combined_batch(tmp_path):
    result = tmp_path / "ddp.pt"
    run_gloo_ranks(_ddp_worker, 2, tmp_path, tmp_path / "ddp", result)
    single = make_trainer(tmp_path / "single", steps=6)
    single.run()
    ddp_state = torch.load(result, weights_only=True)
    for k, v in single.module.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-5, atol=1e-6)


def test_batch_not_divisible_by_world_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("nijimi.train.trainer._world", lambda: (0, 3))
    with pytest.raises(ConfigError, match="batch_size 8"):
        make_trainer(tmp_path)


def test_averaged_weights_swap_in_the_ema_and_back(tmp_path):
    t = make_trainer(tmp_path, steps=5)
    t.run()
    live = {k: v.clone() for k, v in t.module.state_dict().items()}
    assert any(not torch.equal(live[k], v) for k, v in t.ema.shadow.items())
    with t.averaged_weights() as module:
        assert not module.training
        for k, v in module.state_dict().items():
            assert torch.equal(v, t.ema.shadow[k])
        module.requires_grad_(False)
    assert t.module.training and all(p.requires_grad for p in t.params)
    for k, v in t.module.state_dict().items():
        assert torch.equal(v, live[k])


def test_run_reports_every_n_steps_and_at_the_end(tmp_path):
    seen = []
    make_trainer(tmp_path, steps=7).run(every=3, report=lambda t: seen.append(t.step))
    assert seen == [3, 6, 7]


class Wider(Regression):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.SiLU(), nn.Linear(64, 3))


def _resume_error(tmp_path, module=None) -> str:
    torch.manual_seed(0)
    cfg = LoopConfig(steps=5, batch_size=8, lr=3e-2, warmup_steps=2, save_every=5, ema_decay=0.9)
    with pytest.raises(CheckpointError) as info:
        open_trainer(module or Regression(), N, cfg, tmp_path, resume=True, other="holds another regression")
    assert len(str(info.value).splitlines()) == 1
    return str(info.value)


def test_resume_from_bad_checkpoints_is_one_line_naming_file_and_problem(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"")
    assert _resume_error(tmp_path) == f"{path}: empty file, not a training checkpoint"
    path.write_bytes(b"not a zip at all")
    assert _resume_error(tmp_path).startswith(f"{path}: cannot read training checkpoint: ")
    torch.save(torch.zeros(3), path)
    assert _resume_error(tmp_path) == (f"{path}: not a nijimi training checkpoint "
                                       "(no step, model, ema, optimizer, rng, losses)")
    torch.save({"model": {}, "step": 1}, path)
    assert _resume_error(tmp_path) == f"{path}: not a nijimi training checkpoint (no ema, optimizer, rng, losses)"
    path.unlink()
    path.mkdir()
    assert _resume_error(tmp_path) == f"{path}: training checkpoint is a folder, not a file"


def test_resume_from_another_architecture_names_the_mismatch(tmp_path):
    make_trainer(tmp_path, steps=5).run()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    message = _resume_error(tmp_path, Wider())
    assert message.startswith(f"{tmp_path / 'checkpoint.pt'} holds another regression; start without --resume or "
                              "use another work folder: 3 shape mismatches, e.g. net.0.weight: file (32, 8) vs model "
                              "(64, 8)")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
