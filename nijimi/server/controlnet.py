"""The sd-webui-controlnet extension's API in nijimi's terms: its units in a txt2img/img2img body
(``alwayson_scripts: {"controlnet": {"args": [unit, …]}}``) as :class:`~nijimi.pipelines.control_maps.ControlSpec`
entries of the request's ``control`` (:func:`read_units`), and its own endpoints: ``/controlnet/model_list``,
``module_list``, ``version``, ``settings`` and ``detect`` (:func:`detect`).

A unit names its ControlNet by the extension's title ``name [hash]`` or by its name, in any case, from the server's
listing (:func:`~nijimi.server.folders.list_controlnets`), never by a path. Its preprocessor ("module") is one nijimi
has (:data:`~nijimi.pipelines.infotext.CONTROL_MODULES`); its image is base64, in each form the extension takes
(``image`` or ``input_image``; a string, ``{"image", "mask"}`` or ``[image, mask]``); in img2img a unit without an
image uses the init image, as in the extension. A field left out takes the extension's default (``enabled`` true,
``weight`` 1, ``resize_mode`` "Crop and Resize", ``control_mode`` "Balanced", thresholds and ``processor_res`` -1:
the preprocessor's own). nijimi runs a preprocessor on the image brought to the output size (the extension's
``pixel_perfect``); a setting that would have made the extension's image differ and that nijimi does not have is
named in the answer's warnings, as :mod:`nijimi.server.a1111` does for its fields.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from PIL import Image

from nijimi.errors import ConfigError
from nijimi.pipelines.control_maps import ControlSpec, preprocess, resize_image
from nijimi.pipelines.infotext import CONTROL_MODES, CONTROL_MODULE_ALIASES, CONTROL_MODULES, CONTROL_RESIZE_MODES
from nijimi.server.a1111 import IMG2IMG, Limits, decode_image, encode_image
from nijimi.server.errors import ApiError
from nijimi.server.folders import ControlNetEntry, list_controlnets

__all__ = ["API_VERSION", "MAX_UNITS", "ControlNetEntry", "detect", "list_controlnets", "module", "module_list",
           "read_units"]

MAX_UNITS = 3
"""Enabled units one call may send (the extension's default ``control_net_unit_count``)."""
API_VERSION = 2
"""What ``/controlnet/version`` answers: the extension's API version whose fields this module reads."""
CANNY = {"processor_res": 512, "threshold_a": 100, "threshold_b": 200}
"""The defaults of canny's sliders (resolution, low and high threshold), taken where a unit sends -1."""
_RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Scale to Fit (Inner Fit)": "Crop and Resize",
                   "Outer Fit (Shrink to Fit)": "Resize and Fill", "Envelope (Outer Fit)": "Resize and Fill"}
_RESIZE_NUMBERS = (*CONTROL_RESIZE_MODES, "Just Resize")  # 3: "Just Resize (Latent upscale)"
_ALIASES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "mask_image": "mask"}
_FIELDS = {"enabled", "module", "model", "weight", "image", "mask", "resize_mode", "low_vram", "processor_res",
           "threshold_a", "threshold_b", "guidance_start", "guidance_end", "pixel_perfect", "control_mode"}
_QUIET = {"is_ui", "input_mode", "batch_images", "output_dir", "loopback", "use_preview_as_input", "generated_image",
          "batch_image_dir", "batch_mask_dir", "batch_input_gallery", "batch_mask_gallery", "image_fg",
          "mask_image_fg", "inpaint_crop_input_image", "save_detected_map", "pulid_mode", "animatediff_batch",
          "batch_modifiers"}
"""Fields of the extension's UI, batch tabs and other model kinds, which change nothing here; read quietly."""
_IGNORED = {"hr_option": "Both", "advanced_weighting": None, "effective_region_mask": None, "ipadapter_input": None,
            "guess_mode": False, "guessmode": False}
"""Fields nijimi does not implement, with the value that leaves the image as nijimi makes it; another value is
named in the warnings."""


