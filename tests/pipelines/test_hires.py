"""A1111's hires fix: the pipeline's output equals the computation written out here from the pipeline's public pieces
(first pass → upscale → img2img pass of A1111's step rule from fresh seed noise), for every upscaler; A1111's target
sizes; the infotext A1111 writes, read back and replayed; bad values refused in one line naming the flag."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nijimi.cli import main
from nijimi.errors import ConfigError
from nijimi.io.imagemeta import read_image_metadata
from nijimi.io.pngmeta import parse_parameters
from nijimi.pipelines import edit, hires
from nijimi.pipelines.control import ControlRun
from nijimi.pipelines.images import to_tensor
from nijimi.pipelines.request import GenerationRequest

PROMPT, NEGATIVE = "a watercolour of a lighthouse", "dark"
# A1111's hr upscalers (shared.latent_upscale_modes and the Lanczos / Nearest upscalers), written out independently.
LATENT_MODES = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
PIXEL_FILTERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}


def reference(pipe, *, seed, batch, steps, sampler, width, height, hires_steps, denoise, upscaler, latent_size, crop,
              guidance=5.0):
    """The hires fix by hand: returns the final pixels (B, 3, H, W) and the σ's of the second pass."""
    first = pipe.generate(PROMPT, NEGATIVE, seed=seed, batch=batch, steps=steps, sampler=sampler, guidance=guidance,
                          width=width, height=height, vae_tile=0, attention_slice=0)
    if upscaler in LATENT_MODES:
        mode, antialias = LATENT_MODES[upscaler]
        up = F.interpolate(first.latents, size=latent_size, mode=mode, antialias=antialias)
    else:
        size = (latent_size[1] * 8, latent_size[0] * 8)
        images = [Image.fromarray((255.0 * a).astype(np.uint8)).resize(size, PIXEL_FILTERS[upscaler])
                  for a in first.pixels.permute(0, 2, 3, 1).numpy()]  # 8 bits, truncated, as A1111 does
        with torch.no_grad():
            moments = pipe.model.vae.encode(torch.cat([to_tensor(image, *size) for image in images]))
        up = moments.mean * pipe.model.config.scaling_factor
    top, bottom, left, right = crop
    up = up[:, :, top:up.shape[2] - bottom, left:up.shape[3] - right]
    total = int(hires_steps / min(denoise, 0.999))  # A1111's setup_img2img_steps: the last hires_steps of total
    start = total - hires_steps
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    noise = torch.cat([torch.randn((1, *up.shape[1:]), generator=g) for g in generators])
    request = first.request.replace(steps=total, width=up.shape[3] * 8, height=up.shape[2] * 8)
    sigmas = request.sampler.sigmas(pipe.model.config.schedule, total)
    begin = edit.Start(start, up + noise * sigmas[start])
    conds = pipe.conditioner.step_conditioning(PROMPT, NEGATIVE, total, None, True)
    model = pipe.model_stack(request, conds, begin, ControlRun((), start, total))
    with torch.inference_mode():
        x = request.sampler.fn(model, begin.latent, sigmas[start:],
                               noise=request.sampler.noise(begin.latent, float(sigmas[0]), generators))
    return pipe.decode(x), sigmas[start:]


