"""``--overwrite`` is what lets a command replace its earlier output (the refusals are rows of test_bad_inputs)."""

from __future__ import annotations

from helpers import run_cli


def test_dataset_replaces_its_files_only_with_overwrite(capsys, tmp_path):
    out = tmp_path / "d"
    assert run_cli(capsys, "dataset", "shapes", "--count", "2", "--size", "16", "--out", out)[0] == 0
    (out / "captions.jsonl").write_text("edited\n")
    code, _, err = run_cli(capsys, "dataset", "shapes", "--count", "2", "--size", "16", "--out", out)
    assert code == 2 and err == f"error: {out / '00000.png'} exists; use --overwrite to replace it\n"
    assert (out / "captions.jsonl").read_text() == "edited\n"
    assert run_cli(capsys, "dataset", "shapes", "--count", "2", "--size", "16", "--out", out, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "captions.jsonl"]
    assert (out / "captions.jsonl").read_text().count('"caption"') == 2
