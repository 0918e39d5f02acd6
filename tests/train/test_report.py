"""Training reports: the loss curve's numbers in a CSV beside its plot."""

import csv
from pathlib import Path

import numpy as np

from nijimi.train.report import write_loss_curve


def test_metrics_csv_beside_each_loss_plot_holds_the_plotted_values(tmp_path: Path) -> None:
    losses = [1.0 / (1 + i) for i in range(120)]
    write_loss_curve(losses, tmp_path / "loss.png", "U-Net")
    write_loss_curve(losses[:3], tmp_path / "vae-loss.png", "VAE")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.csv", "vae-loss.png", "vae-metrics.csv"]
    with open(tmp_path / "metrics.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 121))
    assert [float(r["loss"]) for r in rows] == losses
    assert rows[0]["mean"] == "" and float(rows[1]["mean"]) == np.mean(losses[:2])  # the window is 120 // 50 = 2
    assert float(rows[-1]["mean"]) == np.mean(losses[-2:])
    assert (tmp_path / "vae-metrics.csv").read_text(encoding="utf-8").splitlines()[1:] == ["1,1.0,1.0", "2,0.5,0.5",
                                                                                           f"3,{1 / 3!r},{1 / 3!r}"]
