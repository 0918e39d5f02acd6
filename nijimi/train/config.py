"""Training configuration: a TOML file plus ``--key=value`` flags, checked against a dataclass of defaults."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from nijimi.errors import ConfigError

T = TypeVar("T")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; tables are flattened to dotted keys (``[unet] lr = 1e-4`` → ``"unet.lr"``)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return _flatten(data)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Convert ``value`` (TOML value or override string) to the type of the field's default."""
    kind = type(default)
    if not isinstance(value, str) or kind is str or default is None:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind in (tuple, list) and isinstance(value, list):
            return kind(value)
        if default is not None and kind is not type(value):
            raise ConfigError(f"config key {name!r}: expected {kind.__name__}, got {value!r}")
        return value
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if kind in (tuple, list):
            return kind(type(default[0])(v) for v in value.split(",")) if default else kind(value.split(","))
        return kind(value)
    except ValueError:
        raise ConfigError(f"config key {name!r}: cannot read {value!r} as {kind.__name__}") from None


def build_config(cls: type[T], values: dict[str, Any]) -> T:
    """Fill dataclass ``cls`` from flat ``values``; unknown keys and wrong types raise ConfigError naming them."""
    return replace_config(cls(), values)


def replace_config(config: T, values: dict[str, Any]) -> T:
    """``dataclasses.replace(config, **values)`` with each value read as the type of the field's current value
    (so ``--arch.unet.model_channels=32`` from the command line is an int); unknown keys raise ConfigError."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(k, v, getattr(config, k)) for k, v in values.items()}
    return dataclasses.replace(config, **kwargs)
