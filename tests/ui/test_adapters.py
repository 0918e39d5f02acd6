"""``nijimi train-adapter`` and ``nijimi lora extract | resize | info`` through ``nijimi.cli.main`` on a tiny model
file: each command's happy path (files, metadata, numbers against references) and every user error as exit 2 with
one ``error:`` line and no file."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch
from helpers import TOY_F2, random_model
from PIL import Image
from safetensors.torch import load_file, save_file

from nijimi import cli
from nijimi.adapters.formats import read_adapter
from nijimi.io.checkpoint import load_model, save_single
from nijimi.io.safetensors import read_metadata
from nijimi.models.ldm import TEXT_PREFIX, UNET_PREFIX, LatentDiffusion
from nijimi.ui.adapters import add_adapter_parsers

# 16×16 images through an f=2 VAE: 8×8 latents, a 2-level U-Net; a few training steps take a fraction of a second.
CONFIG = TOY_F2
TO_K = "input_blocks.3.1.transformer_blocks.0.attn2.to_k"
FC1 = "text_model.encoder.layers.0.mlp.fc1"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(base file, tuned file): the tuned model is the base plus rank-1 changes of one U-Net and one text-encoder
    layer, so a rank ≥ 1 LoRA reproduces it exactly."""
    folder = tmp_path_factory.mktemp("models")
    model = random_model(CONFIG, 0)
    save_single(model, folder / "base.safetensors")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (model.unet.get_submodule(TO_K), model.text_encoder.get_submodule(FC1)):
            out, inp = layer.weight.shape
            layer.weight.add_(0.2 * torch.randn(out, 1, generator=gen) @ torch.randn(1, inp, generator=gen))
    save_single(model, folder / "tuned.safetensors")
    return folder / "base.safetensors", folder / "tuned.safetensors"


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


@pytest.fixture
def nijimi(monkeypatch, capsys):
    """``nijimi ARGV`` through ``cli.main`` → (exit code, stdout, stderr); the adapter commands are added to the
    parser when ``cli.build_parser`` does not have them yet."""
    build = cli.build_parser

    def with_adapters() -> argparse.ArgumentParser:
        parser = build()
        if "train-adapter" not in _subcommands(parser).choices:
            add_adapter_parsers(_subcommands(parser))
        return parser

    monkeypatch.setattr(cli, "build_parser", with_adapters)

    def run(*argv) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_user_error(result, message: str) -> None:
    code, out, err = result
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


TRAIN = ["--data", "shapes-pink", "--data-count=4", "--steps", "2", "--batch-size", "2", "--rank", "2", "--lr",
         "1e-3", "--warmup-steps=1", "--sample-every=2", "--sample-steps=2"]


def test_train_adapter_writes_the_adapter_grids_and_resumes(nijimi, models, tmp_path):
    out = tmp_path / "pink.safetensors"
    code, stdout, stderr = nijimi("train-adapter", "--base", models[0], "--out", out, "--text-encoder", *TRAIN)
    assert code == 0 and stdout.strip() == str(out)
    assert "train lora" in stderr and "2/2" in stderr  # the progress bar
    work = tmp_path / "pink-train"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint.pt", "loss.png", "metrics.csv", "samples-000000.png",
                                                      "samples-000002.png"]
    meta = read_metadata(out)
    assert (meta["ss_network_dim"], meta["ss_steps"], meta["ss_sd_model_name"]) == ("2", "2", "base.safetensors")
    modules = read_adapter(out, CONFIG, strict=True).adapter.modules
    assert {p.split(".")[0] for p in modules} == {"model", "cond_stage_model"}

    code, _, _ = nijimi("train-adapter", "--base", models[0], "--out", out, "--text-encoder", *TRAIN, "--steps", "3",
                        "--resume", "--overwrite", "--quiet")
    assert code == 0
    assert read_metadata(out)["ss_steps"] == "3"
    assert torch.load(work / "checkpoint.pt", weights_only=True)["step"] == 3


def test_train_adapter_peft_dora_without_samples(nijimi, models, tmp_path):
    out = tmp_path / "dora.safetensors"
    code, _, _ = nijimi("train-adapter", "--base", models[0], "--out", out, *TRAIN, "--type", "dora", "--format",
                        "peft", "--targets", "*attn2.to_k,*attn2.to_v", "--no-samples", "--quiet")
    assert code == 0
    loaded = read_adapter(out, CONFIG, strict=True)
    assert loaded.format == "peft" and loaded.adapter.kinds() == {"lora+dora": 8}
    assert not list((tmp_path / "dora-train").glob("samples-*.png"))


def test_train_adapter_user_errors(nijimi, models, tmp_path):
    out = tmp_path / "a.safetensors"
    base = ["train-adapter", "--base", models[0], "--out", out, "--quiet", "--no-samples"]
    assert_user_error(nijimi(*base, "--rank", "0"), "rank must be ≥ 1")
    assert_user_error(nijimi(*base, "--warmup-steps=many"), "'warmup_steps': cannot read 'many' as int")
    assert_user_error(nijimi(*base, "--data", tmp_path / "nowhere"), "does not exist")
    assert_user_error(nijimi(*base, "--data", "shapes-teal"), "unknown shapes concept 'teal'")
    assert_user_error(nijimi(*base[:2], tmp_path / "none.safetensors", *base[3:]), "no such file")
    assert not out.exists()
    out.write_bytes(b"")
    assert_user_error(nijimi(*base), "exists; use --overwrite")
    assert_user_error(nijimi(*base, "--type", "lycoris", "--overwrite"), "unknown adapter type 'lycoris'")


