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