def read_units(value: Any, body: Mapping[str, Any], mode: str, limits: Limits,
               models: list[ControlNetEntry]) -> tuple[dict[str, Any], list[str]]:
    """The request fields (``control``: one spec per enabled unit) and warnings of the ``controlnet`` entry of
    ``alwayson_scripts``; ``models``: the ControlNets a unit may name. Errors name the unit's field; more than
    :data:`MAX_UNITS` enabled units are refused."""
    if not isinstance(value, dict) or not isinstance(value.get("args", []), list):
        raise ConfigError('alwayson_scripts.controlnet must be {"args": [unit, …]}')
    specs, warnings = [], []
    for i, unit in enumerate(value.get("args") or ()):
        spec = _unit(f"alwayson_scripts.controlnet.args[{i}]", unit, body, mode, limits, models, warnings)
        if spec is not None:
            specs.append(spec)
    if len(specs) > MAX_UNITS:
        raise ApiError(422, "ValidationError", f"alwayson_scripts.controlnet: {len(specs)} enabled units; nijimi "
                                               f"takes at most {MAX_UNITS} (GET /controlnet/settings)")
    return ({"control": tuple(specs)} if specs else {}), warnings


def _unit(key: str, unit: Any, body: Mapping[str, Any], mode: str, limits: Limits, models: list[ControlNetEntry],
          warnings: list[str]) -> ControlSpec | None:
    """One unit as a spec, None when it is disabled (or null)."""
    if unit is None:
        return None
    if not isinstance(unit, dict):
        raise ConfigError(f"{key} must be a ControlNet unit (an object), not {type(unit).__name__}")
    unit = _canonical(key, unit)
    if not _flag(f"{key}.enabled", unit.get("enabled"), True):
        return None
    _other_fields(key, unit, warnings)
    get = lambda name, default: default if unit.get(name) is None else unit[name]  # noqa: E731
    pre = module(f"{key}.module", get("module", "none"))
    entry = _model(f"{key}.model", get("model", "None"), models)
    image = _image(key, unit, body, mode, limits, warnings)
    control = _control_mode(f"{key}.control_mode", get("control_mode", CONTROL_MODES[0]), warnings)
    low, high = _thresholds(unit, "threshold_a", "threshold_b", f"{key}.") if pre == "canny" else (None, None)
    if pre == "canny" and not _flag(f"{key}.pixel_perfect", unit.get("pixel_perfect"), False):
        _processor_res(key, _number(f"{key}.processor_res", get("processor_res", -1)), body, warnings)
    _flag(f"{key}.low_vram", unit.get("low_vram"), False)
    weight = _number(f"{key}.weight", get("weight", 1.0), 0.0, 2.0)
    start, end = (_number(f"{key}.guidance_{name}", get(f"guidance_{name}", default), 0.0, 1.0)
                  for name, default in (("start", 0.0), ("end", 1.0)))
    resize = _resize_mode(f"{key}.resize_mode", get("resize_mode", "Crop and Resize"))
    if start >= end:
        raise ConfigError(f"{key}: guidance_start {start:g} must be below guidance_end {end:g}")
    return ControlSpec(str(entry.path), image, weight, pre, start, end, low, high, resize, control == CONTROL_MODES[2])


def _canonical(key: str, unit: dict) -> dict:
    """The unit with the extension's old field names (``input_image``, ``guidance``, ``lowvram``, ``mask_image``)
    under their new ones; both names at once are refused."""
    out = dict(unit)
    for old, new in _ALIASES.items():
        if old in out:
            if unit.get(new) is not None and unit[old] is not None:
                raise ConfigError(f"{key}: give {new!r} or its old name {old!r}, not both")
            value = out.pop(old)
            out[new] = value if out.get(new) is None else out[new]
    return out


