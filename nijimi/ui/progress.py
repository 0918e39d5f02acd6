"""A progress bar on stderr: steps, it/s, ETA and optional extra fields (loss). On a terminal one line redrawn with
``\r``; on a file or pipe one line per tenth of the work (and the last state), so logs stay readable."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``bar.update(i, loss=0.12)`` draws ``label  37% |█████     | 37/100 [2.1 it/s, ETA 0:30, loss 0.1200]``.

    Speed is measured from the first update (or :meth:`resume_at`): no it/s or ETA is shown before it is measured."""

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, width: int = 24) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.start = 0.0
        self.first: int | None = None
        self.shown = -1
        self.line = self.written = ""

    def update(self, done: int, **fields: float) -> None:
        if self.first is None:
            self.resume_at(done)
        elapsed = time.perf_counter() - self.start
        parts = [f"{k} {v:.4f}" for k, v in fields.items()]
        if done > self.first and elapsed > 0:
            eta = (self.total - done) * elapsed / (done - self.first)
            parts[:0] = [f"{(done - self.first) / elapsed:.2f} it/s", f"ETA {int(eta) // 60}:{int(eta) % 60:02d}"]
        filled = int(self.width * min(done, self.total) / self.total)
        bar = "█" * filled + " " * (self.width - filled)
        self.line = f"{self.label} {100 * done // self.total:3d}% |{bar}| {done}/{self.total}"
        self.line += f" [{', '.join(parts)}]" if parts else ""
        if self.tty:
            self._write(f"\r{self.line}")
        elif 10 * done // self.total > self.shown:
            self.shown = 10 * done // self.total
            self._write(f"{self.line}\n")
            self.written = self.line

    def resume_at(self, done: int, elapsed: float = 0.0) -> None:
        """Count speed from ``done`` on, reached ``elapsed`` seconds ago (after a resume, so it/s is not inflated by
        steps done earlier)."""
        self.first = done
        self.start = time.perf_counter() - elapsed

    def close(self) -> None:
        """End the line on a terminal; elsewhere write the last state unless it was written."""
        if self.tty and self.line:
            self._write("\n")
        elif not self.tty and self.line != self.written:
            self._write(f"{self.line}\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
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
            self.bars[label].resume_at(trainer.step - 1, seconds)
        self.bars[label].update(trainer.step, loss=loss)

    def stage(self, label: str):
        """The ``on_step(trainer, loss, seconds)`` of a one-stage run."""
        return lambda trainer, loss, seconds: self(label, trainer, loss, seconds)

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(self, *exc) -> None:
        for bar in self.bars.values():
            bar.close()