def test_lora_extract_reproduces_the_tuned_model(nijimi, models, tmp_path):
    out = tmp_path / "diff.safetensors"
    code, stdout, _ = nijimi("lora", "extract", "--base", models[0], "--tuned", models[1], "--rank", "2", "--out",
                             out)
    assert code == 0 and stdout.strip() == f"{out}: 2 modules (lora ×2; ranks 2 ×2)"
    adapter = read_adapter(out, CONFIG, strict=True).adapter
    base, tuned = load_model(models[0])[0], load_model(models[1])[0]
    for native in (UNET_PREFIX + TO_K, TEXT_PREFIX + FC1):
        w = base.get_submodule(native).weight.detach()
        target = tuned.get_submodule(native).weight.detach()
        rebuilt = w + adapter.modules[native].delta(w)
        assert ((rebuilt - target).abs().max() / (target - w).abs().max()).item() < 1e-5

    unet_only = tmp_path / "unet.safetensors"
    code, stdout, _ = nijimi("lora", "extract", "--base", models[0], "--tuned", models[1], "--rank", "1",
                             "--unet-only", "--format", "peft", "--out", unet_only)
    assert code == 0 and list(read_adapter(unet_only, CONFIG).adapter.modules) == [UNET_PREFIX + TO_K]


def test_lora_extract_user_errors(nijimi, models, tmp_path):
    out = tmp_path / "x.safetensors"
    extract = ["lora", "extract", "--base", models[0], "--out", out]
    assert_user_error(nijimi(*extract, "--tuned", models[0], "--rank", "2"), "does not differ")
    assert_user_error(nijimi(*extract, "--tuned", models[1], "--rank", "0"), "rank must be ≥ 1")
    assert_user_error(nijimi(*extract, "--tuned", tmp_path / "no.safetensors", "--rank", "2"), "no such file")
    other = LatentDiffusion(dataclasses.replace(CONFIG, text=dataclasses.replace(CONFIG.text, mlp_width=48)))
    save_single(other, tmp_path / "other.safetensors")
    assert_user_error(nijimi(*extract, "--tuned", tmp_path / "other.safetensors", "--rank", "2"), "mlp.fc1")
    assert not out.exists()


def test_lora_resize_is_the_truncated_svd(nijimi, models, tmp_path):
    full = tmp_path / "full.safetensors"
    assert nijimi("train-adapter", "--base", models[0], "--out", full, *TRAIN, "--rank", "4", "--alpha", "2",
                  "--steps", "3", "--lr", "1e-2", "--no-samples", "--quiet")[0] == 0
    small = tmp_path / "small.safetensors"
    code, stdout, _ = nijimi("lora", "resize", full, "--rank", "1", "--base", models[0], "--out", small)
    assert code == 0 and stdout.startswith(f"{small}: ") and "ranks 1 ×" in stdout
    before, after = read_adapter(full, CONFIG).adapter, read_adapter(small, CONFIG).adapter
    assert before.modules.keys() == after.modules.keys()
    for path, weights in before.modules.items():
        shape = (weights.tensors["lora_up"].shape[0], *weights.tensors["lora_down"].shape[1:])
        delta = weights.delta(torch.zeros(shape)).reshape(shape[0], -1).double().numpy()
        u, s, vh = np.linalg.svd(delta)
        best = s[0] * np.outer(u[:, 0], vh[0])  # Eckart–Young: the best rank-1 approximation
        resized = after.modules[path].delta(torch.zeros(shape)).reshape(shape[0], -1).double().numpy()
        assert np.abs(resized - best).max() <= 1e-5 * np.abs(best).max()
        assert after.modules[path].effective_scale == weights.effective_scale == 0.5
    assert read_metadata(small)["ss_network_dim"] == "1"


def test_lora_resize_and_info_user_errors(nijimi, models, tmp_path):
    lora = tmp_path / "diff.safetensors"
    nijimi("lora", "extract", "--base", models[0], "--tuned", models[1], "--rank", "2", "--out", lora)
    out = tmp_path / "small.safetensors"
    assert_user_error(nijimi("lora", "resize", lora, "--rank", "1", "--out", out), "--base MODEL")
    assert_user_error(nijimi("lora", "resize", lora, "--rank", "0", "--base", models[0], "--out", out),
                      "resize rank must be ≥ 1")
    assert_user_error(nijimi("lora", "resize", tmp_path / "none.safetensors", "--rank", "1", "--base", models[0],
                             "--out", out), "none.safetensors")
    assert_user_error(nijimi("lora", "resize", lora, "--rank", "1", "--base", models[0], "--out", lora), "exists")
    assert not out.exists()
    assert_user_error(nijimi("lora", "info", tmp_path / "none.safetensors"), "none.safetensors")
    assert_user_error(nijimi("lora", "info", models[0]), "not a LoRA/LyCORIS/peft adapter")


