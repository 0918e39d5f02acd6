"""The CLI side of ControlNet: ``generate --control …``, ``nijimi train-controlnet`` and ``nijimi eval control``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from nijimi.errors import NijimiError
from nijimi.pipelines.control_maps import ControlSpec, parse_control_spec

CONTROL_HELP = ("steer with a ControlNet: model=PATH,image=IMG[,scale=1][,pre=map|invert|canny][,low=100,high=200]"
                "[,start=0][,end=1][,resize=resize|crop|fill|none][,guess=false]; repeat for several")
_MODULES = {"map": "none", "invert": "invert", "canny": "canny"}
_RESIZE_MODES = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill", "none": "None"}


def add_control_argument(p: argparse.ArgumentParser) -> None:
    """``--control SPEC`` (repeatable) on a generating command."""
    p.add_argument("--control", action="append", default=[], metavar="SPEC", help=CONTROL_HELP)


def control_specs(texts: list[str] | None) -> list[ControlSpec]:
    """Parse each ``--control`` flag (:func:`parse_control_spec`); file paths are made absolute so that the recipe
    stored in the PNG names them from anywhere."""
    specs = [parse_control_spec(text) for text in texts or ()]
    return [dataclasses.replace(s, model=str(Path(s.model).absolute()), image=str(Path(s.image).absolute()))
            for s in specs]


def specs_from_recipe(entries: list | None, source: str) -> list[ControlSpec]:
    """The ``control`` entries of a nijimi recipe back as specs (``reproduce``); anything else raises
    :class:`NijimiError` naming ``source``."""
    try:
        return [ControlSpec(**entry) for entry in entries or ()]
    except TypeError as exc:
        raise NijimiError(f"{source}: recipe control entry is not a --control spec ({exc})") from None


def control_infotext(entries: list[dict] | None) -> dict[str, str]:
    """A1111's ControlNet extension's infotext items, ``{"ControlNet 0": "Module: canny, Model: name, Weight: 1, …"}``,
    one per entry of a generation's ``control`` settings (specs' fields, or a unit's scale/start/end/guess_mode)."""
    items = {}
    for i, entry in enumerate(entries or ()):
        guess = entry.get("guess", entry.get("guess_mode", False))
        fields = {"Module": _MODULES.get(entry.get("pre", "map"), entry.get("pre")),
                  "Model": Path(entry["model"]).stem if "model" in entry else None,
                  "Weight": entry["scale"], "Resize Mode": _RESIZE_MODES.get(entry.get("resize", "resize")),
                  "Threshold A": entry.get("low"), "Threshold B": entry.get("high"),
                  "Guidance Start": entry["start"], "Guidance End": entry["end"],
                  "Control Mode": "ControlNet is more important" if guess else "Balanced"}
        items[f"ControlNet {i}"] = ", ".join(f"{k}: {_number(v)}" for k, v in fields.items() if v is not None)
    return items


def _number(value: object) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
