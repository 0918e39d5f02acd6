"""The one shape of every training command (``train``, ``train-adapter``, ``train-controlnet``): ``--config TOML``
plus a ``--key=value`` flag for each field of the command's config dataclasses (:func:`add_config_flags`), read back
with :func:`config_values`. Flags override the file; both are typed and checked by the config's own reader
(:func:`nijimi.train.config.build_config`), so an unknown key or a bad value is one ``error:`` line."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from typing import Any

from nijimi.train.config import read_toml

_SETTING = "setting:"
"""Prefix of the argparse destinations of config fields."""


def _describe(cls: type) -> str:
    """The docstrings of a config dataclass and of the config classes it extends, most general first."""
    own = [c for c in reversed(cls.__mro__) if dataclasses.is_dataclass(c) and c.__dict__.get("__doc__")]
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", " ".join(inspect.getdoc(c) for c in own)).replace("``", "")


def add_config_flags(p: argparse.ArgumentParser, sections: dict[str, type], preset: tuple[str, ...] = ()) -> None:
    """``--config TOML`` and ``--KEY=VALUE`` for every field of each dataclass in ``sections`` (key prefix → class,
    e.g. ``{"": RunConfig, "unet.": UNetStage}``; a TOML table ``[unet]`` holds the same keys). A boolean's flag
    alone means true. Help comes from the classes' docstrings and the fields' defaults (the model preset's for the
    prefixes in ``preset``)."""
    p.add_argument("--config", metavar="TOML", help="settings from this file; flags override them")
    for prefix, cls in sections.items():
        group = p.add_argument_group(f"[{prefix[:-1]}] settings" if prefix else "settings", _describe(cls))
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            flag = f.type in (bool, "bool")
            default = "the model preset's" if prefix in preset else repr(f.default)
            group.add_argument(*dict.fromkeys((f"--{key.replace('_', '-')}", f"--{key}")), dest=_SETTING + key,
                               metavar="VALUE" if f.default is None else type(f.default).__name__.upper(),
                               nargs="?" if flag else None, const="true" if flag else None, help=f"default {default}")


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a training command was given: its ``--config`` file's keys, then the ``--KEY=VALUE`` flags."""
    values = read_toml(args.config) if args.config else {}
    values.update({k.removeprefix(_SETTING): v for k, v in vars(args).items()
                   if k.startswith(_SETTING) and v is not None})
    return values
