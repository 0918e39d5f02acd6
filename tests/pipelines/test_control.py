"""Control maps (resize modes vs diffusers' VaeImageProcessor, canny/invert/map), the --control flag, and the
summed residuals in a U-Net call vs diffusers' UNet2DConditionModel fed by its ControlNetModels."""

from __future__ import annotations

import cv2
import diffusers
import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from helpers import randomize, rel_err, save_rotated
from PIL import Image

from nijimi.diffusion.guidance import GuidedNetwork
from nijimi.errors import ConfigError, ImageError
from nijimi.io.controlnet import save_original
from nijimi.io.keys.controlnet import controlnet_config_to_diffusers, controlnet_key_table
from nijimi.io.keys.unet import unet_config_to_diffusers, unet_key_table
from nijimi.models.controlnet import ControlNetConfig, ControlNetModel
from nijimi.models.unet import UNetConfig, UNetModel
from nijimi.pipelines.control import (
    ControlRun,
    ControlUnit,
    control_residuals,
    load_control_unit,
    step_fraction,
    with_controlnets,
)
from nijimi.pipelines.control_maps import ControlSpec, parse_control_spec, prepare_control_map

UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2), num_heads=4,
                  context_dim=32, norm_groups=16)
CONTROL = ControlNetConfig(UNET)
TOLERANCE = 1e-4  # max |nijimi − diffusers| / max |diffusers|, fp32


def gradient_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour ramps plus a little noise, so every resampling difference shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) % 97 * 2], axis=-1)
    return Image.fromarray(np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8))


# ---- control maps -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [(96, 40), (30, 70), (64, 48), (200, 150)], ids=["wide", "tall", "same", "big"])
@pytest.mark.parametrize(("mode", "theirs"), [("resize", "default"), ("crop", "crop"), ("fill", "fill")])
def test_resize_modes_equal_diffusers_image_processor(source: tuple[int, int], mode: str, theirs: str) -> None:
    image = gradient_image(*source)
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)  # ControlNet's
    want = processor.preprocess(image, height=48, width=64, resize_mode=theirs)
    got = prepare_control_map(image, 64, 48, resize=mode)
    assert got.shape == (1, 3, 48, 64) and got.dtype == torch.float32
    assert torch.equal(got, want)


def test_crop_and_fill_keep_the_aspect_ratio() -> None:
    """An 80×40 image with a red left quarter and green top quarter, onto 32×32: ``resize`` squeezes it (red up to
    column 8, green up to row 8), ``crop`` cuts the red quarter away, ``fill`` shrinks the image into rows 8…24 and
    stretches its green top row over the band above it (green up to row 12)."""
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, :20, 0] = 255
    array[:10, :, 1] = 255
    maps = {mode: prepare_control_map(Image.fromarray(array), 32, 32, resize=mode)[0] for mode in ("resize", "crop",
                                                                                                     "fill")}
    red_columns = {mode: int((m[0, 16] > 0.5).sum()) for mode, m in maps.items()}
    green_rows = {mode: int((m[1, :, 16] > 0.5).sum()) for mode, m in maps.items()}
    assert red_columns == {"resize": 8, "crop": 0, "fill": 8}
    assert green_rows == {"resize": 8, "crop": 8, "fill": 12}


def test_canny_is_opencv_canny_of_the_resized_image() -> None:
    array = np.zeros((64, 64, 3), np.uint8)
    array[16:48, 20:44] = (200, 120, 30)
    got = prepare_control_map(Image.fromarray(array), 64, 64, pre="canny", low=100, high=200)[0]
    want = cv2.Canny(array, 100, 200) / 255.0  # lllyasviel's annotator: cv2.Canny on the RGB image
    assert all(torch.equal(got[c], torch.from_numpy(want).float()) for c in range(3))
    rows, cols = np.nonzero(want)
    on_border = (np.isin(rows, [15, 16, 47, 48]) & (cols >= 19) & (cols <= 44)) | \
                (np.isin(cols, [19, 20, 43, 44]) & (rows >= 15) & (rows <= 48))
    assert on_border.all() and len(rows) == 2 * 24 + 2 * 30  # the one-pixel outline of the 32×24 box, nothing else
    quiet = prepare_control_map(Image.fromarray(array), 64, 64, pre="canny", low=5000, high=9000)
    assert quiet.max() == 0


