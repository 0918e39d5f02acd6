"""ControlNet generation end to end against diffusers: the small random SD model of conftest.py plus random
ControlNets, each saved by nijimi as a diffusers folder and run through diffusers' StableDiffusionControlNetPipeline
(and its img2img twin) and through ``Pipeline.generate(control=…)`` with the same seeds: the same pixels for one
ControlNet, two at once with start/end windows, guess mode and img2img. A ControlNet fresh from ``from_unet`` (zero
convolutions at zero) leaves the image bit-identical to the uncontrolled one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as DiffusersControlNet
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
)
from PIL import Image, ImageDraw

from nijimi.errors import ConfigError, ImageError
from nijimi.io.controlnet import save_diffusers, save_original
from nijimi.models.controlnet import ControlNetModel
from nijimi.pipelines.control import ControlUnit
from nijimi.pipelines.control_maps import parse_control_spec, prepare_control_map
from nijimi.pipelines.pipeline import load

TOLERANCE = 1e-4  # max |nijimi − diffusers| on pixels in [0, 1], fp32 (the issue asks 1e-3; measured ≤ 6e-6)
PROMPT, NEGATIVE = "a red cube on a blue sphere", "blurry"


def random_controlnet(unet, seed: int) -> ControlNetModel:
    """The paper's init from ``unet`` plus N(0, 0.05²) on every weight, so the zero convolutions matter."""
    model = ControlNetModel.from_unet(unet, generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval().requires_grad_(False)


def control_picture(seed: int, size: tuple[int, int] = (80, 48)) -> Image.Image:
    """White shapes on black at another size than the output (so both sides resize it)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, size[0] - 16), rng.integers(0, size[1] - 16)
        draw.ellipse((x, y, x + 16, y + 16), fill=(255, 255, 255))
    return image


@pytest.fixture(scope="module")
def controlnets(sd_nijimi, tmp_path_factory):
    """Two random ControlNets and their diffusers twins (loaded from the folders nijimi's save_diffusers wrote)."""
    pairs = []
    for seed in (3, 4):
        model = random_controlnet(sd_nijimi.model.unet, seed)
        folder = tmp_path_factory.mktemp("controlnet") / f"cn{seed}"
        save_diffusers(model, folder)
        pairs.append((model, DiffusersControlNet.from_pretrained(folder).eval()))
    return pairs


def diffusers_pipe(sd_diffusers, nets, cls=StableDiffusionControlNetPipeline):
    scheduler = EulerDiscreteScheduler.from_config(sd_diffusers.scheduler.config)
    components = {k: v for k, v in sd_diffusers.components.items() if k != "scheduler"}
    pipe = cls(**components, scheduler=scheduler, controlnet=nets if len(nets) > 1 else nets[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seed: int, batch: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


# (scales, starts, ends, guess mode, cfg, batch)
CASES = {
    "one": ([0.8], [0.0], [1.0], False, 6.0, 2),
    "two-windows": ([0.7, 1.2], [0.0, 0.4], [0.6, 1.0], False, 6.0, 1),
    "guess-two": ([1.0, 0.5], [0.0, 0.2], [1.0, 1.0], True, 5.0, 1),
    "guess-unguided": ([0.9], [0.0], [1.0], True, 1.0, 1),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_controlnet_txt2img_equals_diffusers(sd_nijimi, sd_diffusers, controlnets, max_abs, case):
    scales, starts, ends, guess, cfg, batch = CASES[case]
    count = len(scales)
    pictures = [control_picture(i) for i in range(count)]
    theirs = diffusers_pipe(sd_diffusers, [twin for _, twin in controlnets[:count]])(
        PROMPT, pictures if count > 1 else pictures[0], height=64, width=64, num_inference_steps=5,
        guidance_scale=cfg, negative_prompt=NEGATIVE, num_images_per_prompt=batch, generator=generators(9, batch),
        controlnet_conditioning_scale=scales if count > 1 else scales[0], guess_mode=guess,
        control_guidance_start=starts, control_guidance_end=ends, output_type="np").images
    units = [ControlUnit(model, prepare_control_map(p, 64, 64), s, a, b, guess)
             for (model, _), p, s, a, b in zip(controlnets, pictures, scales, starts, ends, strict=False)]
    ours = sd_nijimi.generate(PROMPT, NEGATIVE, steps=5, sampler="euler", guidance=cfg, seed=9, batch=batch,
                              width=64, height=64, control=units)
    plain = sd_nijimi.generate(PROMPT, NEGATIVE, steps=5, sampler="euler", guidance=cfg, seed=9, batch=batch,
                               width=64, height=64)
    assert max_abs(ours.pixels, theirs) <= TOLERANCE
    assert (ours.pixels - plain.pixels).abs().max() > 0.02  # the control changed the picture
    assert ours.request.control == tuple(units)


def test_controlnet_img2img_counts_the_window_over_the_steps_run(sd_nijimi, sd_diffusers, controlnets, picture,
                                                                  max_abs):
    """Strength 0.6 of 5 steps runs 3; ``end=0.5`` keeps the ControlNet on the first of them only (diffusers'
    ControlNet img2img counts the same way)."""
    model, twin = controlnets[0]
    pipe = diffusers_pipe(sd_diffusers, [twin], StableDiffusionControlNetImg2ImgPipeline)
    theirs = pipe(PROMPT, picture, control_picture(5), negative_prompt=NEGATIVE, strength=0.6, num_inference_steps=5,
                  guidance_scale=5.0, controlnet_conditioning_scale=1.1, control_guidance_end=0.5, height=64,
                  width=64, generator=generators(2, 1), output_type="np").images
    unit = ControlUnit(model, prepare_control_map(control_picture(5), 64, 64), 1.1, end=0.5)
    ours = sd_nijimi.generate(PROMPT, NEGATIVE, steps=5, sampler="euler", guidance=5.0, seed=2, init_image=picture,
                              strength=0.6, control=[unit])
    plain = sd_nijimi.generate(PROMPT, NEGATIVE, steps=5, sampler="euler", guidance=5.0, seed=2, init_image=picture,
                               strength=0.6)
    assert max_abs(ours.pixels, theirs) <= TOLERANCE
    assert (ours.pixels - plain.pixels).abs().max() > 0.02  # counted over all 5 steps, no step would be steered


def test_fresh_controlnet_leaves_the_image_bit_identical(sd_nijimi):
    """from_unet's zero convolutions add exact zeros, in guided and unguided runs, guess mode or not."""
    fresh = ControlNetModel.from_unet(sd_nijimi.model.unet, generator=torch.Generator().manual_seed(0)).eval()
    hint = prepare_control_map(control_picture(1), 64, 64)
    for cfg, guess in ((6.0, False), (6.0, True), (1.0, False)):
        kwargs = {"steps": 4, "sampler": "euler-a", "guidance": cfg, "seed": 3, "width": 64, "height": 64}
        plain = sd_nijimi.generate(PROMPT, NEGATIVE, **kwargs)
        steered = sd_nijimi.generate(PROMPT, NEGATIVE, control=[ControlUnit(fresh, hint, 1.0, guess_mode=guess)],
                                     **kwargs)
        assert torch.equal(plain.pixels, steered.pixels)


def test_a_spec_is_loaded_with_its_map_at_the_output_size(sd_nijimi, controlnets, tmp_path):
    """``generate(control=[spec])`` loads the file and makes the map at the output size (64×48 here): the same pixels
    as a unit made by hand, and the spec's fields in the settings."""
    save_original(controlnets[1][0], tmp_path / "cn.safetensors")
    control_picture(2).save(tmp_path / "map.png")
    spec = parse_control_spec(f"model={tmp_path / 'cn.safetensors'},image={tmp_path / 'map.png'},pre=canny,"
                              "low=40,high=120,resize=crop,scale=0.7,guess=true")
    kwargs = {"steps": 3, "sampler": "euler", "guidance": 4.0, "seed": 1, "width": 64, "height": 48}
    by_spec = sd_nijimi.generate(PROMPT, NEGATIVE, control=[spec], **kwargs)
    hint = prepare_control_map(control_picture(2), 64, 48, resize="crop", pre="canny", low=40, high=120)
    by_hand = sd_nijimi.generate(PROMPT, NEGATIVE, control=[ControlUnit(controlnets[1][0], hint, 0.7,
                                                                        guess_mode=True)], **kwargs)
    assert torch.equal(by_spec.pixels, by_hand.pixels) and by_spec.pixels.shape == (1, 3, 48, 64)
    assert by_spec.request.control == (spec,)


def test_bf16_pipeline_loads_specs_in_bf16_and_refuses_fp32_units(sd_folder, sd_nijimi, controlnets, tmp_path):
    save_original(controlnets[0][0], tmp_path / "cn.safetensors")
    control_picture(3).save(tmp_path / "map.png")
    spec = parse_control_spec(f"model={tmp_path / 'cn.safetensors'},image={tmp_path / 'map.png'}")
    kwargs = {"steps": 3, "sampler": "euler", "guidance": 4.0, "seed": 4, "width": 64, "height": 64, "control": [spec]}
    reference = sd_nijimi.generate(PROMPT, NEGATIVE, **kwargs)
    pipe = load(sd_folder, dtype=torch.bfloat16)
    error = (pipe.generate(PROMPT, NEGATIVE, **kwargs).pixels - reference.pixels).abs()
    assert float(error.mean()) < 0.02 and 0 < float(error.max()) < 0.2
    fp32 = ControlUnit(controlnets[0][0], prepare_control_map(control_picture(3), 64, 64))
    with pytest.raises(ConfigError, match="ControlNet 0 holds torch.float32 weights, the pipeline runs torch.bfloat16"):
        pipe.generate(PROMPT, steps=2, width=64, height=64, control=[fp32])
    assert next(controlnets[0][0].parameters()).dtype == torch.float32  # the unit's model was left alone


def test_control_errors_name_the_mismatch(sd_nijimi, controlnets):
    model = controlnets[0][0]
    wrong_size = ControlUnit(model, prepare_control_map(control_picture(0), 64, 48))
    with pytest.raises(ImageError, match="control map 0 is 64×48, the output is 64×64"):
        sd_nijimi.generate(PROMPT, steps=2, width=64, height=64, control=[wrong_size])
    finer = ControlNetModel.from_unet(sd_nijimi.model.unet, hint_widths=(16, 32, 96))  # maps 4× the latents
    with pytest.raises(ConfigError, match="ControlNet 1 reads maps 4× the latent size, but this model's latents are "
                                          "1/8 of the image"):
        sd_nijimi.generate(PROMPT, steps=2, width=64, height=64,
                           control=[ControlUnit(model, prepare_control_map(control_picture(0), 64, 64)),
                                    ControlUnit(finer, prepare_control_map(control_picture(0), 64, 64))])
    other = dataclasses.replace(model.config.unet, context_dim=16)
    alien = ControlNetModel(dataclasses.replace(model.config, unet=other))
    with pytest.raises(ConfigError, match="ControlNet does not fit the U-Net .*context_dim 16 vs 32"):
        sd_nijimi.generate(PROMPT, steps=2, width=64, height=64,
                           control=[ControlUnit(alien, prepare_control_map(control_picture(0), 64, 64))])
