"""The A1111 field table without a server: each field lands on its request field, samplers and schedulers combine,
ignored fields warn only when their value would have mattered, and the server's own fields win."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image, PngImagePlugin

from nijimi.errors import ConfigError, SamplerError
from nijimi.server.a1111 import IMG2IMG, TXT2IMG, Limits, parse_call, png_info


def test_every_field_lands_on_its_request_field():
    call = parse_call({"prompt": "a cat", "negative_prompt": "dog", "steps": 7, "cfg_scale": 4.5, "seed": 9,
                       "subseed": 3, "subseed_strength": 0.25, "width": 48, "height": 40.0, "batch_size": 2,
                       "eta": 0.5, "sampler_name": "Euler a", "seed_resize_from_w": 64, "seed_resize_from_h": 32,
                       "n_iter": 3, "override_settings": {"CLIP_stop_at_last_layers": 2,
                                                          "sd_model_checkpoint": "sd15 [abc]"},
                       "override_settings_restore_afterwards": False, "save_images": True, "send_images": False,
                       "force_task_id": "task(1)"}, TXT2IMG, Limits())
    r = call.request
    assert (r.prompt, r.negative_prompt, r.steps, r.guidance, r.seed) == ("a cat", "dog", 7, 4.5, 9)
    assert (r.variation_seed, r.variation_strength, r.width, r.height, r.batch, r.eta) == (3, 0.25, 48, 40, 2, 0.5)
    assert (r.sampler.name, r.seed_resize, r.clip_skip) == ("euler-a", (64, 32), 2)
    assert (call.iterations, call.checkpoint, call.keep_checkpoint) == (3, "sd15 [abc]", True)
    assert (call.save_images, call.send_images, call.task_id, call.warnings) == (True, False, "task(1)", ())


def test_absent_and_null_fields_take_the_request_defaults():
    r = parse_call({"prompt": "x", "steps": None, "seed": -1, "subseed": -1, "seed_resize_from_w": -1}, TXT2IMG,
                   Limits()).request
    assert (r.steps, r.guidance, r.width, r.sampler, r.variation_seed, r.seed_resize) == (20, None, None, None, None,
                                                                                           None)  # None: the model's


@pytest.mark.parametrize("sampler, scheduler, choice", [
    ("DPM++ 2M", "karras", ("dpm++2m", "karras")), ("DPM++ 2M Karras", None, ("dpm++2m", "karras")),
    ("DPM++ 2M Karras", "karras", ("dpm++2m", "karras")), ("Euler", "automatic", ("euler", "uniform")),
    (None, "exponential", ("dpm++2m", "exponential")), ("DDIM", "Trailing", ("ddim", "trailing")),
    ("DPM++ SDE", "Align Your Steps", ("dpm++sde", "align_your_steps")), ("LMS", None, ("lms", "uniform")),
])
def test_sampler_and_scheduler_combine(sampler, scheduler, choice):
    body = {"prompt": "x", "sampler_name": sampler, "scheduler": scheduler}
    chosen = parse_call(body, TXT2IMG, Limits()).request.sampler
    assert (chosen.base, chosen.schedule) == choice


def test_hires_fields_when_enabled():
    body = {"prompt": "x", "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent (nearest)",
            "hr_second_pass_steps": 3, "denoising_strength": 0.4, "hr_sampler_name": "Euler", "hr_prompt": "y"}
    r = parse_call(body, TXT2IMG, Limits()).request
    assert (r.hires_scale, r.hires_size, r.hires_steps, r.hires_upscaler, r.hires_denoise, r.hires_sampler.base,
            r.hires_prompt) == (1.5, None, 3, "Latent (nearest)", 0.4, "euler", "y")
    r = parse_call({**body, "hr_resize_x": 96, "hr_sampler_name": "Use same sampler"}, TXT2IMG, Limits()).request
    assert (r.hires_size, r.hires_sampler) == ((96, 0), None)
    assert parse_call({**body, "enable_hr": False}, TXT2IMG, Limits()).request.hires_scale is None
    with pytest.raises(ConfigError, match="hr_scale must be a number"):
        parse_call({**body, "hr_scale": "2"}, TXT2IMG, Limits())


def test_conflicting_sampler_and_scheduler_are_refused():
    with pytest.raises(SamplerError, match="names the schedule 'karras', but the schedule is 'exponential'"):
        parse_call({"prompt": "x", "sampler_name": "Euler Karras", "scheduler": "exponential"}, TXT2IMG, Limits())


def test_ignored_fields_warn_only_when_they_would_matter():
    quiet = {"prompt": "x", "restore_faces": False, "tiling": False, "mask_blur": 4, "styles": [], "script_args": [],
             "alwayson_scripts": {}, "hr_scale": 2, "denoising_strength": 0.7, "s_tmax": None, "do_not_save_grid": True}
    assert parse_call(quiet, TXT2IMG, Limits()).warnings == ()
    call = parse_call({"prompt": "x", "tiling": True, "init_images": ["x"], "styles": ["a"]}, TXT2IMG, Limits())
    assert call.warnings == ("init_images applies to img2img only; ignored",
                             "tiling is not supported by nijimi; ignored",
                             "styles is not supported by nijimi; ignored")


def test_img2img_fields_and_the_servers_own_fields(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), "red").save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    call = parse_call({"prompt": "x", "init_images": [b64, b64], "denoising_strength": 0.4, "lora_dir": "/etc"},
                      IMG2IMG, Limits(), {"lora_dir": tmp_path})
    assert call.request.init_image.size == (16, 8) and call.request.strength == 0.4
    assert call.request.lora_dir == str(tmp_path)
    assert call.warnings == ("init_images: only the first of 2 is used",
                             "lora_dir is not an A1111 field nijimi knows; ignored")
    with pytest.raises(ConfigError, match="batch_size 2 × n_iter 200 must be from 1 to 256 images"):
        parse_call({"prompt": "x", "batch_size": 2, "n_iter": 200}, TXT2IMG, Limits())


def test_png_info_reads_a1111_infotext():
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, "
                                "Size: 512x768")
    info.add_text("prompt", "{}")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    answer = png_info({"image": base64.b64encode(buffer.getvalue()).decode()}, Limits())
    assert answer["items"] == {"prompt": "{}"}
    assert answer["parameters"] == {"Prompt": "a cat", "Negative prompt": "dog", "Steps": 20, "Sampler": "Euler a",
                                    "CFG scale": 7.0, "Seed": 1, "Size-1": 512, "Size-2": 768}