def test_lora_info_describes_the_file(nijimi, models, tmp_path):
    lora = tmp_path / "diff.safetensors"
    nijimi("lora", "extract", "--base", models[0], "--tuned", models[1], "--rank", "2", "--out", lora)
    code, stdout, _ = nijimi("lora", "info", lora, "--base", models[0])
    assert code == 0
    lines = stdout.splitlines()
    assert lines[1:6] == ["format: kohya (networks.lora)", "modules: 2 (U-Net ×1, text encoder ×1)",
                          "kinds: lora ×2", "ranks: 2 ×2", "alphas: 2.0 ×2"]
    assert "fits the model: 2 modules, 0 keys unmatched" in lines
    assert "  ss_network_dim: 2" in lines


def test_eval_shapes_measures_a_concept_through_an_adapter(nijimi, models, tmp_path, monkeypatch):
    """``eval shapes --concept pink --lora FILE``: pink captions, pink in the detector's palette, the adapter applied
    (the tuned model's images, not the base's); ``--grid`` writes the images it scored."""
    from nijimi.ui import eval as eval_ui

    lora = tmp_path / "delta.safetensors"
    assert nijimi("lora", "extract", "--base", models[0], "--tuned", models[1], "--rank", "1", "--out", lora)[0] == 0
    runs, evaluate = [], eval_ui.evaluate

    def recording(generate_fn, captions, seeds, palette):
        runs.append((captions, palette, generate_fn(captions[:1], seeds[:1])[0]))
        return evaluate(generate_fn, captions, seeds=seeds, palette=palette)

    monkeypatch.setattr(eval_ui, "evaluate", recording)
    common = ["eval", "shapes", "--n", "2", "--steps", "2", "--quiet"]
    grid = tmp_path / "grid.png"
    for model, extra in ((models[0], ["--lora", lora, "--grid", grid]), (models[1], []), (models[0], [])):
        code, stdout, _ = nijimi(*common, "--model", model, "--concept", "pink", *extra)
        assert code == 0 and stdout.splitlines()[0].split()[:2] == ["prompts", "n"]
    (captions, palette, with_lora), (_, _, tuned), (_, plain_palette, base) = runs
    assert all(" pink " in c for c in captions) and palette["pink"] == (240, 96, 176)
    assert plain_palette == palette
    assert np.abs(np.asarray(with_lora, float) - np.asarray(tuned, float)).max() <= 1
    assert np.abs(np.asarray(with_lora, float) - np.asarray(base, float)).max() > 1
    sheet = Image.open(grid)
    assert sheet.size == (3 * with_lora.width, with_lora.height)  # the recorded first image and both scored ones
    assert np.array_equal(np.asarray(sheet.convert("RGB").crop((0, 0, *with_lora.size))), np.asarray(with_lora))

    monkeypatch.setattr(eval_ui, "evaluate", lambda *a, **k: pytest.fail("no evaluation after a user error"))
    assert_user_error(nijimi(*common, "--model", models[0], "--lora", tmp_path / "none.safetensors"),
                      "none.safetensors")


def test_generate_names_the_keys_it_leaves_out_and_strict_refuses(nijimi, models, tmp_path):
    """A LoRA file with a module the model lacks (an SDXL second-text-encoder layer): ``generate`` applies the rest —
    the same image as the file without it — and names the left-out keys on stderr; ``--strict`` refuses the file.
    A file none of whose keys fits is refused either way."""
    clean, mixed, alien = (tmp_path / f"{name}.safetensors" for name in ("clean", "mixed", "alien"))
    assert nijimi("lora", "extract", "--base", models[0], "--tuned", models[1], "--rank", "1", "--out", clean)[0] == 0
    stray = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(1, 1280),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(5120, 1),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}
    save_file({**load_file(clean), **stray}, mixed)
    save_file(stray, alien)
    generate = ["generate", "a red circle", "--model", models[0], "--steps", "2", "--seed", "1", "--quiet"]

    code, out, err = nijimi(*generate, "--lora", mixed, "--out", tmp_path / "mixed.png")
    assert code == 0 and out.strip() == str(tmp_path / "mixed.png")
    lines = err.splitlines()
    assert lines[0] == (f"warning: {mixed}: 3 keys or modules fit no layer of this model and were left out "
                        "(--strict refuses such a file):")
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == sorted(stray)
    assert nijimi(*generate, "--lora", clean, "--out", tmp_path / "clean.png")[0] == 0
    drawn = [np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("mixed", "clean")]
    assert np.array_equal(*drawn)

    refused = tmp_path / "refused.png"
    assert_user_error(nijimi(*generate, "--lora", mixed, "--strict", "--out", refused),
                      f"{mixed}: 3 keys do not fit the model (lora_te2_text_model_encoder_layers_0_mlp_fc1.")
    assert_user_error(nijimi(*generate, "--lora", alien, "--out", refused), f"{alien}: no tensor fits the model")
    assert not refused.exists()