@pytest.mark.parametrize(("upscaler", "sampler", "batch", "size", "scale", "hires_size"), [
    ("Latent", "euler", 1, (64, 64), 2.0, None),
    ("Latent (antialiased)", "euler", 1, (64, 64), 1.5, None),
    ("Latent (bicubic)", "euler", 1, (64, 64), 1.5, None),
    ("Latent (bicubic antialiased)", "euler", 1, (64, 64), 1.5, None),
    ("Latent (nearest)", "euler", 1, (64, 64), 1.5, None),
    ("Latent (nearest-exact)", "euler-a", 2, (64, 64), 1.5, None),
    ("Lanczos", "euler", 1, (64, 64), 1.5, None),
    ("Nearest", "euler-a", 2, (64, 64), 1.3, None),
    ("Latent", "euler", 1, (64, 96), None, (128, 120)),
    ("Lanczos", "euler", 1, (64, 96), None, (0, 120)),
], ids=lambda v: str(v))
def test_hires_equals_the_computation_by_hand(sd_nijimi, upscaler, sampler, batch, size, scale, hires_size):
    seen = []
    ours = sd_nijimi.generate(PROMPT, NEGATIVE, seed=7, batch=batch, steps=3, sampler=sampler, guidance=5.0,
                              width=size[0], height=size[1], hires_scale=scale, hires_size=hires_size, hires_steps=4,
                              hires_denoise=0.7, hires_upscaler=upscaler, vae_tile=0, attention_slice=0,
                              callback=lambda info: seen.append((info.i, info.steps, info.sigma)))
    if hires_size == (128, 120):  # 64x96 covers 128x120 at 128x192: 24 latent rows, (192 - 120) / 8 = 9 cut, 4 + 5
        latent, crop = (24, 16), (4, 5, 0, 0)
    elif hires_size == (0, 120):  # width 120·64/96 = 80
        latent, crop = (15, 10), (0, 0, 0, 0)
    else:  # int(64 × 1.3) = 83 → 80 pixels, 10 latent cells
        latent, crop = (int(size[1] * scale) // 8,) * 2, (0, 0, 0, 0)
    theirs, sigmas = reference(sd_nijimi, seed=7, batch=batch, steps=3, sampler=sampler, width=size[0],
                               height=size[1], hires_steps=4, denoise=0.7, upscaler=upscaler, latent_size=latent,
                               crop=crop)
    assert ours.pixels.shape == theirs.shape == (batch, 3, (latent[0] - crop[0] - crop[1]) * 8,
                                                 (latent[1] - crop[2] - crop[3]) * 8)
    assert (ours.pixels - theirs).abs().max() <= 1e-5
    assert ours.images[0].size == (theirs.shape[3], theirs.shape[2])
    assert (ours.request.width, ours.request.height, ours.request.hires_upscaler) == (*size, upscaler)
    # 3 first-pass steps, then exactly hires_steps = 4 of int(4 / 0.7) = 5, from the σ at index 1
    assert [(i, n) for i, n, _ in seen] == [(0, 3), (1, 3), (2, 3), (0, 4), (1, 4), (2, 4), (3, 4)]
    assert seen[3][2] == pytest.approx(float(sigmas[0]))


def test_hires_steps_zero_runs_steps_and_full_denoise_the_whole_schedule(sd_nijimi):
    seen = []
    sd_nijimi.generate(PROMPT, seed=1, steps=3, sampler="euler", width=64, height=64, hires_scale=1.5,
                       hires_denoise=1.0, callback=lambda info: seen.append((info.steps, info.sigma)))
    full = GenerationRequest("x", sampler="euler").sampler.sigmas(sd_nijimi.model.config.schedule, 3)
    assert [n for n, _ in seen] == [3] * 6 and seen[3][1] == pytest.approx(float(full[0]))


@pytest.mark.parametrize(("first", "scale", "size", "factor", "expected"), [
    ((512, 512), 2.0, None, 8, ((128, 128), (0, 0, 0, 0), 1024, 1024)),
    ((512, 768), 1.5, None, 8, ((144, 96), (0, 0, 0, 0), 768, 1152)),
    ((520, 512), 1.3, None, 8, ((83, 84), (0, 0, 0, 0), 672, 664)),  # int(676.0) → 672, int(665.6) → 664
    ((512, 768), None, (1024, 1024), 8, ((192, 128), (32, 32, 0, 0), 1024, 1024)),
    ((512, 768), None, (1024, 1016), 8, ((192, 128), (32, 33, 0, 0), 1024, 1016)),
    ((768, 512), None, (1024, 1024), 8, ((128, 192), (0, 0, 32, 32), 1024, 1024)),
    ((512, 768), None, (1024, 0), 8, ((192, 128), (0, 0, 0, 0), 1024, 1536)),
    ((512, 768), None, (0, 640), 8, ((80, 53), (0, 0, 0, 0), 424, 640)),  # 640·512/768 = 426 → 424
    ((512, 768), 3.0, (1024, 0), 8, ((192, 128), (0, 0, 0, 0), 1024, 1536)),  # a size wins over a scale
    ((64, 64), 1.5, None, 4, ((24, 24), (0, 0, 0, 0), 96, 96)),  # the embedded model's factor-4 VAE
    ((64, 64), 1.3, None, 4, ((20, 20), (0, 0, 0, 0), 80, 80)),  # int(83.2) → 80, a multiple of 8
])
def test_target_sizes_are_a1111s(first, scale, size, factor, expected):
    result = hires.hires_size(*first, scale, size, factor)
    assert (result.upscaled, result.crop, result.width, result.height) == expected


@pytest.mark.parametrize(("steps", "denoise", "expected"), [
    (20, 0.7, (28, 8)), (10, 0.5, (20, 10)), (4, 0.7, (5, 1)), (20, 1.0, (20, 0)), (3, 0.35, (8, 5))])
def test_the_second_pass_runs_the_last_n_steps_of_n_over_denoise(steps, denoise, expected):
    assert hires.hires_schedule(steps, denoise) == expected


def test_the_cli_writes_a1111s_fields_reads_them_back_and_reproduces(capsys, sd_folder, tmp_path):
    out = tmp_path / "h.png"
    argv = ["generate", PROMPT, "--model", sd_folder, "--seed", 5, "--steps", 3, "--size", "64x64", "--sampler",
            "euler", "--hires", 1.5, "--hires-steps", 2, "--hires-denoise", 0.6, "--hires-upscaler",
            "latent (bicubic)", "--hires-sampler", "Euler a", "--hires-prompt", "a lighthouse, sharp", "--out", out]
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^generate 100% .* 3/3", err, re.M) and re.search(r"^hires 100% .* 2/2", err, re.M)
    meta = read_image_metadata(out)
    assert meta["parameters"].endswith(
        "Size: 64x64, Model: model, Denoising strength: 0.6, Hires sampler: Euler a, "
        'Hires prompt: "a lighthouse, sharp", Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (bicubic), '
            "RNG: CPU")
    with Image.open(out) as image:
        assert image.size == (96, 96)
    request = GenerationRequest.from_dict(meta["recipe"]["request"])
    read = hires.request_fields(meta["settings"])
    assert read == {"hires_scale": 1.5, "hires_size": None, "hires_steps": 2, "hires_upscaler": "Latent (bicubic)",
                    "hires_sampler": "Euler a", "hires_prompt": "a lighthouse, sharp", "hires_negative_prompt": "",
                    "hires_denoise": 0.6}
    replayed = GenerationRequest(PROMPT, **read)
    assert {k: getattr(replayed, k) for k in read} == {k: getattr(request, k) for k in read}
    again = tmp_path / "again.png"
    assert main(["reproduce", str(out), "--out", str(again), "--quiet", "--models-dir", str(sd_folder.parent)]) == 0
    with Image.open(out) as a, Image.open(again) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_an_a1111_resize_infotext_reads_back():
    text = ("a castle\nNegative prompt: fog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
            "Seed: 1, Size: 512x768, Denoising strength: 0.45, Hires resize: 1024x1024, Hires upscaler: Lanczos")
    fields = hires.request_fields(parse_parameters(text)["settings"])
    request = GenerationRequest("a castle", width=512, height=768, **fields)
    assert (request.hires_size, request.hires_scale, request.hires_steps, request.hires_denoise,
            request.hires_upscaler) == ((1024, 1024), None, 0, 0.45, "Lanczos")
    assert hires.request_fields({"Steps": 20}) == {}


@pytest.mark.parametrize(("changes", "message"), [
    ({"hires_scale": 0.5}, "hires scale (--hires) 0.5 must be a number within [1.0, 4.0]"),
    ({"hires_scale": 4.5}, "hires scale (--hires) 4.5 must be a number within [1.0, 4.0]"),
    ({"hires_scale": True}, "hires scale (--hires) True"),
    ({"hires_size": (100, 64)}, "hires size (100, 64) (--hires-size) must be WIDTHxHEIGHT in multiples of 8"),
    ({"hires_size": (0, 0)}, "hires size (0, 0) (--hires-size)"),
    ({"hires_size": (9000, 8)}, "hires size (9000, 8) (--hires-size)"),
    ({"hires_steps": -1}, "hires steps (--hires-steps) -1 must be an integer from 0 to 1000"),
    ({"hires_denoise": 0}, "hires denoise (--hires-denoise) 0 must be a number within [0.01, 1.0]"),
    ({"hires_denoise": 1.5}, "hires denoise (--hires-denoise) 1.5"),
    ({"hires_upscaler": "R-ESRGAN 4x+"}, "unknown hires upscaler 'R-ESRGAN 4x+' (--hires-upscaler); known: Latent,"),
    ({"hires_sampler": "warp"}, "hires sampler (--hires-sampler): unknown sampler 'warp'"),
    ({"hires_sampler": 3}, "hires sampler 3 (--hires-sampler) must be a sampler name"),
    ({"hires_scale": 2, "hires_steps": 800, "hires_denoise": 0.5},
     "hires steps 800 at denoise 0.5 (--hires-steps, --hires-denoise) make a schedule of 1600 steps"),
    ({"hires_scale": 4, "width": 4096, "height": 2048},
     "--hires 4 on a 4096x2048 first pass makes a 16384x8192 image; its sides must be from 8 to 8192 pixels"),
])
def test_bad_values_are_refused_naming_the_flag(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        GenerationRequest("a", **changes)


def test_the_cli_says_one_line(capsys):
    assert main(["generate", "a", "--hires", "0.5"]) == 2
    assert capsys.readouterr().err == "error: hires scale (--hires) 0.5 must be a number within [1.0, 4.0]\n"


def test_what_the_hires_fix_cannot_take(sd_nijimi, inpaint_nijimi, picture):
    with pytest.raises(ConfigError, match=re.escape("the hires fix (--hires, --hires-size) is for text to image; "
                                                    "it takes no --init image")):
        sd_nijimi.generate("a", init_image=picture, hires_scale=2)
    with pytest.raises(ConfigError, match=re.escape("the hires fix cannot run an inpainting model (9-channel U-Net)")):
        inpaint_nijimi.generate("a", hires_scale=2)
