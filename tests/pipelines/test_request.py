"""The generation request: checked once when made, recorded by ``to_dict`` and read back by ``from_dict`` to an equal
request for every field, and the source of ``nijimi generate``'s flags."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from nijimi.cli import build_parser, request_from_args
from nijimi.diffusion.choice import SamplerChoice
from nijimi.errors import ConfigError, ImageError, SamplerError
from nijimi.pipelines.adapters import LoraRequest
from nijimi.pipelines.control_maps import ControlSpec
from nijimi.pipelines.request import GenerationRequest


@pytest.fixture
def full(tmp_path) -> GenerationRequest:
    """A request with every field away from its default."""
    (tmp_path / "ink.safetensors").write_bytes(b"")
    return GenerationRequest(
        prompt="a red circle <lora:ink:0.5>", negative_prompt="blurry", steps=12, sampler="DDIM Karras", eta=0.3,
        guidance=4.5, guidance_rescale=0.7, seed=2**64 - 3, width=96, height=64, batch=2,
        variation_seed=2**64 - 5, variation_strength=0.25, seed_resize=(48, 80),
        guidance_interval=(0.5, 6.0), deepcache=3,
        init_image=tmp_path / "init.png", strength=0.4, mask=tmp_path / "mask.png",
        hires_scale=1.5, hires_size=(128, 0), hires_steps=5, hires_denoise=0.5, hires_upscaler="lanczos",
        hires_sampler="Euler", hires_prompt="a red disc", hires_negative_prompt="grey",
        clip_skip=2, vae_tile=32, vae=tmp_path / "vae",
        attention_slice=7, decoder=f"tiny:{tmp_path / 'taesd'}", loras=[(tmp_path / "ink.safetensors", 0.8, 0.6)],
        lora_dir=str(tmp_path), strict_loras=True, embeddings_dir=tmp_path / "ti", embeddings=[tmp_path / "glow.pt"],
        control=[ControlSpec(str(tmp_path / "cn.safetensors"), str(tmp_path / "map.png"), 0.9, "canny", 0.1, 0.8,
                             50.0, 150.0, "crop", True)])


def test_every_field_round_trips_through_json(full):
    defaults = GenerationRequest(seed=0)
    for field in dataclasses.fields(GenerationRequest):
        assert getattr(full, field.name) != getattr(defaults, field.name), field.name
    recorded = json.loads(json.dumps(full.to_dict()))
    assert set(recorded) == {f.name for f in dataclasses.fields(GenerationRequest)}
    assert (recorded["sampler"], recorded["schedule"]) == ("ddim", "karras") and recorded["loras"][0][1:] == [0.8, 0.6]
    assert GenerationRequest.from_dict(recorded) == full


def test_values_are_normalised_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "ink.safetensors").write_bytes(b"")
    r = GenerationRequest("x", sampler="Euler a", init_image="in.png", loras=[("ink", 1.0, 1.0)],
                          lora_dir="loras", control=[ControlSpec("embedded", "map.png")], decoder="tiny:taesd", vae="v")
    assert r.sampler.name == "euler-a" and r.sampler.display == "Euler a"
    assert r.init_image == str(tmp_path / "in.png") and r.decoder == f"tiny:{tmp_path / 'taesd'}"
    assert r.vae == str(tmp_path / "v")
    assert r.loras == (LoraRequest((tmp_path / "loras" / "ink.safetensors").resolve(), 1.0, 1.0),)
    assert Path(r.control[0].model).name == "controlnet-mask.safetensors" and Path(r.control[0].image).is_absolute()
    assert 0 <= GenerationRequest("x").seed < 2**32  # drawn once, here


@pytest.mark.parametrize(("changes", "error", "message"), [
    ({"steps": 0}, ConfigError, "steps 0 must be an integer from 1 to 1000"),
    ({"steps": 2.5}, ConfigError, "steps 2.5"),
    ({"guidance": float("inf")}, ConfigError, "guidance inf must be a finite number"),
    ({"guidance_rescale": 1.5}, ConfigError, "guidance rescale 1.5"),
    ({"seed": 2**64}, ConfigError, "seed"),
    ({"seed": 2**64 - 2, "batch": 3}, ConfigError, "seed"),
    ({"width": 60}, ConfigError, "width 60 must be a positive multiple of 8 pixels"),
    ({"eta": 0.5, "sampler": "dpm++2m"}, ConfigError, "eta applies to ddim, euler-a, tcd and the ancestral and "
     "SDE samplers, not dpm++2m"),
    ({"schedule": "cubic"}, SamplerError, "unknown schedule 'cubic'; known: automatic, uniform, karras"),
    ({"sampler": "DPM++ 2M Karras", "schedule": "beta"}, SamplerError,
     "sampler 'DPM++ 2M Karras' names the schedule 'karras', but the schedule is 'beta'"),
    ({"sampler": "warp"}, SamplerError, "unknown sampler 'warp'"),
    ({"mask": "m.png"}, ImageError, "a mask needs an init image"),
    ({"negative_prompt": 3}, ConfigError, "negative prompt 3 must be text"),
    ({"negative_prompt": "a \udcff"}, ConfigError, "negative prompt holds '\\udcff' at character 2, a lone surrogate"),
    ({"loras": [("nowhere", 1.0, 1.0)], "lora_dir": "/no/such/dir"}, ConfigError, "LoRA folder /no/such/dir"),
    ({"loras": [(".", float("nan"), 1.0)]}, ConfigError, "LoRA .: weights must be finite numbers, got nan, 1.0"),
    ({"decoder": "tiny:"}, ConfigError, "decoder 'tiny:' must be vae, tiny or tiny:PATH"),
    ({"decoder": "taesd"}, ConfigError, "decoder 'taesd' must be vae, tiny or tiny:PATH"),
])
def test_bad_values_are_refused_by_name(changes, error, message):
    with pytest.raises(error, match=re.escape(message)):
        GenerationRequest("x", **changes)


def test_from_dict_refuses_unknown_keys_and_wrong_kinds():
    with pytest.raises(ConfigError, match=r"img.png: recipe: not a generation request \(unknown keys \['cfg'\]\)"):
        GenerationRequest.from_dict({"prompt": "x", "cfg": 7}, "img.png: recipe")
    with pytest.raises(ConfigError, match=r"img.png: recipe: loras \[\['a.safetensors'\]\] must be a list of \[file, "):
        GenerationRequest.from_dict({"loras": [["a.safetensors"]]}, "img.png: recipe")
    with pytest.raises(ConfigError, match=r"img.png: recipe: control scale 'x' must be a finite number"):
        GenerationRequest.from_dict({"control": [{"model": "m", "image": "i.png", "scale": "x"}]}, "img.png: recipe")
    with pytest.raises(ConfigError, match=r"img.png: recipe: steps '2' must be an integer"):
        GenerationRequest.from_dict({"steps": "2"}, "img.png: recipe")
    with pytest.raises(ConfigError, match="in-memory"):
        GenerationRequest("x", init_image=Image.new("RGB", (8, 8))).to_dict()


def test_generate_flags_come_from_the_fields(full):
    """``nijimi generate`` parses to the same request, flag by flag, and has one flag per recorded field."""
    spec = full.control[0]
    argv = ["generate", full.prompt, "-n", "blurry", "--steps", "12", "--sampler", "DDIM Karras", "--eta", "0.3",
            "--cfg", "4.5", "--guidance-rescale", "0.7", "--guidance-interval", "0.5,6", "--deepcache", "3",
            "--seed", str(full.seed), "--size", "96x64", "--batch", "2",
            "--variation-seed", str(full.variation_seed), "--variation-strength", "0.25", "--seed-resize", "48x80",
            "--init", full.init_image, "--strength", "0.4", "--mask", full.mask, "--clip-skip", "2",
            "--hires", "1.5", "--hires-size", "128x0", "--hires-steps", "5", "--hires-denoise", "0.5",
            "--hires-upscaler", "Lanczos", "--hires-sampler", "euler", "--hires-prompt", "a red disc",
            "--hires-negative", "grey",
            "--vae-tile", "32", "--vae", full.vae, "--decoder", full.decoder, "--attention-slice", "7", "--lora",
            f"{full.loras[0].path}:0.8:0.6", "--lora-dir", full.lora_dir, "--strict", "--embeddings-dir",
            full.embeddings_dir, "--embedding", full.embeddings[0], "--control",
            f"model={spec.model},image={spec.image},scale=0.9,pre=canny,start=0.1,end=0.8,low=50,high=150,"
            "resize=crop,guess=true"]
    assert request_from_args(build_parser().parse_args(argv)) == full
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    for flag in ("--guidance", "--eta", "--size", "--lora", "--control", "--strict", "--model-config", "--decoder",
                 "--variation-seed", "--seed-resize", "--vae ", "--hires ", "--hires-upscaler",
                 "--embeddings-dir", "--embedding "):
        assert flag in help_text


def test_sampler_and_schedule_are_two_choices_and_old_recipes_keep_their_meaning():
    """``schedule`` holds the resolved schedule; a recipe written before schedules existed named a bare sampler for
    the model's own timesteps, and a combined name for that spacing."""
    assert GenerationRequest("x", sampler="dpm++2m").schedule == "karras"  # A1111's Automatic
    assert GenerationRequest("x", sampler="Euler a", schedule="SGM Uniform").sampler == SamplerChoice("euler-a",
                                                                                                       "sgm_uniform")
    assert GenerationRequest("x", schedule="Beta").schedule == "beta" and GenerationRequest("x").sampler is None
    changed = GenerationRequest("x", sampler="lms").replace(schedule="kl_optimal")
    assert changed.sampler == SamplerChoice("lms", "kl_optimal")
    assert GenerationRequest.from_dict({"sampler": "dpm++2m"}).sampler == SamplerChoice("dpm++2m", "uniform")
    assert GenerationRequest.from_dict({"sampler": "dpm++2m-karras"}).sampler == SamplerChoice("dpm++2m", "karras")
    assert GenerationRequest.from_dict({"sampler": "dpm++2m", "schedule": "automatic"}).schedule == "karras"
