"""A one-line progress bar on stderr: steps, it/s, ETA and optional extra fields (loss)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``bar.update(i, loss=0.12)`` redraws ``label  37% |█████     | 37/100 [2.1 it/s, ETA 0:30, loss 0.1200]``."""

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, width: int = 24) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.first = 0

    def update(self, done: int, **fields: float) -> None:
        elapsed = time.perf_counter() - self.start
        rate = (done - self.first) / elapsed if elapsed > 0 and done > self.first else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        filled = int(self.width * done / self.total)
        bar = "█" * filled + " " * (self.width - filled)
        extra = "".join(f", {k} {v:.4f}" for k, v in fields.items())
        line = (
            f"\r{self.label} {100 * done // self.total:3d}% |{bar}| {done}/{self.total} "
            f"[{rate:.2f} it/s, ETA {int(eta) // 60}:{int(eta) % 60:02d}{extra}]"
        )
        self.stream.write(line)
        self.stream.flush()

    def resume_at(self, done: int) -> None:
        """Count speed from ``done`` on (after a resume), so it/s is not inflated by steps done earlier."""
        self.first = done
        self.start = time.perf_counter()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class TrainingProgress:
    """A training run's ``on_step`` callback: one bar per stage label, each counting speed from the first step it
    sees (so a resumed run shows its own it/s); ``quiet`` draws nothing. Use as a context manager to end the lines."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bars: dict[str, ProgressBar] = {}

    def __call__(self, label: str, trainer, loss: float, seconds: float) -> None:
        if self.quiet:
            return
        if label not in self.bars:
            self.bars[label] = ProgressBar(trainer.cfg.steps, label=label)
            self.bars[label].resume_at(trainer.step)
        self.bars[label].update(trainer.step, loss=loss)

    def stage(self, label: str):
        """The ``on_step(trainer, loss, seconds)`` of a one-stage run."""
        return lambda trainer, loss, seconds: self(label, trainer, loss, seconds)

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(self, *exc) -> None:
        for bar in self.bars.values():
            bar.close()
