"""Bad inputs to every ``nijimi`` command, one table row each: the argv (``{tmp}`` is the case's folder, also the
working directory; ``{model}`` and ``{lora}`` the session's tiny model and LoRA), an optional builder of the crafted
file (:mod:`crafted`), and the text the one error line must hold to name the culprit (file, key or argument).

Every case asserts the promise: exit code 2, exactly one stderr line, starting ``error:``, naming the culprit, no
traceback, and nothing created, changed or removed in the case's folder (names, sizes and mtimes). A few cases run
``python -m nijimi`` in a real process to show the same through the real exit path. Two processes writing one file
are tested in tests/test_cli.py (``test_concurrent_writers_…``) and tests/io/test_files.py.

``FILE_CASES`` are the crafted files and configs (special files, decompression bombs and text chunks,
checkpoint-embedded and diffusers-folder configs, NaN weights, training TOML and ``--resume``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli.crafted import (
    Fifo,
    bomb,
    chain,
    cut,
    evil_pickle,
    evil_zip,
    folder,
    image,
    model_with_config,
    nan_weights,
    png_text,
    raw,
    recipe_png,
    safetensors_file,
)
from cli.crafted import (
    fifo as make_fifo,
)

from nijimi.cli import main


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    expect: str
    make: object = None


def gen(*extra: str, make=None, expect: str) -> Case:
    """``nijimi generate`` of the tiny model, 2 steps at 64×64, with ``extra``."""
    return Case(("generate", "a red cube", "--model", "{model}", "--steps", "2", "--size", "64x64", "--seed", "1",
                 "--quiet", *extra), expect, make)


def rep(changes: dict | None = None, expect: str = "", *extra: str, **recipe) -> Case:
    """``nijimi reproduce`` of a crafted recipe PNG (``recipe_png``)."""
    return Case(("reproduce", "{tmp}/r.png", "--quiet", *extra), expect, recipe_png("r.png", changes, **recipe))


def cmd(*argv: str, expect: str, make=None) -> Case:
    return Case(argv, expect, make)


FINE = ("--steps=1", "--batch-size=1", "--data-count=2", "--no-samples", "--quiet")
"""Settings that keep a fine-tuning run short, should a case not be refused."""
ADAPTER = ("train-adapter", "--out={tmp}/a.safetensors", *FINE)
CONTROLNET = ("train-controlnet", "--out={tmp}/c.safetensors", *FINE)
TRAIN = ("train", "--out={tmp}/run", "--vae.steps=1", "--unet.steps=1", "--data-count=2", "--vae.batch-size=1",
         "--unet.batch-size=1", "--size=16", "--quiet")
EVAL = ("eval", "shapes", "--n", "1", "--steps", "1", "--quiet")
CONTROL_EVAL = ("eval", "control", "--n", "1", "--steps", "1", "--quiet")
ATTENTION = ("explain", "attention", "a red circle", "--model", "{model}", "--steps", "2", "--size", "64x64", "--quiet",
             "--out", "{tmp}/e")
SURROGATE = "a \udcff cube"
BIG = str(2**64)
NOT_A_DIR = raw("notdir", "a file, not a folder")
GOOD_IMAGE = image("init.png")

def _other_checkpoint(folder: Path) -> None:
    folder.mkdir()
    torch.save({"step": 1, "model": {"w": torch.zeros(2)}}, folder / "checkpoint.pt")


GENERATE_ARGUMENTS = {
    "size-huge": gen("--size", "99992x99992", expect="--size 99992x99992"),
    "size-square-memory": gen("--size", "65536x65536", expect="--size 65536x65536"),
    "size-zero": gen("--size", "0x64", expect="width 0"),
    "size-not-multiple-of-8": gen("--size", "60x64", expect="width 60"),
    "size-negative": gen("--size", "64x-8", expect="--size '64x-8'"),
    "size-text": gen("--size", "big", expect="--size 'big'"),
    "size-too-many-digits": gen("--size", "1234567x8", expect="--size '1234567x8'"),
    "batch-huge": gen("--batch", "10000", expect="batch 10000"),
    "batch-memory": gen("--batch", "4096", "--size", "4096x4096", expect="--batch 4096"),
    "batch-zero": gen("--batch", "0", expect="batch 0"),
    "batch-negative": gen("--batch", "-3", expect="batch -3"),
    "batch-text": gen("--batch", "two", expect="--batch"),
    "seed-2^64": gen("--seed", BIG, expect=f"seed {BIG}"),
    "seed-plus-batch-past-2^64": gen("--seed", str(2**64 - 1), "--batch", "2", expect=f"seed {2**64 - 1}"),
    "seed-negative": gen("--seed", "-1", expect="seed -1"),
    "seed-float": gen("--seed", "1e3", expect="--seed"),
    "seed-5000-digits": gen("--seed", "9" * 5000, expect="--seed"),
    "steps-zero": gen("--steps", "0", expect="steps 0"),
    "steps-negative": gen("--steps", "-5", expect="steps -5"),
    "steps-too-many": gen("--steps", "1001", expect="steps 1001"),
    "steps-fraction": gen("--steps", "1.5", expect="--steps"),
    "cfg-nan": gen("--cfg", "nan", expect="guidance nan"),
    "cfg-inf": gen("--cfg", "inf", expect="guidance inf"),
    "cfg-minus-inf": gen("--guidance=-inf", expect="guidance -inf"),
    "cfg-minus-inf-as-flag": gen("--cfg", "-inf", expect="--guidance/--cfg: expected one argument"),
    "cfg-text": gen("--cfg", "x", expect="--cfg"),
    "guidance-rescale-above-1": gen("--guidance-rescale", "1.5", expect="guidance rescale 1.5"),
    "guidance-rescale-nan": gen("--guidance-rescale", "nan", expect="guidance rescale nan"),
    "strength-above-1": gen("--init", "{tmp}/init.png", "--strength", "1.5", make=GOOD_IMAGE, expect="strength 1.5"),
    "strength-negative": gen("--strength", "-0.5", expect="strength -0.5"),
    "strength-nan": gen("--strength", "nan", expect="strength nan"),
    "eta-above-1": gen("--sampler", "ddim", "--eta", "2", expect="eta 2.0"),
    "eta-not-for-euler": gen("--sampler", "euler", "--eta", "0.5", expect="eta applies to"),
    "eta-nan": gen("--sampler", "ddim", "--eta", "nan", expect="eta nan"),
    "variation-strength-above-1": gen("--variation-strength", "2", expect="variation strength 2.0"),
    "variation-strength-nan": gen("--variation-strength", "nan", expect="variation strength nan"),
    "variation-seed-negative": gen("--variation-seed", "-1", "--variation-strength", "0.5",
                                   expect="variation seed -1"),
    "variation-seed-2^64": gen("--variation-seed", BIG, "--variation-strength", "0.5", expect=f"variation seed {BIG}"),
    "seed-resize-zero": gen("--seed-resize", "0x0", expect="seed_resize width 0"),
    "seed-resize-text": gen("--seed-resize", "abc", expect="--seed-resize 'abc'"),
    "guidance-interval-text": gen("--guidance-interval", "a", expect="--guidance-interval 'a'"),
    "guidance-interval-reversed": gen("--guidance-interval", "5,1", expect="guidance interval (5.0, 1.0)"),
    "guidance-interval-nan": gen("--guidance-interval", "nan,1", expect="guidance interval nan"),
    "guidance-interval-three": gen("--guidance-interval", "1,2,3", expect="--guidance-interval '1,2,3'"),
    "deepcache-negative": gen("--deepcache", "-1", expect="deepcache -1"),
    "clip-skip-zero": gen("--clip-skip", "0", expect="clip skip 0"),
    "clip-skip-too-deep": gen("--clip-skip", "5", expect="clip_skip must be in [1, 2], got 5"),
    "vae-tile-not-multiple": gen("--vae-tile", "12", expect="VAE tile 12"),
    "vae-tile-negative": gen("--vae-tile", "-8", expect="vae tile -8"),
    "attention-slice-negative": gen("--attention-slice", "-2", expect="attention slice -2"),
    "sampler-unknown": gen("--sampler", "warp-drive", expect="unknown sampler 'warp-drive'"),
    "sampler-empty": gen("--sampler", "", expect="sampler ''"),
    "device-unknown": gen("--device", "abacus", expect="unknown device 'abacus'"),
    "device-cuda-index": gen("--device", "cuda:7", expect="device cuda:7"),
    "dtype-unknown": gen("--dtype", "fp8", expect="--dtype"),
    "prompt-lone-surrogate": Case(("generate", SURROGATE, "--model", "{model}", "--steps", "2", "--quiet"),
                                  "prompt holds"),
    "negative-lone-surrogate": gen("-n", SURROGATE, expect="negative prompt holds"),
    "prompt-empty-with-cfg": Case(("generate", "", "--model", "{model}", "--steps", "2", "--quiet"),
                                  "the prompt is empty"),
    "prompt-composable-and": Case(("generate", "a cat AND a dog", "--model", "{model}", "--steps", "2", "--quiet"),
                                  "AND"),
    "prompt-missing": cmd("generate", "--model", "{model}", expect="prompt"),
    "unknown-flag": gen("--frobnicate", expect="--frobnicate"),
    "abbreviated-flag": gen("--vae-t", "32", expect="--vae-t"),
}

MODEL_FILES = {
    "missing": (None, "nope.safetensors"),
    "empty": (raw("m.safetensors", b""), "m.safetensors"),
    "text": (raw("m.safetensors", "hello, I am not a model"), "m.safetensors"),
    "truncated-body": (cut("m.safetensors", 100_000), "m.safetensors"),
    "truncated-header": (cut("m.safetensors", 200), "m.safetensors"),
    "header-length-past-end": (safetensors_file("m.safetensors", {}, length=1 << 20), "m.safetensors"),
    "header-length-2^63": (safetensors_file("m.safetensors", {}, length=1 << 63), "m.safetensors"),
    "header-not-json": (safetensors_file("m.safetensors", b"{not json} "), "m.safetensors"),
    "header-json-list": (safetensors_file("m.safetensors", [1, 2]), "m.safetensors"),
    "header-unknown-dtype": (safetensors_file("m.safetensors", {"w": {"dtype": "F13", "shape": [1],
                                                                      "data_offsets": [0, 4]}}, data=b"\0" * 4),
                             "m.safetensors"),
    "header-offsets-past-end": (safetensors_file("m.safetensors", {"w": {"dtype": "F32", "shape": [1000],
                                                                         "data_offsets": [0, 4000]}}, data=b"\0" * 8),
                                "m.safetensors"),
    "header-negative-shape": (safetensors_file("m.safetensors", {"w": {"dtype": "F32", "shape": [-1],
                                                                       "data_offsets": [0, 4]}}, data=b"\0" * 4),
                              "m.safetensors"),
    "unrelated-tensors": (safetensors_file("m.safetensors", {"w": {"dtype": "F32", "shape": [1],
                                                                   "data_offsets": [0, 4]}}, data=b"\0" * 4),
                          "m.safetensors"),
    "zip-named-safetensors": (evil_zip("m.safetensors"), "m.safetensors"),
    "ckpt-pickle-with-code": (evil_zip("m.ckpt"), "m.ckpt: refusing to unpickle"),
    "ckpt-legacy-pickle": (evil_pickle("m.ckpt"), "m.ckpt: is a raw pickle"),
    "ckpt-damaged-zip": (raw("m.ckpt", b"PK\x03\x04" + b"\0" * 100), "m.ckpt"),
    "pt-unknown-content": (raw("m.pt", b"\x01\x02\x03 nothing"), "m.pt"),
    "folder-empty": (folder("m"), "m"),
    "folder-with-junk": (chain(folder("m"), raw("m/readme.txt", "hi")), "m"),
}
MODEL_NAMES = {"missing": "nope.safetensors", "folder-empty": "m", "folder-with-junk": "m"}

GENERATE_FILES = {
    **{f"model-{name}": gen("--model", f"{{tmp}}/{MODEL_NAMES.get(name, expect.split(':')[0])}", make=make,
                            expect=expect)
       for name, (make, expect) in MODEL_FILES.items()},
    "model-config-unknown-preset": gen("--model-config", "sd99", expect="sd99"),
    "model-config-yaml-missing": gen("--model-config", "{tmp}/v.yaml", expect="v.yaml"),
    "init-missing": gen("--init", "{tmp}/gone.png", expect="gone.png: image file not found"),
    "init-broken": gen("--init", "{tmp}/b.png", make=raw("b.png", b"\x89PNG\r\n\x1a\n truncated"), expect="b.png"),
    "init-folder": gen("--init", "{tmp}/d", make=folder("d"), expect="d"),
    "init-text": gen("--init", "{tmp}/t.png", make=raw("t.png", "text"), expect="t.png"),
    "mask-without-init": gen("--mask", "{tmp}/init.png", make=GOOD_IMAGE, expect="a mask needs an init image"),
    "mask-size-mismatch": gen("--init", "{tmp}/init.png", "--mask", "{tmp}/m.png",
                              make=chain(GOOD_IMAGE, image("m.png", (32, 32), "L")), expect="mask size 32x32"),
    "mask-broken": gen("--init", "{tmp}/init.png", "--mask", "{tmp}/m.png",
                       make=chain(GOOD_IMAGE, raw("m.png", b"\x89PNG")), expect="m.png"),
    "lora-missing": gen("--lora", "{tmp}/nope.safetensors", expect="nope"),
    "lora-weight-text": gen("--lora", "{lora}:abc", expect="abc"),
    "lora-weight-nan": gen("--lora", "{lora}:nan", expect="weight 'nan' is not a finite number"),
    "lora-weight-1e309": gen("--lora", "{lora}:1e309", expect="weight '1e309' is not a finite number"),
    "lora-corrupt": gen("--lora", "{tmp}/l.safetensors", make=raw("l.safetensors", "junk"), expect="l.safetensors"),
    "lora-pickle-with-code": gen("--lora", "{tmp}/l.ckpt", make=evil_zip("l.ckpt"), expect="l.ckpt"),
    "lora-dir-missing": gen("--lora-dir", "{tmp}/none", "--lora", "ink", expect="none"),
    "lora-tag-unknown": Case(("generate", "a cube <lora:nosuch:1>", "--model", "{model}", "--steps", "2",
                              "--quiet"), "nosuch"),
    "lora-tag-weight-text": Case(("generate", "a cube <lora:pink:abc>", "--model", "{model}", "--steps", "2",
                                  "--quiet"), "abc"),
    "control-not-key-value": gen("--control", "nonsense", expect="--control: 'nonsense'"),
    "control-unknown-key": gen("--control", "model=embedded,image=x.png,foo=1", expect="foo"),
    "control-image-missing": Case(("generate", "a cube", "--steps", "2", "--quiet", "--control",
                                   "model=embedded,image={tmp}/gone.png"), "gone.png"),
    "control-model-missing": gen("--control", "model={tmp}/cn.safetensors,image={tmp}/init.png", make=GOOD_IMAGE,
                                 expect="cn.safetensors"),
    "control-scale-nan": gen("--control", "model=embedded,image={tmp}/init.png,scale=nan", make=GOOD_IMAGE,
                             expect="scale='nan'"),
    "control-pre-unknown": gen("--control", "model=embedded,image={tmp}/init.png,pre=sobel", make=GOOD_IMAGE,
                               expect="pre='sobel'"),
    "control-start-after-end": gen("--control", "model=embedded,image={tmp}/init.png,start=0.9,end=0.1",
                                   make=GOOD_IMAGE, expect="start=0.9"),
    "control-model-corrupt": gen("--control", "model={tmp}/cn.safetensors,image={tmp}/init.png",
                                 make=chain(GOOD_IMAGE, raw("cn.safetensors", "junk")), expect="cn.safetensors"),
    "vae-missing": gen("--vae", "{tmp}/v.safetensors", expect="v.safetensors"),
    "vae-corrupt": gen("--vae", "{tmp}/v.safetensors", make=raw("v.safetensors", "junk"), expect="v.safetensors"),
    "decoder-unknown": gen("--decoder", "big", expect="decoder 'big'"),
    "decoder-tiny-missing": gen("--decoder", "tiny:{tmp}/taesd.safetensors", expect="taesd.safetensors"),
    "decoder-tiny-beside-model": gen("--decoder", "tiny", expect="taesd_decoder.safetensors"),
    "out-under-a-file": gen("--out", "{tmp}/notdir/x.png", make=NOT_A_DIR, expect="notdir"),
    "out-folder-under-a-file": gen("--out", "{tmp}/notdir/sub", make=NOT_A_DIR, expect="notdir"),
    "out-exists": gen("--out", "{tmp}/x.png", make=image("x.png"), expect="x.png exists; use --overwrite"),
    "preview-under-a-file": gen("--preview", "{tmp}/notdir/p.png", make=NOT_A_DIR, expect="notdir"),
    "preview-exists": gen("--preview", "{tmp}/p.png", make=image("p.png"), expect="p.png exists; use --overwrite"),
}

REPRODUCE = {
    "image-missing": cmd("reproduce", "{tmp}/gone.png", expect="gone.png"),
    "image-folder": cmd("reproduce", "{tmp}/d", make=folder("d"), expect="d"),
    "image-jpeg": cmd("reproduce", "{tmp}/j.png", make=image("j.png", fmt="JPEG"), expect="j.png"),
    "image-broken": cmd("reproduce", "{tmp}/b.png", make=raw("b.png", b"\x89PNG\r\n\x1a\nxx"), expect="b.png"),
    "no-recipe": cmd("reproduce", "{tmp}/p.png", make=image("p.png"), expect="p.png: no generation metadata"),
    "recipe-not-json": cmd("reproduce", "{tmp}/p.png", make=png_text("p.png", nijimi="{oops"),
                           expect="p.png: no nijimi recipe"),
    "recipe-a-list": cmd("reproduce", "{tmp}/p.png", make=png_text("p.png", nijimi="[1, 2]"),
                         expect="p.png: no nijimi recipe"),
    "recipe-without-request": rep(None, "r.png: no nijimi recipe", drop=("request",)),
    "recipe-model-not-a-dict": rep(None, "r.png", model="tiny"),
    "request-a-list": rep(None, "r.png", request=[1, 2]),
    "request-unknown-key": rep({"frobnicate": 1}, "frobnicate"),
    "model-name-empty": rep(None, "names no model", model={"name": "", "hash": "0123456789"}),
    "model-not-found": rep(None, "nomodel", model={"name": "nomodel", "hash": "0123456789"}),
    "model-hash-mismatch": rep(None, "differs from the image's 0123456789",
                               model={"name": "tiny", "hash": "0123456789", "source": "{model}"}),
    "model-override-missing": rep(None, "nope.safetensors", "--model", "{tmp}/nope.safetensors"),
    "dtype-unknown": rep(None, "recipe dtype 'fp8'", dtype="fp8"),
    "out-under-a-file": Case(("reproduce", "{tmp}/r.png", "--out", "{tmp}/notdir/x.png"), "notdir",
                             chain(recipe_png("r.png"), NOT_A_DIR)),
}
WRONG_TYPES = {
    "prompt": 5, "negative_prompt": [], "steps": "20", "sampler": 5, "eta": "x", "guidance": "7",
    "guidance_rescale": 3, "guidance_interval": "x", "deepcache": "x", "seed": -1, "variation_seed": "x",
    "variation_strength": "x", "seed_resize": "x", "width": "64", "height": True, "batch": "2", "init_image": 5,
    "strength": "x", "mask": 5, "clip_skip": "2", "vae_tile": "x", "vae": 5, "decoder": 5, "attention_slice": "x",
    "loras": "x", "lora_dir": 5, "strict_loras": "yes", "control": "x",
}
OTHER_VALUES = {
    "steps-fraction": ("steps", 1.5), "steps-zero": ("steps", 0), "guidance-nan": ("guidance", float("nan")),
    "guidance-infinite": ("guidance", float("inf")), "strength-above-1": ("strength", 2),
    "seed-2^64": ("seed", 2**64), "seed-text": ("seed", "1"), "width-63": ("width", 63),
    "width-negative": ("width", -8),
    "width-huge": ("width", 1 << 21), "batch-zero": ("batch", 0), "clip-skip-zero": ("clip_skip", 0),
    "sampler-unknown": ("sampler", "warp"), "decoder-tiny-empty": ("decoder", "tiny:"),
    "guidance-interval-one": ("guidance_interval", [1]), "seed-resize-one": ("seed_resize", [64]),
    "loras-short-entry": ("loras", [["ink"]]), "loras-number-path": ("loras", [[1, 1, 1]]),
    "loras-text-weight": ("loras", [["{lora}", "x", 1]]), "loras-nan-weight": ("loras", [["{lora}", float("nan"), 1]]),
    "loras-entry-not-list": ("loras", [5]), "control-entry-not-dict": ("control", [5]),
    "control-empty-entry": ("control", [{}]), "control-scale-text": ("control", [{"model": "embedded",
                                                                                   "image": "x.png", "scale": "x"}]),
}
LABELS = {"loras-nan-weight": "weights must be finite", "clip-skip-zero": "clip skip 0", "seed_resize": "seed_resize",
          "lora_dir": "lora_dir", "strict_loras": "strict_loras", "seed-resize-one": "seed_resize"}
"""Expected text where the message names the field other than by its key with spaces for underscores."""
REPRODUCE.update({f"field-{name}-{type(value).__name__}": rep({name: value}, LABELS.get(name, name.replace("_", " ")))
                  for name, value in WRONG_TYPES.items()})
REPRODUCE.update({f"field-{name}": rep({field: value}, LABELS.get(name, field.replace("_", " ")))
                  for name, (field, value) in OTHER_VALUES.items()})

OTHER_COMMANDS = {
    "info-missing": cmd("info", "{tmp}/gone.png", expect="gone.png"),
    "info-folder": cmd("info", "{tmp}/d", make=folder("d"), expect="d"),
    "info-broken": cmd("info", "{tmp}/b.png", make=raw("b.png", b"\x89PNG\r\n\x1a\nxx"), expect="b.png"),
    "info-text-file": cmd("info", "{tmp}/t.png", make=raw("t.png", "hello"), expect="t.png"),
    "info-truncated": cmd("info", "{tmp}/t.png", make=cut("t.png", 40, "png"), expect="t.png"),
    "info-infotext-5M": cmd("info", "{tmp}/p.png", make=png_text("p.png", parameters="x, " * 1_700_000),
                            expect="infotext of 5100000 characters"),
    "info-two-images": cmd("info", "{tmp}/a.png", "{tmp}/b.png", expect="unrecognized arguments"),
    "demo-out-under-a-file": cmd("demo", "--out", "{tmp}/notdir/demo", make=NOT_A_DIR, expect="notdir"),
    "demo-out-is-a-file": cmd("demo", "--out", "{tmp}/notdir", make=NOT_A_DIR, expect="notdir"),
    "demo-exists": cmd("demo", "--out", "{tmp}/o", make=image("o/demo.png"), expect="demo.png exists"),
    "demo-grid-exists": cmd("demo", "--out", "{tmp}/o", make=image("o/grid.png"), expect="grid.png exists"),
    "demo-unknown-flag": cmd("demo", "--seed", "1", expect="--seed"),
    "explain-out-under-a-file": cmd("explain", "schedules", "--out", "{tmp}/notdir/e", make=NOT_A_DIR,
                                    expect="notdir"),
    "explain-out-missing": cmd("explain", "schedules", expect="--out"),
    "explain-image-missing": cmd("explain", "schedules", "--out", "{tmp}/e", "--image", "{tmp}/gone.png",
                                 expect="gone.png"),
    "explain-image-broken": cmd("explain", "schedules", "--out", "{tmp}/e", "--image", "{tmp}/b.png",
                                make=raw("b.png", "junk"), expect="b.png"),
    "explain-exists": cmd("explain", "schedules", "--out", "{tmp}/e", make=image("e/noising.png"),
                          expect="noising.png exists"),
    "explain-topic-unknown": cmd("explain", "everything", expect="everything"),
    "explain-forward-image-missing": cmd("explain", "forward", "{tmp}/gone.png", "--out", "{tmp}/e",
                                         expect="gone.png"),
    "explain-forward-image-broken": cmd("explain", "forward", "{tmp}/b.png", "--out", "{tmp}/e",
                                        make=raw("b.png", b"\x89PNG\r\n\x1a\nxx"), expect="b.png"),
    "explain-forward-exists": cmd("explain", "forward", "{tmp}/init.png", "--out", "{tmp}/e",
                                  make=chain(GOOD_IMAGE, image("e/forward.png")), expect="forward.png"),
    "explain-forward-out-under-a-file": cmd("explain", "forward", "{tmp}/init.png", "--out", "{tmp}/notdir/e",
                                            make=chain(GOOD_IMAGE, NOT_A_DIR), expect="notdir"),
    "explain-forward-timesteps-text": cmd("explain", "forward", "{tmp}/init.png", "--out", "{tmp}/e", "--timesteps",
                                          "0,x", make=GOOD_IMAGE, expect="--timesteps"),
    "explain-forward-timesteps-past-T": cmd("explain", "forward", "{tmp}/init.png", "--out", "{tmp}/e", "--model",
                                            "{model}", "--timesteps", "0,1000", make=GOOD_IMAGE,
                                            expect="timestep 1000"),
    "explain-forward-timesteps-negative": cmd("explain", "forward", "{tmp}/init.png", "--out", "{tmp}/e", "--model",
                                              "{model}", "--timesteps=-1", make=GOOD_IMAGE, expect="timestep -1"),
    "explain-trajectory-out-missing": cmd("explain", "trajectory", "a cube", expect="--out"),
    "explain-trajectory-exists": cmd("explain", "trajectory", "a cube", "--model", "{model}", "--steps", "2",
                                     "--size", "64x64", "--out", "{tmp}/e", make=image("e/trajectory.png"),
                                     expect="trajectory.png"),
    "explain-trajectory-batch": cmd("explain", "trajectory", "a cube", "--model", "{model}", "--steps", "2",
                                    "--size", "64x64", "--batch", "2", "--out", "{tmp}/e", expect="batch 2"),
    "explain-trajectory-steps-zero": cmd("explain", "trajectory", "a cube", "--steps", "0", "--out", "{tmp}/e",
                                         expect="steps 0"),
    "explain-adapters-no-adapter": cmd("explain", "adapters", "a cube", "--model", "{model}", "--steps", "2",
                                       "--size", "64x64", "--out", "{tmp}/e", expect="loads no adapter"),
    "explain-adapters-lora-missing": cmd("explain", "adapters", "a cube", "--model", "{model}", "--steps", "2",
                                         "--size", "64x64", "--lora", "{tmp}/gone.safetensors", "--out", "{tmp}/e",
                                         expect="gone.safetensors"),
    "explain-adapters-exists": cmd("explain", "adapters", "a cube", "--lora", "{lora}", "--out", "{tmp}/e",
                                   make=image("e/adapters.json"), expect="adapters.json"),
    "explain-attention-word-not-in-prompt": cmd(*ATTENTION, "--words", "red,green", expect="word 'green' is not in"),
    "explain-attention-word-empty": cmd(*ATTENTION, "--words", "red,,circle", expect="--words 'red,,circle'"),
    "explain-attention-out-missing": cmd("explain", "attention", "a red circle", expect="--out"),
    "explain-attention-exists": cmd(*ATTENTION, make=image("e/attention.png"), expect="attention.png exists"),
    "explain-attention-json-exists": cmd(*ATTENTION, make=raw("e/attention.json", "{}"),
                                         expect="attention.json exists"),
    "explain-attention-panel-exists": cmd(*ATTENTION, "--words", "red", make=image("e/word-0-red.png"),
                                          expect="word-0-red.png exists"),
    "explain-attention-out-under-a-file": cmd("explain", "attention", "a red circle", "--model", "{model}", "--out",
                                              "{tmp}/notdir/e", make=NOT_A_DIR, expect="notdir"),
    "explain-attention-steps-zero": cmd(*ATTENTION, "--steps", "0", expect="steps 0"),
    "explain-attention-model-missing": cmd("explain", "attention", "a red circle", "--model",
                                           "{tmp}/gone.safetensors", "--out", "{tmp}/e", expect="gone.safetensors"),
    "eval-attention-n-zero": cmd("eval", "attention", "--n", "0", "--quiet", expect="n 0"),
    "eval-attention-model-missing": cmd("eval", "attention", "--n", "1", "--model", "{tmp}/gone.safetensors",
                                        "--quiet", expect="gone.safetensors"),
    "convert-src-missing": cmd("convert", "{tmp}/gone.safetensors", "{tmp}/o.safetensors", expect="gone.safetensors"),
    "convert-src-corrupt": cmd("convert", "{tmp}/m.safetensors", "{tmp}/o.safetensors",
                               make=raw("m.safetensors", "junk"), expect="m.safetensors"),
    "convert-src-pickle-with-code": cmd("convert", "{tmp}/m.ckpt", "{tmp}/o.safetensors", make=evil_zip("m.ckpt"),
                                        expect="m.ckpt: refusing to unpickle"),
    "convert-dst-exists": cmd("convert", "{model}", "{tmp}/o.safetensors", make=raw("o.safetensors", "keep"),
                              expect="o.safetensors exists"),
    "convert-dst-folder-exists": cmd("convert", "{model}", "{tmp}/o", make=chain(folder("o"), raw("o/x", "keep")),
                                     expect="o exists"),
    "convert-dst-under-a-file": cmd("convert", "{model}", "{tmp}/notdir/o.safetensors", make=NOT_A_DIR,
                                    expect="notdir"),
    "convert-to-unknown": cmd("convert", "{model}", "{tmp}/o.safetensors", "--to", "onnx", expect="--to"),
    "convert-model-config-unknown": cmd("convert", "{model}", "{tmp}/o.safetensors", "--model-config", "sd99",
                                        expect="sd99"),
    "train-config-missing": cmd(*TRAIN, "--config", "{tmp}/gone.toml", expect="gone.toml"),
    "train-config-invalid": cmd(*TRAIN, "--config", "{tmp}/c.toml", make=raw("c.toml", "steps = = 1"),
                                expect="c.toml: invalid TOML"),
    "train-config-unknown-key": cmd(*TRAIN, "--config", "{tmp}/c.toml", make=raw("c.toml", "frob = 1"),
                                    expect="frob"),
    "train-config-wrong-type": cmd(*TRAIN, "--config", "{tmp}/c.toml", make=raw("c.toml", "seed = 'x'"),
                                   expect="'seed'"),
    "train-flag-wrong-type": cmd(*TRAIN, "--arch.unet.model_channels=x", expect="'arch.unet.model_channels'"),
    "train-unet-steps-negative": cmd(*TRAIN, "--unet.steps=-5", expect="unet.steps"),
    "train-vae-steps-zero": cmd(*TRAIN, "--vae.steps=0", expect="vae.steps"),
    "train-model-unknown": cmd(*TRAIN, "--model=huge", expect="huge"),
    "train-init-missing": cmd(*TRAIN, "--init={tmp}/gone.safetensors", expect="gone.safetensors"),
    "train-data-missing": cmd(*TRAIN, "--data={tmp}/nodata", expect="nodata"),
    "train-prediction-unknown": cmd(*TRAIN, "--prediction-type=x0", expect="x0"),
    "train-schedule-unknown": cmd(*TRAIN, "--beta-schedule=wavy", expect="wavy"),
    "train-bias-unknown": cmd(*TRAIN, "--unet.timestep-bias-strategy=middle", expect="middle"),
    "train-out-under-a-file": cmd(*TRAIN, "--out={tmp}/notdir/run", make=NOT_A_DIR, expect="notdir"),
    "train-export-exists": cmd(*TRAIN, "--export={tmp}/m.safetensors", make=raw("m.safetensors", "keep"),
                               expect="m.safetensors exists"),
    "train-checkpoint-exists": cmd(*TRAIN, make=raw("run/vae/checkpoint.pt", "keep"), expect="checkpoint.pt"),
    "train-unknown-flag": cmd("train", "--frob=1", expect="--frob"),
    "adapter-steps-negative": cmd(*ADAPTER, "--steps=-1",
                                  expect="steps"),
    "adapter-batch-zero": cmd(*ADAPTER, "--batch-size=0",
                              expect="batch_size"),
    "adapter-type-unknown": cmd(*ADAPTER, "--type=lorax", expect="lorax"),
    "adapter-format-unknown": cmd(*ADAPTER, "--format=onnx",
                                  expect="onnx"),
    "adapter-rank-zero": cmd(*ADAPTER, "--rank=0", expect="rank"),
    "adapter-alpha-negative": cmd(*ADAPTER, "--alpha=-1",
                                  expect="alpha"),
    "adapter-caption-dropout": cmd(*ADAPTER, "--caption-dropout=2",
                                   expect="caption_dropout"),
    "adapter-size-odd": cmd(*ADAPTER, "--size=7", expect="size 7"),
    "adapter-base-missing": cmd(*ADAPTER, "--base={tmp}/gone.safetensors",
                                expect="gone.safetensors"),
    "adapter-base-corrupt": cmd(*ADAPTER, "--base={tmp}/m.safetensors",
                                make=raw("m.safetensors", "junk"), expect="m.safetensors"),
    "adapter-data-missing": cmd(*ADAPTER, "--data={tmp}/nodata",
                                expect="nodata"),
    "adapter-reg-data-missing": cmd(*ADAPTER, "--reg-data={tmp}/noreg",
                                    expect="noreg"),
    "adapter-out-exists": cmd("train-adapter", "--out={tmp}/a.safetensors", *FINE,
                              make=raw("a.safetensors", "keep"), expect="a.safetensors exists"),
    "adapter-out-under-a-file": cmd("train-adapter", "--out={tmp}/notdir/a.safetensors", *FINE, make=NOT_A_DIR,
                                    expect="notdir"),
    "adapter-work-under-a-file": cmd("train-adapter", "--out={tmp}/a.safetensors", "--work={tmp}/notdir/w", *FINE,
                                     make=NOT_A_DIR, expect="notdir"),
    "adapter-checkpoint-exists": cmd("train-adapter", "--out={tmp}/a.safetensors", *FINE,
                                     make=raw("a-train/checkpoint.pt", "keep"), expect="checkpoint.pt"),
    "adapter-config-missing": cmd("train-adapter", "--config={tmp}/gone.toml", expect="gone.toml"),
    "controlnet-condition-unknown": cmd(*CONTROLNET, "--condition=depth",
                                        expect="depth"),
    "controlnet-steps-zero": cmd(*CONTROLNET, "--steps=0",
                                 expect="steps"),
    "controlnet-out-exists": cmd("train-controlnet", "--out={tmp}/c.safetensors", *FINE,
                                 make=raw("c.safetensors", "keep"), expect="c.safetensors exists"),
    "controlnet-out-not-safetensors": cmd("train-controlnet", "--out={tmp}/c.ckpt", *FINE, expect="c.ckpt"),
    "controlnet-out-under-a-file": cmd("train-controlnet", "--out={tmp}/notdir/c.safetensors", *FINE,
                                       make=NOT_A_DIR, expect="notdir"),
    "controlnet-base-missing": cmd("train-controlnet", "--out={tmp}/c.safetensors", *FINE,
                                   "--base={tmp}/gone.safetensors", expect="gone.safetensors"),
    "dataset-count-negative": cmd("dataset", "shapes", "--count", "-1", "--out", "{tmp}/d",
                                  expect="count must be positive, got -1"),
    "dataset-count-zero": cmd("dataset", "shapes", "--count", "0", "--out", "{tmp}/d",
                              expect="count must be positive, got 0"),
    "dataset-size-zero": cmd("dataset", "shapes", "--count", "2", "--size", "0", "--out", "{tmp}/d",
                             expect="size 0"),
    "dataset-size-negative": cmd("dataset", "shapes", "--count", "2", "--size", "-5", "--out", "{tmp}/d",
                                 expect="size -5"),
    "dataset-out-under-a-file": cmd("dataset", "shapes", "--count", "2", "--out", "{tmp}/notdir/d", make=NOT_A_DIR,
                                    expect="notdir"),
    "dataset-out-is-a-file": cmd("dataset", "shapes", "--count", "2", "--out", "{tmp}/notdir", make=NOT_A_DIR,
                                 expect="notdir"),
    "dataset-captions-exist": cmd("dataset", "shapes", "--count", "2", "--out", "{tmp}/d",
                                  make=raw("d/captions.jsonl", "keep"), expect="captions.jsonl exists"),
    "dataset-image-exists": cmd("dataset", "shapes", "--count", "2", "--out", "{tmp}/d",
                                make=raw("d/00001.png", "keep"), expect="00001.png exists"),
    "dataset-count-text": cmd("dataset", "shapes", "--count", "x", "--out", "{tmp}/d", expect="--count"),
    "dataset-kind-unknown": cmd("dataset", "faces", "--count", "1", "--out", "{tmp}/d", expect="faces"),
    "eval-n-zero": cmd(*EVAL, "--n", "0", expect="n 0"),
    "eval-n-negative": cmd(*EVAL, "--n", "-1", expect="n -1"),
    "eval-steps-zero": cmd(*EVAL, "--steps", "0", expect="steps 0"),
    "eval-cfg-nan": cmd(*EVAL, "--cfg", "nan", expect="guidance nan"),
    "eval-seed-negative": cmd(*EVAL, "--seed", "-1", expect="seed -1"),
    "eval-sampler-unknown": cmd(*EVAL, "--sampler", "warp", expect="warp"),
    "eval-model-missing": cmd(*EVAL, "--model", "{tmp}/gone.safetensors", expect="gone.safetensors"),
    "eval-lora-missing": cmd(*EVAL, "--lora", "{tmp}/gone.safetensors", expect="gone"),
    "eval-grid-under-a-file": cmd(*EVAL, "--grid", "{tmp}/notdir/g.png", make=NOT_A_DIR, expect="notdir"),
    "eval-grid-exists": cmd(*EVAL, "--grid", "{tmp}/g.png", make=image("g.png"), expect="g.png exists"),
    "eval-concept-unknown": cmd(*EVAL, "--concept", "plaid", expect="plaid"),
    "eval-control-controlnet-missing": cmd(*CONTROL_EVAL, "--controlnet", "{tmp}/gone.safetensors",
                                           expect="gone.safetensors"),
    "eval-control-condition-unknown": cmd(*CONTROL_EVAL, "--condition", "depth", expect="depth"),
    "eval-control-size-odd": cmd(*CONTROL_EVAL, "--size", "7", expect="7"),
    "eval-control-scale-nan": cmd(*CONTROL_EVAL, "--scale", "nan", expect="control scale must be finite"),
    "eval-control-grid-exists": cmd(*CONTROL_EVAL, "--grid", "{tmp}/g.png", make=image("g.png"),
                                    expect="g.png exists"),
    "lora-extract-base-missing": cmd("lora", "extract", "--base", "{tmp}/gone.safetensors", "--tuned", "{model}",
                                     "--rank", "2", "--out", "{tmp}/l.safetensors", expect="gone.safetensors"),
    "lora-extract-tuned-corrupt": cmd("lora", "extract", "--base", "{model}", "--tuned", "{tmp}/m.safetensors",
                                      "--rank", "2", "--out", "{tmp}/l.safetensors", make=raw("m.safetensors", "junk"),
                                      expect="m.safetensors"),
    "lora-extract-rank-zero": cmd("lora", "extract", "--base", "{model}", "--tuned", "{model}", "--rank", "0",
                                  "--out", "{tmp}/l.safetensors", expect="rank must be ≥ 1, got rank=0"),
    "lora-extract-same-model": cmd("lora", "extract", "--base", "{model}", "--tuned", "{model}", "--rank", "2",
                                   "--out", "{tmp}/l.safetensors", expect="does not differ"),
    "lora-extract-out-exists": cmd("lora", "extract", "--base", "{model}", "--tuned", "{model}", "--rank", "2",
                                   "--out", "{tmp}/l.safetensors", make=raw("l.safetensors", "keep"),
                                   expect="l.safetensors exists"),
    "lora-extract-out-under-a-file": cmd("lora", "extract", "--base", "{model}", "--tuned", "{model}", "--rank", "2",
                                         "--out", "{tmp}/notdir/l.safetensors", make=NOT_A_DIR, expect="notdir"),
    "lora-extract-targets-unknown": cmd("lora", "extract", "--base", "{model}", "--tuned", "{model}", "--rank", "2",
                                        "--targets", "nothing.matches.*", "--out", "{tmp}/l.safetensors",
                                        expect="nothing.matches"),
    "lora-resize-missing": cmd("lora", "resize", "{tmp}/gone.safetensors", "--rank", "1", "--out", "{tmp}/o",
                               expect="gone.safetensors"),
    "lora-resize-corrupt": cmd("lora", "resize", "{tmp}/l.safetensors", "--rank", "1", "--out", "{tmp}/o",
                               make=raw("l.safetensors", "junk"), expect="l.safetensors"),
    "lora-resize-pickle-with-code": cmd("lora", "resize", "{tmp}/l.ckpt", "--rank", "1", "--out", "{tmp}/o",
                                        make=evil_zip("l.ckpt"), expect="l.ckpt"),
    "lora-resize-rank-zero": cmd("lora", "resize", "{lora}", "--rank", "0", "--base", "{model}", "--out",
                                 "{tmp}/o.safetensors", expect="rank must be ≥ 1, got 0"),
    "lora-resize-out-exists": cmd("lora", "resize", "{lora}", "--rank", "1", "--base", "{model}", "--out",
                                  "{tmp}/o.safetensors", make=raw("o.safetensors", "keep"), expect="o.safetensors"),
    "lora-resize-out-under-a-file": cmd("lora", "resize", "{lora}", "--rank", "1", "--base", "{model}", "--out",
                                        "{tmp}/notdir/o.safetensors", make=NOT_A_DIR, expect="notdir"),
    "lora-info-missing": cmd("lora", "info", "{tmp}/gone.safetensors", expect="gone.safetensors"),
    "lora-info-corrupt": cmd("lora", "info", "{tmp}/l.safetensors", make=raw("l.safetensors", "junk"),
                             expect="l.safetensors"),
    "lora-info-base-missing": cmd("lora", "info", "{lora}", "--base", "{tmp}/gone.safetensors",
                                  expect="gone.safetensors"),
    "lora-action-unknown": cmd("lora", "merge", expect="merge"),
    "doctor-unknown-flag": cmd("doctor", "--fast", expect="--fast"),
    "samplers-unknown-argument": cmd("samplers", "all", expect="all"),
    "generate-model-fifo": gen("--model", "{tmp}/m.safetensors", make=make_fifo("m.safetensors"),
                               expect="m.safetensors"),
    "adapter-resume-empty-checkpoint": cmd(*ADAPTER, "--resume",
                                           make=raw("a-train/checkpoint.pt", b""), expect="checkpoint.pt"),
    "adapter-resume-other-checkpoint": cmd(*ADAPTER, "--resume",
                                           make=lambda root, shared: _other_checkpoint(root / "a-train"),
                                           expect="checkpoint.pt"),
    "command-unknown": cmd("paint", expect="paint"),
    "command-missing": cmd(expect="COMMAND"),
}

CASES = {**{f"generate-{k}": v for k, v in GENERATE_ARGUMENTS.items()},
         **{f"generate-{k}": v for k, v in GENERATE_FILES.items()},
         **{f"reproduce-{k}": v for k, v in REPRODUCE.items()}, **OTHER_COMMANDS}


def _config(key: str, value: object):
    return lambda config: config["unet"].__setitem__(key, value)


FILE_CASES = {
    "info-fifo": cmd("info", "{tmp}/p.png", make=make_fifo("p.png"), expect="p.png"),
    "info-bomb": cmd("info", "{tmp}/b.png", make=bomb("b.png"), expect="b.png"),
    "generate-init-bomb": gen("--init", "{tmp}/b.png", make=bomb("b.png"), expect="b.png"),
    "generate-mask-bomb": gen("--init", "{tmp}/init.png", "--mask", "{tmp}/b.png",
                              make=chain(GOOD_IMAGE, bomb("b.png")), expect="b.png"),
    "generate-control-bomb": cmd("generate", "a red cube", "--steps", "1", "--quiet", "--control",
                                 "model=embedded,image={tmp}/b.png", make=bomb("b.png"), expect="b.png"),
    "adapter-data-bomb": cmd(*ADAPTER, "--data={tmp}/data",
                             make=chain(bomb("data/b.png"), raw("data/b.txt", "a cat")), expect="b.png"),
    "info-ztxt-2MB": cmd("info", "{tmp}/p.png", make=png_text("p.png", True, parameters="x" * (2 << 20)),
                         expect="p.png"),
    "reproduce-ztxt-recipe-2MB": cmd("reproduce", "{tmp}/p.png",
                                     make=png_text("p.png", True, nijimi="x" * (2 << 20)), expect="p.png"),
    "generate-model-config-wrong-type": gen("--model", "{tmp}/m.safetensors",
                                            make=model_with_config("m.safetensors", _config("model_channels", "x")),
                                            expect="model_channels"),
    "generate-model-config-zero": gen("--model", "{tmp}/m.safetensors",
                                      make=model_with_config("m.safetensors", _config("num_heads", 0)),
                                      expect="num_heads"),
    "generate-model-config-nested": gen("--model", "{tmp}/m.safetensors",
                                        make=model_with_config("m.safetensors", _config("num_res_blocks",
                                                               json.loads("[" * 500 + "]" * 500))),
                                        expect="m.safetensors: invalid nijimi_config metadata: JSON nested deeper"),
    "generate-diffusers-config-wrong-type": gen(
        "--model", "{tmp}/d", expect="block_out_channels",
        make=chain(folder("d/unet"), raw("d/model_index.json", '{"_class_name": "StableDiffusionPipeline"}'),
                   raw("d/unet/config.json", '{"block_out_channels": "wide"}'))),
    "generate-model-nan-weights": gen("--model", "{tmp}/m.safetensors", make=nan_weights("m.safetensors"),
                                      expect="m.safetensors"),
    "generate-lora-nan-weights": gen("--lora", "{tmp}/l.safetensors", make=nan_weights("l.safetensors", "lora"),
                                     expect="l.safetensors"),
    "generate-lora-tag-nan": Case(("generate", "a cube <lora:ink:nan>", "--model", "{model}", "--lora-dir",
                                   "{tmp}", "--steps", "2", "--quiet"), "nan",
                                  lambda root, shared: (root / "ink.safetensors").write_bytes(
                                      shared["lora"].read_bytes())),
    "train-config-not-utf8": cmd(*TRAIN, "--config", "{tmp}/c.toml", make=raw("c.toml", b"seed = 1 # \xff\xfe"),
                                 expect="c.toml"),
    "train-config-folder": cmd(*TRAIN, "--config", "{tmp}/c.toml", make=folder("c.toml"), expect="c.toml"),
    "train-batch-zero": cmd(*TRAIN, "--unet.batch-size=0", expect="batch_size"),
    "train-lr-nan": cmd(*TRAIN, "--unet.lr=nan", expect="lr"),
    "train-heads-zero": cmd(*TRAIN, "--arch.unet.num_heads=0", expect="num_heads"),
    "adapter-lr-nan": cmd(*ADAPTER, "--lr=nan", expect="lr"),
    "adapter-config-not-utf8": cmd("train-adapter", "--config={tmp}/c.toml", make=raw("c.toml", b"rank = 1 \xff"),
                                   expect="c.toml"),
}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` (not following links) with its size and mtime."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            stat = os.lstat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (stat.st_size, stat.st_mtime_ns)
    return out


def run_case(case: Case, folder: Path, shared: dict, capsys) -> None:
    made = case.make(folder, shared) if case.make else None
    before = snapshot(folder)
    names = {"tmp": folder, **shared}
    try:
        code = main([a.format(**names) for a in case.argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    fifos = [m for m in (made if isinstance(made, list) else [made]) if isinstance(m, Fifo)]
    opened = [f.path.name for f in fifos if f.release()]
    assert code == 2, (code, err[-2000:])
    assert err.endswith("\n") and len(err.splitlines()) == 1, err[-2000:]
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert case.expect.format(**names) in err, err
    assert snapshot(folder) == before
    assert not opened, f"{opened}: a special file was opened"


@pytest.mark.parametrize("case", [*CASES.values(), *FILE_CASES.values()], ids=[*CASES, *FILE_CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(case, case_dir, shared, capsys):
    run_case(case, case_dir, shared, capsys)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


SUBPROCESS_CASES = {
    "convert-src-pickle-with-code": OTHER_COMMANDS["convert-src-pickle-with-code"],
    "generate-model-config-10^9-channels": gen(
        "--model", "{tmp}/m.safetensors", expect="model_channels",
        make=model_with_config("m.safetensors", _config("model_channels", 10**9))),
}


@pytest.mark.parametrize("case", SUBPROCESS_CASES.values(), ids=SUBPROCESS_CASES.keys())
def test_bad_input_through_the_real_process(case, case_dir, shared):
    """``python -m nijimi``: the real exit code and stderr (8 GiB of address space at most, 60 s)."""
    if case.make:
        case.make(case_dir, shared)
    before = snapshot(case_dir)
    names = {"tmp": case_dir, **shared}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-m", "nijimi", *(a.format(**names) for a in case.argv)],
                            capture_output=True, text=True, timeout=60, env=env, preexec_fn=_limit_memory)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr[-2000:]
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and case.expect.format(**names) in line
    assert snapshot(case_dir) == before
