"""The training loop every stage shares: AdamW, warm-up + cosine LR, clipping, EMA, atomic checkpoints, resume, DDP.

Determinism: everything random in a step is drawn from a generator seeded by ``(seed, step)``, and the data order is
a seeded permutation per epoch, so the data position *is* the step. A resumed run therefore repeats an uninterrupted
one bit for bit on the same machine. Under ``torchrun`` each rank computes the loss on its slice of the same global
batch (the random draws are made for the whole batch on every rank), and DistributedDataParallel averages the
gradients, so K ranks make the update one rank makes with the combined batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nijimi.errors import CheckpointError, ConfigError, OutputExistsError
from nijimi.io.components import state_dict_problems
from nijimi.io.files import atomic_write, regular_file
from nijimi.train.config import check_settings
from nijimi.train.ema import EMA

CHECKPOINT = "checkpoint.pt"
"""The name of a run's checkpoint in its folder."""
_CHECKPOINT_KEYS = ("step", "model", "ema", "optimizer", "rng", "losses")
OnStep = Callable[["Trainer", float, float], None]
"""``on_step(trainer, loss, seconds)``: called after each optimiser step."""


@dataclass
class LoopConfig:
    """The loop: AdamW (``lr``, ``weight_decay``, ``betas``) with ``warmup_steps`` of linear warm-up, then cosine decay
    to ``min_lr_ratio``·lr; gradient norm clipped to ``grad_clip`` (0: off); EMA of the weights with ``ema_decay``; a
    checkpoint every ``save_every`` steps (0: never); ``seed`` fixes data order and every random draw."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    save_every: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        check_settings(self)  # the ranges of nijimi.train.config.RANGES, also for a config built in Python


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Dataset indices of global batch ``step``: epochs are seeded permutations of ``range(n)``, read in order."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return out


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class Trainer:
    """Trains the parameters of ``module`` that require grad; checkpoints to ``out_dir/checkpoint.pt``.

    ``module(indices, generator, part)`` returns the scalar loss over the samples ``indices[part]``: ``indices`` are
    the global batch's dataset indices, and random tensors are drawn for the whole global batch from ``generator``
    and then sliced with ``part``, so every rank draws the same numbers. The loss must be computed inside
    ``forward`` so DistributedDataParallel sees every trainable parameter used.
    """

    module: nn.Module
    dataset_size: int
    cfg: LoopConfig
    out_dir: Path
    step: int = 0
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.rank, self.world = _world()
        if self.cfg.batch_size % self.world:
            raise ConfigError(f"batch_size {self.cfg.batch_size} is not divisible by {self.world} processes")
        if self.dataset_size < 1:
            raise ConfigError("the training data set is empty")
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("nothing to train: no parameter requires grad")
        # foreach: one multi-tensor update; on CPU PyTorch would otherwise loop over the tensors one by one.
        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.cfg.lr, betas=tuple(self.cfg.betas), weight_decay=self.cfg.weight_decay, foreach=True
        )
        self.ema = EMA(self.module, self.cfg.ema_decay)
        self.ddp = self.module
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(self.module)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def train_step(self) -> float:
        """One optimiser step on global batch ``self.step``; returns the loss averaged over ranks."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(self.step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        indices = batch_indices(self.step, cfg.batch_size, self.dataset_size, cfg.seed)
        local = cfg.batch_size // self.world
        part = slice(self.rank * local, (self.rank + 1) * local)
        torch.manual_seed((cfg.seed * 1_000_003 + self.step) % (2**63))  # for nn.Dropout, which takes no generator
        self.module.train()
        loss = self.ddp(indices, step_generator(cfg.seed, self.step), part)
        if not torch.isfinite(loss):
            raise ConfigError(f"loss became {loss.item()} at step {self.step}; lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.ema.update(self.module)
        value = loss.detach()
        if self.world > 1:
            torch.distributed.all_reduce(value)
            value /= self.world
        self.step += 1
        self.losses.append(float(value))
        return float(value)

    def run(self, until: int | None = None, on_step: OnStep | None = None, every: int = 0,
            report: Callable[[Trainer], None] | None = None) -> None:
        """Train to step ``until`` (default ``cfg.steps``); after each step ``on_step(trainer, loss, seconds)``, and
        ``report(trainer)`` (loss curves, sample grids) every ``every`` steps and after the last one (0: never)."""
        until = self.cfg.steps if until is None else until
        while self.step < until:
            start = time.perf_counter()
            loss = self.train_step()
            if on_step is not None:
                on_step(self, loss, time.perf_counter() - start)
            if report is not None and every and (self.step % every == 0 or self.step == self.cfg.steps):
                report(self)
            if self.cfg.save_every and (self.step % self.cfg.save_every == 0 or self.step == until):
                self.save()

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[nn.Module]:
        """The module with its EMA weights, in eval mode, for the block (sampling previews); the live weights,
        their ``requires_grad`` (a pipeline freezes what it is given) and training mode come back afterwards."""
        live = {k: v.clone() for k, v in self.module.state_dict().items()}
        self.ema.copy_to(self.module)
        self.module.eval()
        try:
            yield self.module
        finally:
            self.module.load_state_dict(live)
            for p in self.params:
                p.requires_grad_(True)
            self.module.train()

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": {k: v for k, v in self.module.state_dict().items()},
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "config": {k: v for k, v in vars(self.cfg).items() if not isinstance(v, tuple)},
        }

    def save(self) -> None:
        """Write the checkpoint atomically (rank 0 only); a kill at any moment leaves the previous one intact."""
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.checkpoint_path) as f:
            torch.save(self.state_dict(), f)

    def resume(self, other: str = "holds another model") -> None:
        """Load ``checkpoint.pt`` from ``out_dir`` (model, EMA, optimizer, RNG, data position, loss history).

        A missing, special, empty or unreadable file, one that is not a training checkpoint, and one whose model
        does not fit (it ``other``: e.g. "holds a ControlNet for another base model") raise one
        :class:`CheckpointError` naming the file and the problem, before anything is changed."""
        path = regular_file(self.checkpoint_path, "training checkpoint", missing="no checkpoint to resume from")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file, not a training checkpoint")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{path}: cannot read training checkpoint: {problem}") from None
        absent = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if absent or not isinstance(state["model"], dict):
            raise CheckpointError(f"{path}: not a nijimi training checkpoint (no {', '.join(absent or ['model'])})")
        problems = state_dict_problems(state["model"], self.module.state_dict())
        if problems:
            raise CheckpointError(f"{path} {other}; start without --resume or use another work folder: "
                                  f"{'; '.join(problems)}")
        self.module.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.losses = state["losses"].tolist()


