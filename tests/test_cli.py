"""The ``nijimi`` command through the real command line (``nijimi.cli.main``): ``generate`` → ``reproduce`` gives
the same pixels, metadata round-trips, batches are numbered and never overwritten by accident (not by concurrent
processes either), every user error exits 2 with one ``error:`` line, no traceback and no file; the training commands'
generated flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TOY_F8, in_processes, random_model, randomize
from helpers import png_pixels as pixels
from helpers import run_cli as run
from PIL import Image
from safetensors.torch import save_file

from nijimi.adapters.formats import save_adapter
from nijimi.adapters.inject import adapter_parameters, get_adapter, inject
from nijimi.adapters.targets import AdapterSpec
from nijimi.cli import build_parser, main, output_paths, write_png
from nijimi.diffusion.choice import SAMPLER_SPECS
from nijimi.errors import OutputExistsError
from nijimi.io.checkpoint import load_model, save_single
from nijimi.io.controlnet import save_original
from nijimi.io.imagemeta import read_image_metadata
from nijimi.io.pngmeta import model_hash, save_png
from nijimi.models.controlnet import ControlNetModel
from nijimi.models.vae import VAE
from nijimi.pipelines.request import GenerationRequest
from nijimi.train.adapter import AdapterTrainConfig
from nijimi.train.config import build_config
from nijimi.train.controlnet import ControlNetTrainConfig
from nijimi.train.run import parse_config
from nijimi.ui.train import config_values

CONFIG = TOY_F8
FAST = ["--steps", "3", "--size", "64x64", "--quiet"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A small random SD-architecture model in a single .safetensors file (the init plus noise: a fresh text
    encoder's final LayerNorm gives hidden states of mean exactly 0, which A1111's emphasis rescaling divides by)."""
    model = random_model(CONFIG, 0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_single(model, path)
    return path


def test_generate_then_reproduce_gives_identical_pixels(capsys, model_file, tmp_path):
    first = tmp_path / "a.png"
    code, out, err = run(capsys, "generate", "a red cube, (blue:1.2) sky", "-n", "fog", "--model", model_file,
                         "--seed", 42, "--sampler", "euler-a", "--cfg", 5, *FAST, "--out", first)
    assert (code, out.strip(), err) == (0, str(first), "")
    again = tmp_path / "b.png"
    code, out, err = run(capsys, "reproduce", first, "--out", again, "--quiet", "--models-dir", model_file.parent)
    assert (code, out.strip(), err) == (0, str(again), "")
    assert np.array_equal(pixels(first), pixels(again))
    assert pixels(first).std() > 5  # a picture, not a flat field
    assert read_image_metadata(again)["recipe"] == read_image_metadata(first)["recipe"]


@pytest.fixture(scope="module")
def extras(tmp_path_factory, model_file) -> dict[str, Path]:
    """For ``model_file``: an init image and mask, a LoRA and a ControlNet (random, non-zero) with its map."""
    folder = tmp_path_factory.mktemp("extras")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(folder / "mask.png")
    model, _ = load_model(model_file)
    inject(model, AdapterSpec(rank=2, alpha=1.0), "trained", torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in adapter_parameters(model, "trained"):
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    save_adapter(get_adapter(model, "trained"), folder / "ink.safetensors", model.config, "kohya")
    controlnet = ControlNetModel.from_unet(load_model(model_file)[0].unet, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_original(controlnet, folder / "cn.safetensors")
    return {"init": folder / "init.png", "mask": folder / "mask.png", "lora": folder / "ink.safetensors",
            "controlnet": folder / "cn.safetensors"}


REPRODUCED = {
    "txt2img": ["--sampler", "dpm++2m-sde", "--guidance-rescale", "0.5"],
    "img2img": ["--init", "{init}", "--strength", "0.6", "--sampler", "ddim", "--eta", "0.5"],
    "inpaint": ["--init", "{init}", "--mask", "{mask}", "--strength", "0.9", "--sampler", "euler-a"],
    "lora": ["--lora", "{lora}:0.8", "--sampler", "unipc"],
    "lora-tag": ["--lora-dir", "{dir}", "--sampler", "heun", "--prompt-suffix", " <lora:ink:0.7>"],
    "controlnet": ["--control", "model={controlnet},image={init},scale=0.8,end=0.6", "--sampler", "euler"],
}


@pytest.mark.parametrize("flags", REPRODUCED.values(), ids=REPRODUCED.keys())
def test_reproduce_regenerates_every_kind_of_image(capsys, model_file, extras, tmp_path, flags):
    """txt2img, img2img, inpainting, LoRA (flag and prompt tag) and ControlNet images: ``reproduce`` reads the
    request back from the PNG and gives the same pixels; the recipe holds the request, equal after a round trip."""
    args = [f.format(dir=extras["lora"].parent, **extras) for f in flags]
    suffix = ""
    if "--prompt-suffix" in args:
        at = args.index("--prompt-suffix")
        suffix, args = args[at + 1], args[:at] + args[at + 2:]
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    assert run(capsys, "generate", "a red cube" + suffix, "--model", model_file, "--seed", 5, *FAST, *args,
               "--out", first)[0] == 0
    plain = tmp_path / "plain.png"
    assert run(capsys, "generate", "a red cube", "--model", model_file, "--seed", 5, *FAST, "--out", plain)[0] == 0
    assert (code := run(capsys, "reproduce", first, "--out", again, "--quiet", "--models-dir", model_file.parent,
                        "--lora-dir", extras["lora"].parent))[0] == 0, code
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(plain))  # the flags mattered
    recipe = read_image_metadata(again)["recipe"]["request"]
    assert recipe == read_image_metadata(first)["recipe"]["request"]
    if not recipe["loras"]:  # LoRA files are recorded by name (found again by reproduce), not as a path
        assert GenerationRequest.from_dict(recipe).to_dict() == recipe
    if "--eta" in args:  # A1111 records DDIM's η as "Eta DDIM"
        assert str(read_image_metadata(first)["settings"]["Eta DDIM"]) == "0.5"


def test_reproduce_replays_dtype_and_memory_settings(capsys, model_file, tmp_path):
    first = tmp_path / "bf16.png"
    assert run(capsys, "generate", "a tree", "--model", model_file, "--seed", 3, "--dtype", "bf16",
               "--vae-tile", 32, "--attention-slice", 5, "--device", "cpu", *FAST, "--out", first)[0] == 0
    recipe = read_image_metadata(first)["recipe"]
    request = recipe["request"]
    assert (recipe["dtype"], recipe["device"]) == ("bf16", "cpu")
    assert (request["vae_tile"], request["attention_slice"]) == (32, 5)
    assert run(capsys, "reproduce", first, "--out", tmp_path / "again.png", "--quiet", "--models-dir",
               model_file.parent)[0] == 0
    assert np.array_equal(pixels(first), pixels(tmp_path / "again.png"))
    assert run(capsys, "generate", "a tree", "--model", model_file, "--seed", 3, *FAST, "--out", tmp_path / "f.png",
               "--vae-tile", 0)[0] == 0
    assert not np.array_equal(pixels(first), pixels(tmp_path / "f.png"))  # fp32, untiled: other pixels


def test_metadata_round_trips(capsys, model_file, tmp_path):
    out = tmp_path / "meta.png"
    assert run(capsys, "generate", "a cat: on a mat", "-n", "dog", "--model", model_file, "--seed", 7, "--cfg", 4.5,
               "--sampler", "DPM++ 2M Karras", "--clip-skip", 2, *FAST, "--out", out)[0] == 0
    meta = read_image_metadata(out)
    assert (meta["prompt"], meta["negative_prompt"]) == ("a cat: on a mat", "dog")
    settings = meta["settings"]
    assert settings["Steps"] == 3 and settings["Sampler"] == "DPM++ 2M Karras" and settings["CFG scale"] == 4.5
    assert settings["Schedule type"] == "Karras"
    assert settings["Seed"] == 7 and settings["Size"] == (64, 64) and settings["Clip skip"] == 2
    assert settings["Model hash"] == model_hash(model_file) and settings["Model"] == "tiny"
    recipe = meta["recipe"]
    assert recipe["model"] == {"name": "tiny", "hash": model_hash(model_file)}
    assert str(model_file.parent) not in read_image_metadata(out)["text"]["nijimi"]  # no path of this machine
    request = recipe["request"]
    assert (request["sampler"], request["schedule"], request["seed"]) == ("dpm++2m", "karras", 7)
    assert (request["batch"], request["guidance"]) == (1, 4.5)
    assert recipe["schedule"]["timestep_spacing"] == "leading" and recipe["versions"]["torch"] == torch.__version__
    code, text, err = run(capsys, "info", out)
    assert code == 0 and err == ""
    lines = text.splitlines()
    assert lines[:2] == ["Prompt: a cat: on a mat", "Negative prompt: dog"]
    assert "Sampler: DPM++ 2M Karras" in lines and "Schedule type: Karras" in lines
    assert "Seed: 7" in lines and "nijimi recipe:" in lines


def test_reproduce_finds_the_model_and_loras_by_name_and_hash(capsys, model_file, extras, tmp_path):
    """The recipe names the model and the LoRA (flag and tag) by name and hash; ``reproduce`` finds them in
    ``--models-dir`` / ``--lora-dir`` or next to the image, refuses a same-named file of another hash naming both
    hashes, and ``--record-paths`` records the paths too, so the files are found where they were."""
    made = tmp_path / "made"
    made.mkdir()
    first = made / "a.png"
    assert run(capsys, "generate", "a red cube <lora:ink:0.5>", "--model", model_file, "--lora-dir",
               extras["lora"].parent, "--lora", f"{extras['lora']}:0.7", "--seed", 5, *FAST, "--out", first)[0] == 0
    recipe = read_image_metadata(first)["recipe"]
    digest = model_hash(extras["lora"])
    assert recipe["loras"] == [{"name": "ink.safetensors", "hash": digest}] and recipe["lora_tags"] == {"ink": digest}
    assert recipe["request"]["loras"] == [["ink.safetensors", 0.7, 0.7]] and recipe["request"]["lora_dir"] is None
    for name in ("tiny.safetensors", "ink.safetensors"):  # next to the image
        (made / name).write_bytes((model_file.parent / name if name == "tiny.safetensors" else extras["lora"])
                                  .read_bytes())
    code, _, err = run(capsys, "reproduce", first, "--out", tmp_path / "b.png", "--quiet", "--lora-dir", made)
    assert code == 0, err
    assert np.array_equal(pixels(first), pixels(tmp_path / "b.png"))
    (made / "tiny.safetensors").write_bytes(b"other")
    code, _, err = run(capsys, "reproduce", first, "--out", tmp_path / "c.png", "--quiet", "--lora-dir", made)
    assert code == 2 and err.startswith(f"error: model 'tiny' with hash {model_hash(model_file)} not found in {made}")
    assert f"{made / 'tiny.safetensors'} has hash {model_hash(made / 'tiny.safetensors')}" in err
    assert run(capsys, "generate", "a red cube", "--model", model_file, "--seed", 5, *FAST, "--record-paths",
               "--out", tmp_path / "paths.png")[0] == 0
    assert read_image_metadata(tmp_path / "paths.png")["recipe"]["model"]["source"] == str(model_file)
    assert run(capsys, "reproduce", tmp_path / "paths.png", "--out", tmp_path / "d.png", "--quiet")[0] == 0


def test_vae_is_in_the_infotext_and_reproduced(capsys, model_file, tmp_path):
    """``--vae FILE``: A1111's ``VAE hash`` and ``VAE`` after ``Model``; ``reproduce`` decodes with the same file."""
    vae = VAE(CONFIG.vae)
    randomize(vae, 4)
    save_file({"first_stage_model." + k: v for k, v in vae.state_dict().items()}, tmp_path / "my-vae.safetensors")
    first, plain = tmp_path / "a.png", tmp_path / "plain.png"
    for out, extra in ((first, ["--vae", tmp_path / "my-vae.safetensors"]), (plain, [])):
        assert run(capsys, "generate", "a red cube", "--model", model_file, "--seed", 3, *FAST, *extra,
                   "--out", out)[0] == 0
    settings = read_image_metadata(first)["settings"]
    assert list(settings)[list(settings).index("Model") + 1:][:2] == ["VAE hash", "VAE"]
    assert settings["VAE hash"] == model_hash(tmp_path / "my-vae.safetensors")
    assert settings["VAE"] == "my-vae.safetensors" and "VAE" not in read_image_metadata(plain)["settings"]
    assert run(capsys, "reproduce", first, "--out", tmp_path / "b.png", "--quiet", "--models-dir",
               model_file.parent)[0] == 0
    assert np.array_equal(pixels(first), pixels(tmp_path / "b.png"))
    assert not np.array_equal(pixels(first), pixels(plain))


def test_batch_writes_numbered_files_and_never_overwrites(capsys, model_file, tmp_path):
    target = tmp_path / "shot.png"
    code, out, err = run(capsys, "generate", "a boat", "--model", model_file, "--seed", 10, "--batch", 3, *FAST,
                       "--out", target)
    paths = [tmp_path / f"shot-{i:02d}.png" for i in range(3)]
    assert code == 0 and out.split() == [str(p) for p in paths], err
    assert [read_image_metadata(p)["settings"]["Seed"] for p in paths] == [10, 11, 12]
    single = tmp_path / "single.png"
    assert run(capsys, "generate", "a boat", "--model", model_file, "--seed", 11, *FAST, "--out", single)[0] == 0
    difference = np.abs(pixels(paths[1]).astype(int) - pixels(single).astype(int))
    assert difference.max() <= 1  # batched convolutions round differently (~1e-5), a rare ±1 after uint8 rounding
    before = [p.read_bytes() for p in paths]
    code, out, err = run(capsys, "generate", "a ship", "--model", model_file, "--seed", 10, "--batch", 3, *FAST,
                         "--out", target)
    assert (code, out) == (2, "") and err == f"error: {paths[0]} exists; use --overwrite to replace it\n"
    assert [p.read_bytes() for p in paths] == before
    assert run(capsys, "generate", "a ship", "--model", model_file, "--seed", 10, "--batch", 3, *FAST, "--out",
               target, "--overwrite")[0] == 0
    assert [p.read_bytes() for p in paths] != before


def test_folder_output_numbers_on(capsys, model_file, tmp_path):
    folder = tmp_path / "out"
    assert run(capsys, "generate", "a kite", "--model", model_file, "--seed", 4, "--batch", 2, *FAST, "--out",
               folder)[0] == 0
    assert run(capsys, "generate", "a kite", "--model", model_file, "--seed", 4, *FAST, "--out", folder)[0] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["00000-4.png", "00001-5.png", "00002-4.png"]


def test_concurrent_writers_take_the_next_number_or_get_one_error(tmp_path):
    folder, named = tmp_path / "out", tmp_path / "one.png"
    image = Image.new("RGB", (8, 8))

    def write(i, barrier):
        [numbered] = output_paths(str(folder), GenerationRequest("x", seed=7), False)
        [single] = output_paths(str(named), GenerationRequest("x", seed=7), False)
        barrier.wait()  # every process has checked and chosen its names before any writes
        path = write_png(image, numbered, True, False, f"p{i}", None)
        try:
            return path, write_png(image, single, False, False, f"p{i}", None)
        except OutputExistsError as e:
            return path, str(e)

    results = in_processes(write, 4)
    assert sorted(path for path, _ in results) == [folder / f"{n:05d}-7.png" for n in range(4)]
    assert all(read_image_metadata(path)["parameters"] == f"p{i}" for i, (path, _) in enumerate(results))
    [winner] = [i for i, (_, single) in enumerate(results) if single == named]
    assert read_image_metadata(named)["parameters"] == f"p{winner}"
    assert [single for _, single in results].count(f"{named} exists; use --overwrite to replace it") == 3


def test_generate_that_loses_a_race_for_a_name_writes_nothing_or_numbers_on(capsys, model_file, tmp_path,
                                                                            monkeypatch):
    real = save_png

    def racing(image, path, *args):
        if path.name in ("shot-01.png", "00000-3.png"):
            path.write_bytes(b"theirs")  # another process got there after this one checked
        real(image, path, *args)

    monkeypatch.setattr("nijimi.cli.save_png", racing)
    target = tmp_path / "shot.png"
    code, out, err = run(capsys, "generate", "a boat", "--model", model_file, "--seed", 3, "--batch", 2, *FAST,
                         "--out", target)
    assert (code, out, err) == (2, "", f"error: {tmp_path / 'shot-01.png'} exists; use --overwrite to replace it\n")
    assert os.listdir(tmp_path) == ["shot-01.png"] and (tmp_path / "shot-01.png").read_bytes() == b"theirs"
    folder = tmp_path / "out"
    code, out, err = run(capsys, "generate", "a boat", "--model", model_file, "--seed", 3, *FAST, "--out", folder)
    assert (code, out) == (0, f"{folder / '00001-3.png'}\n"), err
    assert read_image_metadata(folder / "00001-3.png")["settings"]["Seed"] == 3


def test_convert_never_replaces_without_overwrite(capsys, model_file, tmp_path):
    dst = tmp_path / "existing.safetensors"
    dst.write_bytes(b"keep")
    assert run(capsys, "convert", model_file, dst) == (2, "", f"error: {dst} exists; use --overwrite to replace it\n")
    assert dst.read_bytes() == b"keep"
    assert run(capsys, "convert", model_file, dst, "--overwrite")[0] == 0
    assert dst.read_bytes() == model_file.read_bytes()


def test_random_seed_is_written_and_reproducible(capsys, model_file, tmp_path):
    out = tmp_path / "random.png"
    assert run(capsys, "generate", "a hill", "--model", model_file, *FAST, "--out", out)[0] == 0
    seed = read_image_metadata(out)["settings"]["Seed"]
    assert run(capsys, "generate", "a hill", "--model", model_file, "--seed", seed, *FAST, "--out",
               tmp_path / "fixed.png")[0] == 0
    assert np.array_equal(pixels(out), pixels(tmp_path / "fixed.png"))


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """An init image, a matching mask, a mask of another size, an unreadable image and a corrupt model."""
    files = {name: tmp_path / "inputs" / name for name in ("init.png", "mask.png", "small_mask.png", "broken.png",
                                                           "corrupt.safetensors")}
    files["init.png"].parent.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(files["init.png"])
    Image.new("L", (64, 64), 255).save(files["mask.png"])
    Image.new("L", (32, 32), 255).save(files["small_mask.png"])
    files["broken.png"].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    files["corrupt.safetensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return files


ERROR_CASES = {
    "size-not-multiple-of-8": (["a red cube", "--size", "60x64"], "width 60 must be a positive multiple of 8 pixels"),
    "size-negative": (["a red cube", "--size", "64x-8"], "--size '64x-8' is not WIDTHxHEIGHT"),
    "size-not-a-size": (["a red cube", "--size", "big"], "--size 'big' is not WIDTHxHEIGHT"),
    "missing-model": (["a red cube", "--model", "{tmp}/nope.safetensors"], "no such file or folder"),
    "corrupt-model": (["a red cube", "--model", "{inputs}/corrupt.safetensors"], "corrupt.safetensors"),
    "unknown-sampler": (["a red cube", "--sampler", "warp-drive"], "unknown sampler 'warp-drive'"),
    "unreadable-image": (["a red cube", "--init", "{inputs}/broken.png"], "broken.png: cannot read image"),
    "missing-image": (["a red cube", "--init", "{inputs}/gone.png"], "gone.png: image file not found"),
    "mask-size-mismatch": (["a red cube", "--init", "{inputs}/init.png", "--mask", "{inputs}/small_mask.png"],
                           "mask size 32x32 does not match the init image size 64x64"),
    "mask-without-image": (["a red cube", "--mask", "{inputs}/mask.png"], "a mask needs an init image"),
    "empty-prompt-with-cfg": ([""], "the prompt is empty"),
    "steps-zero": (["a red cube", "--steps", "0"], "steps 0 must be an integer from 1 to 1000"),
    "strength-above-1": (["a red cube", "--init", "{inputs}/init.png", "--strength", "1.5"],
                         "strength 1.5 must be a number within [0.0, 1.0]"),
    "strength-below-0": (["a red cube", "--strength", "-0.5"], "strength -0.5 must be a number within [0.0, 1.0]"),
    "batch-zero": (["a red cube", "--batch", "0"], "batch 0 must be an integer from 1 to 4096"),
    "guidance-nan": (["a red cube", "--guidance", "nan"], "guidance nan must be a finite number"),
    "eta-not-for-euler": (["a red cube", "--sampler", "euler", "--eta", "0.5"], "eta applies to ddim, euler-a"),
    "clip-skip-too-deep": (["a red cube", "--clip-skip", "5"], "clip_skip must be in [1, 2], got 5"),
    "vae-tile": (["a red cube", "--vae-tile", "12"], "VAE tile 12 must be a multiple of the VAE factor 8"),
    "attention-slice": (["a red cube", "--attention-slice", "-2"], "attention slice -2 must be an integer from 0"),
    "unknown-device": (["a red cube", "--device", "abacus"], "unknown device 'abacus'"),
}


@pytest.mark.parametrize(("argv", "message"), ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_errors_exit_2_with_one_line_and_no_file(capsys, model_file, inputs, tmp_path, argv, message):
    """``nijimi generate PROMPT …`` with one bad setting (the model downsamples by 16: the sizes it takes are
    multiples of 16). Run without --quiet, so a progress bar could not hide in the error output either."""
    prompt, *args = [a.format(tmp=tmp_path, inputs=inputs["init.png"].parent) for a in argv]
    code, out, err = run(capsys, "generate", prompt, "--model", model_file, "--steps", "2", "--size", "64x64",
                         "--seed", "1", "--out", tmp_path / "out" / "x.png", *args)
    assert (code, out) == (2, "")
    assert err.endswith("\n") and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_exits_2(capsys, model_file, tmp_path):
    code, _, err = run(capsys, "generate", "x", "--model", model_file, "--device", "cuda", *FAST, "--out",
                       tmp_path / "x.png")
    assert code == 2 and err.startswith("error: device cuda: CUDA is not available") and len(err.splitlines()) == 1


def test_reproduce_errors(capsys, model_file, tmp_path, inputs):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    code, _, err = run(capsys, "reproduce", plain, "--out", tmp_path / "r.png")
    assert code == 2 and err == f"error: {plain}: no generation metadata (a nijimi recipe, A1111 parameters or a " \
                                "ComfyUI graph)\n"
    made = tmp_path / "inpainted.png"
    assert run(capsys, "generate", "a door", "--model", model_file, "--init", inputs["init.png"], "--mask",
               inputs["mask.png"], "--seed", 1, "--steps", "2", "--quiet", "--out", made)[0] == 0
    inputs["init.png"].unlink()
    code, _, err = run(capsys, "reproduce", made, "--out", tmp_path / "r.png", "--models-dir", model_file.parent)
    assert code == 2 and "init.png: image file not found" in err and len(err.splitlines()) == 1
    code, _, err = run(capsys, "info", inputs["broken.png"])
    assert code == 2 and "broken.png: cannot read image" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.png").exists()


def test_python_m_nijimi_error_exit_code(model_file, tmp_path):
    """The installed entry point: a real process exits 2 with one error line on stderr."""
    result = subprocess.run([sys.executable, "-m", "nijimi", "generate", "a cube", "--model", str(model_file),
                             "--steps", "0", "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: steps 0 must be an integer from 1 to 1000"]
    assert not (tmp_path / "x.png").exists()


def test_doctor_prints_every_line(capsys):
    """Every fact gets its labelled line; the timings themselves are not asserted."""
    code, out, _ = run(capsys, "doctor")
    labels = [line.split(":")[0] for line in out.splitlines()]
    assert code == 0 and labels == ["CPU", "AVX2", "AVX-512", "AVX-512 BF16", "AMX BF16", "AMX tile", "physical cores",
                                    "logical CPUs", "torch threads", "torch", "matmul fp32/bf16 time",
                                    "conv2d fp32/bf16 time", "bf16 faster here"]


def test_samplers_lists_every_sampler_and_schedule_with_a1111s_labels(capsys):
    code, out, _ = run(capsys, "samplers")
    lines = out.splitlines()
    assert code == 0 and [line.split()[0] for line in lines[:-2]] == list(SAMPLER_SPECS)
    assert "dpm++2s      'DPM++ 2S'" in out and "uniform ('Model timesteps')" in lines[-2]
    assert lines[-1].startswith("uniform is the model's own timesteps; A1111's 'Uniform'")


def test_bad_nijimi_threads_is_one_error_line(capsys, monkeypatch):
    monkeypatch.setenv("NIJIMI_THREADS", "many")
    code, _, err = run(capsys, "samplers")
    assert code == 2 and err.splitlines() == ["error: NIJIMI_THREADS='many' must be a positive integer"]


# ---- the command itself and the training flags ----

def test_unknown_command_exits_nonzero(capsys):
    try:
        main(["no-such-command"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("argparse accepted an unknown command")


def test_python_m_nijimi_prints_version():
    out = subprocess.run([sys.executable, "-m", "nijimi", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("nijimi ")


def test_training_flags_are_generated_from_the_config_and_override_its_toml(tmp_path):
    recipe = tmp_path / "cn.toml"
    recipe.write_text('steps = 3\nlr = 0.5\ncondition = "canny"\n')
    args = build_parser().parse_args(["train-controlnet", "--config", str(recipe), "--steps=7", "--sample_count", "2",
                                      "--half"])
    cfg = build_config(ControlNetTrainConfig, config_values(args))
    assert (cfg.steps, cfg.lr, cfg.condition, cfg.sample_count, cfg.half) == (7, 0.5, "canny", 2, True)
    args = build_parser().parse_args(["train-adapter", "--type", "locon", "--text-encoder", "--rank", "4",
                                      "--min-snr-gamma=0", "--batch-size", "8", "--half=false"])
    cfg = build_config(AdapterTrainConfig, config_values(args))
    assert (cfg.type, cfg.text_encoder, cfg.rank, cfg.min_snr_gamma, cfg.batch_size, cfg.half) == (
        "locon", True, 4, 0.0, 8, False)
    run, vae, unet, _ = parse_config(config_values(build_parser().parse_args(
        ["train", "--config", "configs/embedded.toml", "--unet.steps=5", "--init", "model.safetensors"])))
    assert (unet.steps, run.init, run.model) == (5, "model.safetensors", "tiny")


@pytest.mark.parametrize("command", ["train", "train-adapter", "train-controlnet", "train-decoder"])
def test_an_unknown_training_key_is_one_error_line(command, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--no-such-key=1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --no-such-key=1 (see `nijimi --help`)\n"
    recipe = tmp_path / "bad.toml"
    recipe.write_text("no_such_key = 1\n")
    assert main([command, "--config", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {recipe}: unknown config key(s): no_such_key (known: ") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["generate", "x", "--vae-t", "32"], ["generate", "x", "--steps", "many"]])
def test_usage_errors_are_one_line_and_flags_are_never_abbreviated(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert argv[2] in err and err.endswith("--help`)\n")