def test_resize_none_keeps_the_pixels() -> None:
    image = gradient_image(40, 24, seed=4)
    want = torch.from_numpy(np.asarray(image).astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(prepare_control_map(image, 40, 24, resize="none")[0], want)


def test_invert_and_map() -> None:
    image = gradient_image(40, 24, seed=3)
    plain = prepare_control_map(image, 40, 24)
    inverted = prepare_control_map(image, 40, 24, pre="invert")
    want = torch.from_numpy((255 - np.asarray(image)).astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(inverted[0], want)
    assert torch.allclose(plain + inverted, torch.ones_like(plain), atol=1e-6)


def test_map_file_is_turned_upright_by_its_exif_orientation(tmp_path) -> None:
    image = np.asarray(gradient_image(40, 24, seed=4))
    path = save_rotated(tmp_path / "map.png", image)
    assert torch.equal(prepare_control_map(path, 40, 24), prepare_control_map(Image.fromarray(image), 40, 24))


def test_map_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ImageError, match="nothing.png: image file not found"):
        prepare_control_map(tmp_path / "nothing.png", 64, 64)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.png: cannot read image"):
        prepare_control_map(tmp_path / "bad.png", 64, 64)
    image = gradient_image(8, 8)
    with pytest.raises(ConfigError, match="unknown control preprocessor 'depth'; choose one of map, invert, canny"):
        prepare_control_map(image, 64, 64, pre="depth")
    with pytest.raises(ConfigError, match="unknown control resize mode 'stretch'"):
        prepare_control_map(image, 64, 64, resize="stretch")
    with pytest.raises(ImageError, match="control map is 8×8 but the output is 64×64 "):
        prepare_control_map(image, 64, 64, resize="none")
    with pytest.raises(ConfigError, match="0 <= low <= high, got low=200, high=100"):
        prepare_control_map(image, 64, 64, pre="canny", low=200, high=100)


# ---- the --control flag -------------------------------------------------------------------------------------------

def test_parse_control_spec() -> None:
    spec = parse_control_spec("model=cn/canny.safetensors, image=edges.png,scale=0.8,pre=canny,start=0.1,end=0.9,"
                              "low=50,high=150,resize=crop,guess=true")
    assert spec == ControlSpec("cn/canny.safetensors", "edges.png", 0.8, "canny", 0.1, 0.9, 50.0, 150.0, "crop",
                               True)
    assert parse_control_spec("model=a,image=b") == ControlSpec("a", "b")


@pytest.mark.parametrize(("spec", "match"), [
    ("model=a,image=b,strength=2,foo=1", r"unknown keys \['strength', 'foo'\]; known: model, image, scale"),
    ("image=b,scale=1", "missing model "),
    ("scale=1", "missing model and image"),
    ("model=a,image=", "missing image"),
    ("model=a,image=b,scale=big", "scale='big' is not a number"),
    ("model=a,image=b,scale=nan", "scale='nan' must be finite"),
    ("model=a,image=b,scale", r"'scale' is not key=value"),
    ("model=a,image=b,model=c", "key 'model' given twice"),
    ("model=a,image=b,pre=hed", "unknown control preprocessor pre='hed'"),
    ("model=a,image=b,resize=zoom", "unknown control resize mode resize='zoom'"),
    ("model=a,image=b,low=10", "low/high are canny thresholds; they need pre=canny, not pre=map"),
    ("model=a,image=b,start=0.6,end=0.5", "0 <= start < end <= 1, got start=0.6, end=0.5"),
    ("model=a,image=b,guess=maybe", "guess='maybe' must be true or false"),
])
def test_parse_control_spec_errors(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_control_spec(spec)


def test_load_control_unit(tmp_path) -> None:
    save_original(ControlNetModel(ControlNetConfig.tiny()), tmp_path / "cn.safetensors")
    gradient_image(50, 30).save(tmp_path / "map.png")
    spec = parse_control_spec(f"model={tmp_path / 'cn.safetensors'},image={tmp_path / 'map.png'},pre=canny,"
                              "low=20,high=60,scale=0.5,end=0.5")
    unit = load_control_unit(spec, 64, 32, unet=UNetConfig.tiny())
    assert unit.image.shape == (1, 3, 32, 64) and set(unit.image.unique().tolist()) == {0.0, 1.0}
    assert (unit.scale, unit.start, unit.end, unit.guess_mode) == (0.5, 0.0, 0.5, False)
    assert not any(p.requires_grad for p in unit.model.parameters())
    with pytest.raises(ConfigError, match="ControlNet does not fit the U-Net .*context_dim 256 vs 768"):
        load_control_unit(spec, 64, 32, unet=UNetConfig.sd15())


# ---- residuals ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    """A random U-Net and two random ControlNets, each with its diffusers twin (weights moved by nijimi's tables)."""
    unet = UNetModel(UNET).eval()
    randomize(unet, 0)
    d_unet = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(UNET)).eval()
    d_unet.load_state_dict(unet_key_table(UNET).to_foreign(unet.state_dict()), strict=True)
    nets = []
    for seed in (1, 2):
        control = ControlNetModel(CONTROL).eval()
        randomize(control, seed)
        twin = diffusers.ControlNetModel.from_config(controlnet_config_to_diffusers(CONTROL)).eval()
        twin.load_state_dict(controlnet_key_table(CONTROL).to_foreign(control.state_dict()), strict=True)
        nets.append((control, twin))
    return unet, d_unet, nets


def batch_inputs(seed: int = 5) -> tuple[torch.Tensor, ...]:
    """A classifier-free-guidance batch [uncond; cond]: x (2, 4, 16, 16), t (2,), context (2, 7, 32); 2 maps."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=gen).expand(2, -1, -1, -1)
    context = torch.randn(2, 7, 32, generator=gen)
    maps = [torch.rand(1, 3, 128, 128, generator=gen) for _ in range(2)]
    return x, torch.tensor([641, 641]), context, maps


@pytest.mark.parametrize("count", [1, 2], ids=["one", "two-summed"])
def test_unet_with_residuals_equals_diffusers(models, count: int) -> None:
    unet, d_unet, nets = models
    x, t, context, maps = batch_inputs()
    scales = [0.6, 1.3][:count]
    units = [ControlUnit(net, m, s) for (net, _), m, s in zip(nets, maps, scales, strict=False)]
    with torch.inference_mode():
        down, mid = control_residuals(units, x, t, context, step_fraction(3, 20))
        got = unet(x, t, context, down_residuals=down, mid_residual=mid)
        d_down, d_mid = None, None
        for (_, twin), m, s in zip(nets, maps, scales, strict=False):
            res, res_mid = twin(x, t, context, m.expand(2, -1, -1, -1), conditioning_scale=s, return_dict=False)
            d_down = res if d_down is None else [a + b for a, b in zip(d_down, res, strict=True)]
            d_mid = res_mid if d_mid is None else d_mid + res_mid
        want = d_unet(x, t, context, down_block_additional_residuals=tuple(d_down),
                      mid_block_additional_residual=d_mid).sample
        plain = unet(x, t, context)
    assert rel_err(got, want) <= TOLERANCE
    assert rel_err(plain, got) > 1e-2  # the control did change the prediction
    assert all(rel_err(a, b) <= TOLERANCE for a, b in zip([*down, mid], [*d_down, d_mid], strict=True))


def test_guess_mode_steers_the_conditional_half_like_diffusers(models) -> None:
    """diffusers' pipeline in guess mode: the ControlNet sees only the conditional rows, the unconditional rows get
    zero residuals (``torch.cat([zeros_like(d), d])``)."""
    unet, d_unet, nets = models
    x, t, context, maps = batch_inputs(seed=6)
    unit = ControlUnit(nets[0][0], maps[0], 0.8, guess_mode=True)
    mask = torch.tensor([False, True])
    with torch.inference_mode():
        down, mid = control_residuals([unit], x, t, context, (0.0, 0.05), cond_only_mask=mask)
        got = unet(x, t, context, down_residuals=down, mid_residual=mid)
        res, res_mid = nets[0][1](x[1:], t[1:], context[1:], maps[0], conditioning_scale=0.8, guess_mode=True,
                                  return_dict=False)
        want = d_unet(x, t, context, down_block_additional_residuals=tuple(torch.cat([r * 0, r]) for r in res),
                      mid_block_additional_residual=torch.cat([res_mid * 0, res_mid])).sample
    assert all(torch.count_nonzero(r[0]) == 0 and torch.count_nonzero(r[1]) > 0 for r in [*down, mid])
    assert rel_err(got, want) <= TOLERANCE
    everywhere, _ = control_residuals([unit], x, t, context, 0.0)  # no guidance batch: every row is steered
    assert all(torch.count_nonzero(r[0]) > 0 for r in everywhere)


def test_controlnet_layer_marks_the_conditional_rows_batched_and_apart(models) -> None:
    """The model-stack layer ``with_controlnets``: the step index picks the window, and guess mode steers only the
    rows ``is_cond`` marks, both when GuidedNetwork batches [uncond; cond] and when it must call each branch."""
    unet, _, nets = models
    x, t, context, maps = batch_inputs(seed=7)
    run = ControlRun((ControlUnit(nets[0][0], maps[0], 0.8, guess_mode=True),), first=2, steps=6)
    seen = []

    def base(x, t, context, *, step, is_cond, **residuals):
        seen.append((step, is_cond.tolist()))
        return unet(x, t, context, **residuals)

    net = with_controlnets(base, run)
    cond, uncond = {"is_cond": torch.tensor([True])}, {"is_cond": torch.tensor([False])}
    with torch.inference_mode():
        GuidedNetwork(net, 3.0)(x[:1], t[:1], {"context": context[1:], **cond}, {"context": context[:1], **uncond},
                                step=3)
        short = context[:1, :5]  # another token length: two calls
        apart = GuidedNetwork(net, 3.0)(x[:1], t[:1], {"context": context[1:], **cond}, {"context": short, **uncond},
                                        step=3)
        down, mid = control_residuals(run.units, x[:1], t[:1], context[1:], (0.25, 0.5))
        p_c = unet(x[:1], t[:1], context[1:], down_residuals=down, mid_residual=mid)
        p_u = unet(x[:1], t[:1], short)
    assert seen == [(3, [False, True]), (3, [False]), (3, [True])]
    assert torch.equal(apart, p_u + 3.0 * (p_c - p_u))


def test_start_end_follow_diffusers_controlnet_keep(models) -> None:
    x, t, context, maps = batch_inputs()
    unit = ControlUnit(models[2][0][0], maps[0], start=0.2, end=0.7)
    steps = 10
    keep = [1.0 - float(i / steps < 0.2 or (i + 1) / steps > 0.7) for i in range(steps)]  # diffusers' formula
    active = []
    with torch.inference_mode():
        for i in range(steps):
            down, mid = control_residuals([unit], x[:1], t[:1], context[:1], step_fraction(i, steps))
            assert (down is None) == (mid is None)
            active.append(0.0 if down is None else 1.0)
    assert active == keep == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    off = ControlUnit(unit.model, maps[0], scale=0.0)
    assert control_residuals([off], x, t, context, 0.5) == (None, None)


def test_unit_and_size_errors(models) -> None:
    x, t, context, maps = batch_inputs()
    net = models[2][0][0]
    with pytest.raises(ConfigError, match=r"control map must be \(2, 3, 128, 128\) \(8× the latent size \(16, 16\)\), "
                                          r"got \(2, 3, 96, 128\)"):
        control_residuals([ControlUnit(net, maps[0][:, :, :96])], x, t, context, 0.0)
    with pytest.raises(ConfigError, match=r"control map must be \(1, 3, H, W\), got \(1, 1, 128, 128\)"):
        ControlUnit(net, maps[0][:, :1])
    with pytest.raises(ConfigError, match=r"values must lie in \[0, 1\], got \[-1, 1\]"):
        ControlUnit(net, maps[0] * 2 - 1)
    with pytest.raises(ConfigError, match="0 <= start < end <= 1, got start=0.5, end=0.5"):
        ControlUnit(net, maps[0], start=0.5, end=0.5)
    with pytest.raises(ConfigError, match=r"cond_only_mask must be a \(2,\) bool tensor"):
        control_residuals([ControlUnit(net, maps[0], guess_mode=True)], x, t, context, 0.0, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="step 10 outside 0…9"):
        step_fraction(10, 10)
