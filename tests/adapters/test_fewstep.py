"""Few-step adapters told apart by their published names, folder and metadata, and ``nijimi generate``'s note on
stderr when the run's sampler is not the one their authors use."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nijimi.adapters.fewstep import FewStep, few_step_adapter
from nijimi.cli import main
from nijimi.diffusion.choice import parse_sampler
from nijimi.embedded import ADAPTERS
from nijimi.io.imagemeta import read_image_metadata
from nijimi.io.safetensors import read_metadata
from nijimi.pipelines.adapters import LoraRequest, few_step_adapters, few_step_notes
from nijimi.pipelines.shortcuts import FAST, fast_settings

LCM = FewStep("LCM-LoRA", (("sampler", "lcm"), ("steps", 4), ("guidance", 1.0)))
TCD = FewStep("TCD-LoRA", (("sampler", "tcd"), ("steps", 4), ("eta", 0.3), ("guidance", 1.0)))
CFG = "Hyper-SD CFG-preserving LoRA"


@pytest.mark.parametrize(("name", "expected"), [
    ("Hyper-SD15-1step-lora.safetensors",
     FewStep("Hyper-SD one-step LoRA", (("sampler", "tcd"), ("eta", 1.0), ("guidance", 1.0)))),
    ("Hyper-SD15-2steps-lora.safetensors",
     FewStep("Hyper-SD LoRA", (("sampler", "ddim-trailing"), ("steps", 2), ("guidance", 1.0)))),
    ("Hyper-SD15-8steps-CFG-lora.safetensors",
     FewStep(CFG, (("sampler", "ddim-trailing"), ("steps", 8), ("guidance", 6.0)), " (guidance 5 to 8)")),
    ("Hyper-SD15-12steps-CFG-lora.safetensors",
     FewStep(CFG, (("sampler", "ddim-trailing"), ("steps", 12), ("guidance", 6.0)), " (guidance 5 to 8)")),
    ("hypersd_lora.safetensors", FewStep("Hyper-SD LoRA", (("sampler", "ddim-trailing"), ("guidance", 1.0)))),
    ("lcm-lora-sdv1-5/pytorch_lora_weights.safetensors", LCM),
    ("TCD-SD15-LoRA/pytorch_lora_weights.safetensors", TCD),
    ("lcm_lora_sd15.safetensors", LCM),
    ("TCD-SD15-LoRA.safetensors", TCD),
    ("lcm.safetensors", LCM),
    ("sd15/pytorch_lora_weights.safetensors", None),
    ("alcmist-tcdx.safetensors", None),
    ("ink.safetensors", None),
])
def test_published_names(tmp_path, name, expected):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(1)}, path)
    assert few_step_adapter(path) == expected


def test_kohya_and_modelspec_titles_name_them(tmp_path):
    save_file({"w": torch.zeros(1)}, tmp_path / "a.safetensors", {"ss_output_name": "lcm_lora_anime"})
    save_file({"w": torch.zeros(1)}, tmp_path / "b.safetensors", {"modelspec.title": "TCD SD15 LoRA"})
    (tmp_path / "c.safetensors").write_bytes(b"not a safetensors file")
    assert few_step_adapter(tmp_path / "a.safetensors") == LCM
    assert few_step_adapter(tmp_path / "b.safetensors") == TCD
    assert few_step_adapter(tmp_path / "c.safetensors") is None


def test_notes_only_when_the_sampler_is_not_the_authors(tmp_path):
    (tmp_path / "loras").mkdir()
    save_file({"w": torch.zeros(1)}, tmp_path / "loras" / "Hyper-SD15-4steps-lora.safetensors")
    save_file({"w": torch.zeros(1)}, tmp_path / "lcm.safetensors")
    loras = [LoraRequest(tmp_path / "lcm.safetensors")]
    prompt = "a cat <lora:Hyper-SD15-4steps-lora:1> <lora:missing:1>"
    found = few_step_adapters(loras, prompt, tmp_path / "loras")
    notes = few_step_notes(found, parse_sampler("euler"))
    assert notes == [
        "lcm.safetensors looks like a LCM-LoRA; its authors sample it with --sampler lcm --steps 4 --guidance 1 "
        "(this run: --sampler euler)",
        "Hyper-SD15-4steps-lora.safetensors looks like a Hyper-SD LoRA; its authors sample it with --sampler "
        "ddim-trailing --steps 4 --guidance 1 (this run: --sampler euler)"]
    assert few_step_notes(few_step_adapters(loras, "", None), None)[0].endswith("(this run: the default sampler)")
    assert few_step_notes(few_step_adapters(loras, "", None), parse_sampler("LCM")) == []
    assert len(few_step_notes(found, parse_sampler("ddim-trailing"))) == 1


def test_generate_notes_it_on_stderr(capsys, tmp_path):
    shutil.copy(ADAPTERS / "pink.safetensors", tmp_path / "lcm-lora-sdv1-5.safetensors")
    base = ["generate", "a red circle", "--lora", str(tmp_path / "lcm-lora-sdv1-5.safetensors"), "--steps", "1",
            "--seed", "0", "--quiet"]
    assert main([*base, "--sampler", "euler", "--out", str(tmp_path / "a.png")]) == 0
    assert capsys.readouterr().err == (
        "note: lcm-lora-sdv1-5.safetensors looks like a LCM-LoRA; its authors sample it with --sampler lcm --steps 4 "
        "--guidance 1 (this run: --sampler euler)\n")
    assert main([*base, "--sampler", "lcm", "--out", str(tmp_path / "b.png")]) == 0
    assert capsys.readouterr().err == ""


def test_the_shipped_lcm_lora_is_found_by_name_and_its_sampler_suggested(capsys, tmp_path):
    """``--lora lcm`` is the embedded model's LCM-LoRA (nijimi/embedded/adapters/lcm.safetensors, made by
    ``train-adapter --type lcm``); with another sampler, generate suggests LCM's recipe."""
    assert few_step_adapter(ADAPTERS / "lcm.safetensors") == LCM
    assert read_metadata(ADAPTERS / "lcm.safetensors")["nijimi_sampler"] == "lcm"
    base = ["generate", "a red circle", "--lora", "lcm", "--steps", "1", "--seed", "0", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a.png")]) == 0
    assert capsys.readouterr().err == (
        "note: lcm.safetensors looks like a LCM-LoRA; its authors sample it with --sampler lcm --steps 4 "
        "--guidance 1 (this run: the default sampler)\n")
    assert main([*base, "--sampler", "lcm", "--cfg", "1", "--out", str(tmp_path / "b.png")]) == 0
    assert capsys.readouterr().err == ""


def test_hyper_sd_cfg_flags_say_the_range():
    adapter = few_step_adapter(Path("Hyper-SD15-8steps-CFG-lora.safetensors"))
    assert adapter.flags == "--sampler ddim-trailing --steps 8 --guidance 6 (guidance 5 to 8)"


def test_fast_takes_the_adapters_recipe_else_fast(tmp_path):
    save_file({"w": torch.zeros(1)}, tmp_path / "TCD-SD15-LoRA.safetensors")
    assert fast_settings(few_step_adapters((), "a cat", None)) == FAST
    tcd = {"sampler": "tcd", "steps": 4, "eta": 0.3, "guidance": 1.0}
    loras = (LoraRequest(tmp_path / "TCD-SD15-LoRA.safetensors"),)
    assert fast_settings(few_step_adapters(loras, "a cat", None)) == tcd
    assert fast_settings(few_step_adapters((), "a cat <lora:TCD-SD15-LoRA:0.5>", tmp_path)) == tcd


def recipe(path) -> dict:
    return read_image_metadata(path)["recipe"]["request"]


def test_generate_fast_fills_what_the_flags_leave(capsys, tmp_path):
    shutil.copy(ADAPTERS / "pink.safetensors", tmp_path / "TCD-SD15-LoRA.safetensors")
    base = ["generate", "a red circle", "--fast", "--seed", "0", "--quiet", "--size", "32x32"]
    assert main([*base, "--steps", "2", "--out", str(tmp_path / "a.png")]) == 0
    assert {k: recipe(tmp_path / "a.png")[k] for k in ("steps", "deepcache", "guidance_interval")} == {
        "steps": 2, "deepcache": FAST["deepcache"], "guidance_interval": list(FAST["guidance_interval"])}
    lora = ["--lora", str(tmp_path / "TCD-SD15-LoRA.safetensors")]
    assert main([*base, *lora, "--out", str(tmp_path / "b.png")]) == 0
    assert {k: recipe(tmp_path / "b.png")[k] for k in ("steps", "deepcache", "sampler", "eta", "guidance")} == {
        "steps": 4, "deepcache": 0, "sampler": "tcd", "eta": 0.3, "guidance": 1.0}
    assert main([*base, *lora, "--sampler", "euler", "--out", str(tmp_path / "c.png")]) == 0
    assert {k: recipe(tmp_path / "c.png")[k] for k in ("steps", "sampler", "eta")} == {
        "steps": 4, "sampler": "euler", "eta": None}
    assert "looks like a TCD-LoRA" in capsys.readouterr().err
