"""The progress bar: ``\\r`` redraws on a terminal, a line per tenth elsewhere, and only measured speeds."""

import io
import re
from types import SimpleNamespace

from nijimi.ui import progress
from nijimi.ui.progress import ProgressBar, TrainingProgress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_file_gets_one_line_per_tenth_and_the_last_state() -> None:
    stream = io.StringIO()
    bar = ProgressBar(100, label="gen", stream=stream)
    for i in range(1, 58):
        bar.update(i)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [int(re.search(r"(\d+)/100", line)[1]) for line in lines] == [1, 10, 20, 30, 40, 50, 57]


def test_file_final_line_is_written_once() -> None:
    stream = io.StringIO()
    bar = ProgressBar(3, stream=stream)
    for i in range(1, 4):
        bar.update(i)
    bar.close()
    assert [line.split("|")[-1].split(" [")[0] for line in stream.getvalue().splitlines()] == [" 1/3", " 2/3", " 3/3"]


def test_terminal_redraws_with_carriage_returns() -> None:
    stream = FakeTerminal()
    bar = ProgressBar(4, label="gen", stream=stream)
    for i in range(1, 5):
        bar.update(i)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.count("\n") == 1 and text.endswith("\n")
    assert [part.split("| ")[1].split(" ")[0] for part in text.split("\r")[1:]] == ["1/4", "2/4", "3/4", "4/4"]


def test_first_rate_shown_is_measured(monkeypatch) -> None:
    clock = iter([10.0, 10.0, 12.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    bar = ProgressBar(3, stream=stream)
    bar.update(1, loss=0.5)
    bar.update(2)
    first, second = stream.getvalue().splitlines()
    assert first.endswith("1/3 [loss 0.5000]")
    assert second.endswith("2/3 [0.50 it/s, ETA 0:02]")


def test_training_progress_rates_the_first_step_by_its_duration(monkeypatch) -> None:
    monkeypatch.setattr(progress.time, "perf_counter", lambda: 100.0)
    stream = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", stream)
    trainer = SimpleNamespace(cfg=SimpleNamespace(steps=10), step=5)
    with TrainingProgress() as on_step:
        on_step("unet", trainer, 0.25, 4.0)
    assert stream.getvalue() == "unet  50% |████████████            | 5/10 [0.25 it/s, ETA 0:20, loss 0.2500]\n"