def check_fresh_start(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start afresh over the checkpoint of an earlier run in ``out_dir`` (OutputExistsError) unless it is
    continued (``resume``) or replacing it was asked for (``overwrite``)."""
    path = out_dir / CHECKPOINT
    if not (resume or overwrite) and os.path.lexists(path):
        raise OutputExistsError(f"{path} exists: continue that run with --resume, or start afresh with --overwrite "
                                "(which replaces it)")


def open_trainer(module: nn.Module, dataset_size: int, cfg: LoopConfig, out_dir: Path, resume: bool,
                 other: str = "holds another model") -> Trainer:
    """A :class:`Trainer`; with ``resume``, continued from ``out_dir/checkpoint.pt`` when it exists. A checkpoint of
    other modules or shapes is refused as one that ``other`` (e.g. "holds a ControlNet for another base model")."""
    trainer = Trainer(module, dataset_size, cfg, out_dir)
    if resume and os.path.lexists(trainer.checkpoint_path):
        try:
            trainer.resume(other)
        except (RuntimeError, KeyError, TypeError, ValueError) as e:  # EMA or optimizer state of another run
            raise CheckpointError(f"{trainer.checkpoint_path} {other}; start without --resume or use another work "
                                  f"folder: {str(e).splitlines()[0]}") from None
    return trainer