def _other_fields(key: str, unit: dict, warnings: list[str]) -> None:
    for name, value in unit.items():
        if name in _IGNORED:
            if value is not None and value != _IGNORED[name]:
                warnings.append(f"{key}.{name} is not supported by nijimi; ignored")
        elif name not in _FIELDS and name not in _QUIET:
            warnings.append(f"{key}.{name} is not a ControlNet unit field nijimi knows; ignored")


def _flag(key: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {value!r:.60}")
    return value


def _number(key: str, value: Any, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        bounds = "a number" if math.isinf(low) else f"a number from {low:g} to {high:g}"
        raise ConfigError(f"{key} must be {bounds}, not {value!r:.60}")
    return float(value)


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, not {value!r:.60}")
    return value


def module(key: str, value: Any) -> str:
    """nijimi's preprocessor of the extension's module ``value`` (any case); ApiError 422 naming it otherwise."""
    name = _text(key, value).strip().lower()
    name = CONTROL_MODULE_ALIASES.get(name, name)
    if name not in CONTROL_MODULES:
        raise ApiError(422, "ValidationError", f"{key} {value!r}: not a preprocessor nijimi has; it has "
                                               f"{', '.join(CONTROL_MODULES)} (GET /controlnet/module_list)")
    return CONTROL_MODULES[name]


def _model(key: str, value: Any, models: list[ControlNetEntry]) -> ControlNetEntry:
    text = _text(key, value)
    if text.strip().lower() in ("", "none"):
        raise ConfigError(f"{key}: the unit names no ControlNet model (GET /controlnet/model_list lists them)")
    for entry in models:
        if entry.matches(text):
            return entry
    known = ", ".join(e.name for e in models[:20]) or "none"
    raise ApiError(422, "ValidationError", f"{key}: no ControlNet model {text!r}; the ControlNet models here: {known}")


def _image(key: str, unit: dict, body: Mapping[str, Any], mode: str, limits: Limits,
           warnings: list[str]) -> Image.Image:
    """The unit's control image: ``image`` as a string, ``{"image", "mask"}``, ``[image, mask]`` or a list of one
    such object; in img2img the init image when there is none. A mask is named in the warnings (nijimi's
    preprocessors take none)."""
    image, mask = unit.get("image"), unit.get("mask")
    if isinstance(image, list) and len(image) == 1 and isinstance(image[0], dict):
        image = image[0]
    elif isinstance(image, list) and len(image) == 2 and not any(isinstance(x, dict) for x in image):
        image, mask = image
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask") if image.get("mask") is not None else mask
    if isinstance(image, list):
        raise ConfigError(f"{key}.image: one image, {{\"image\", \"mask\"}} or [image, mask]; several input images "
                          "are for IP-Adapter units, which nijimi does not have")
    if mask not in (None, ""):
        warnings.append(f"{key}: nijimi's preprocessors take no mask; the mask is ignored")
    if image not in (None, ""):
        return decode_image(f"{key}.image", image, limits)
    if mode == IMG2IMG and isinstance(body.get("init_images"), list) and body["init_images"]:
        return decode_image("init_images[0]", body["init_images"][0], limits)
    raise ConfigError(f"{key}.image: the unit has no control image (base64)")


def _resize_mode(key: str, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(_RESIZE_NUMBERS):
        return CONTROL_RESIZE_MODES[_RESIZE_NUMBERS[value]]
    name = _RESIZE_ALIASES.get(value, value) if isinstance(value, str) else None
    if name not in CONTROL_RESIZE_MODES:
        raise ConfigError(f"{key} {value!r:.60} must be 0 to 3 or one of {', '.join(CONTROL_RESIZE_MODES)}")
    return CONTROL_RESIZE_MODES[name]


def _control_mode(key: str, value: Any, warnings: list[str]) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(CONTROL_MODES):
        value = CONTROL_MODES[value]
    if value not in CONTROL_MODES:
        raise ConfigError(f"{key} {value!r:.60} must be 0, 1, 2 or one of {', '.join(CONTROL_MODES)}")
    if value == CONTROL_MODES[1]:
        warnings.append(f"{key} {value!r} is not supported by nijimi; the unit runs Balanced")
    return value


def _thresholds(values: Mapping[str, Any], low_key: str, high_key: str, label: str) -> tuple[float, float]:
    """canny's low and high thresholds: ``values[low_key]``, ``values[high_key]``, -1 (or absent) for 100 and 200;
    errors name ``label`` + the key."""
    low, high = (_number(label + name, -1 if values.get(name) is None else values[name], -1.0, 255.0)
                 for name in (low_key, high_key))
    low, high = (CANNY["threshold_a"] if low < 0 else low), (CANNY["threshold_b"] if high < 0 else high)
    if low > high:
        raise ConfigError(f"{label}{low_key} {low:g} must not exceed {high_key} {high:g} (canny's low and high "
                          "thresholds)")
    return low, high


def _processor_res(key: str, res: float, body: Mapping[str, Any], warnings: list[str]) -> None:
    """Name a preprocessor resolution that differs from the output's short side (nijimi's: pixel perfect)."""
    sizes = [body.get(name) for name in ("width", "height")]
    if res > 0 and not (all(isinstance(s, int) for s in sizes) and res == min(sizes)):
        warnings.append(f"{key}.processor_res {res:g}: nijimi runs canny on the image at the output size (the "
                        "extension's pixel_perfect); ignored")


# ---- the extension's own endpoints ---------------------------------------------------------------------------------


def module_list(alias_names: bool = False) -> dict:
    """``/controlnet/module_list``: the modules nijimi has (``alias_names``: the extension's display names) and each
    one's sliders (resolution, thresholds) in ``module_detail``."""
    shown = {v: k for k, v in CONTROL_MODULE_ALIASES.items()} if alias_names else {}
    resolution = {"name": "Preprocessor Resolution", "value": CANNY["processor_res"], "min": 64, "max": 2048}
    sliders = {"none": [], "invert": [resolution],
               "canny": [resolution, {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255},
                         {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255}]}
    names = [shown.get(name, name) for name in CONTROL_MODULES]
    return {"module_list": names,
            "module_detail": {shown.get(n, n): {"model_free": False, "sliders": sliders[n]} for n in CONTROL_MODULES}}


def detect(body: Any, limits: Limits) -> dict:
    """``/controlnet/detect``: each of ``controlnet_input_images`` (base64) through the preprocessor
    ``controlnet_module``, at ``controlnet_processor_res`` pixels on the short side (-1, and for ``none``: the
    image's own size), with canny's ``controlnet_threshold_a``/``_b`` → ``{"images": [base64 PNG], "info":
    "Success"}``."""
    if not isinstance(body, dict):
        raise ConfigError("the body must be a JSON object with controlnet_module and controlnet_input_images")
    pre = module("controlnet_module", body.get("controlnet_module") or "none")
    images = body.get("controlnet_input_images")
    if not isinstance(images, list) or not images or len(images) > limits.images:
        raise ConfigError(f"controlnet_input_images must be a list of 1 to {limits.images} base64 images")
    low, high = _thresholds(body, "controlnet_threshold_a", "controlnet_threshold_b", "") if pre == "canny" \
        else (100, 200)
    res = _number("controlnet_processor_res", -1 if body.get("controlnet_processor_res") is None
                  else body["controlnet_processor_res"], -1, 8192)
    answer: dict[str, Any] = {"images": [], "info": "Success"}
    for i, text in enumerate(images):
        image = decode_image(f"controlnet_input_images[{i}]", text, limits).convert("RGB")
        if res > 0 and pre != "map":
            scale = res / min(image.size)
            image = resize_image(image, max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        answer["images"].append(encode_image(preprocess(image, pre, low, high)))
    if body.get("controlnet_masks"):
        answer["warnings"] = ["controlnet_masks: nijimi's preprocessors take no mask; ignored"]
    return answer
