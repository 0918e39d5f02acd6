"""Training configuration: a TOML file plus ``--key=value`` flags, checked against a dataclass of defaults.

Every value is checked where it enters (:func:`replace_config`): unknown keys, wrong types, NaN or infinite floats,
and the ranges of :data:`RANGES` (a batch size or a step count below 1, a learning rate ≤ 0 …) raise one
:class:`ConfigError` naming the key and, for a value the file set, the file (:class:`Settings`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from nijimi.errors import ConfigError
from nijimi.io.files import regular_file
from nijimi.models.ldm import MAX_GUIDANCE

T = TypeVar("T")
MAX_CONFIG_BYTES = 1 << 20
"""Largest training config read (a recipe is a few hundred bytes)."""


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"≥ {low:g}"


def _within(low: float, high: float, closed: bool = True) -> tuple[Callable[[Any], bool], str]:
    end = "]" if closed else ")"
    return (lambda v: low <= v <= high if closed else low <= v < high), f"within [{low:g}, {high:g}{end}"


RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("steps", "batch_size", "rank", "sample_steps", "data_count", "sample_count"), _at_least(1)),
    **dict.fromkeys(("warmup_steps", "save_every", "sample_every", "seed", "size", "conv_rank", "weight_decay",
                     "grad_clip", "min_snr_gamma", "kl_weight", "alpha", "conv_alpha"), _at_least(0)),
    **dict.fromkeys(("caption_dropout", "min_lr_ratio", "two_objects", "any_colour", "timestep_bias_portion"),
                    _within(0, 1)),
    "lr": ((lambda v: v > 0), "> 0"),
    "default_guidance": _within(0, MAX_GUIDANCE),
    **dict.fromkeys(("ema_decay", "target_ema"), _within(0, 1, closed=False)),
    "betas": ((lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)), "two numbers in [0, 1)"),
}
"""Training settings by field name → (test, what it requires); a field of that name in any config obeys it."""


class Settings(dict):
    """Flat config values (``"unet.lr"`` → value) that remember the file they were read from (``source``) and the
    keys it set; :meth:`update` (the command-line flags) takes keys out of the file's. Errors about a key start with
    :meth:`origin` (``"recipe.toml: "`` when the file set it) and name it by :meth:`name` (``"unet.lr"``)."""

    def __init__(self, values: Mapping[str, Any] = {}, source: str = "", file_keys: Iterable[str] = (),  # noqa: B006
                 prefix: str = "") -> None:
        super().__init__(values)
        self.source, self.file_keys, self.prefix = source, set(file_keys), prefix

    def update(self, other: Mapping[str, Any] = {}, **more: Any) -> None:  # noqa: B006
        """``dict.update``; the keys given no longer count as the file's."""
        other = {**other, **more}
        super().update(other)
        self.file_keys -= set(other)

    def section(self, prefix: str) -> Settings:
        """The keys under ``prefix`` (``"unet."``) without it, remembering their origin."""
        inner = {k.removeprefix(prefix): v for k, v in self.items() if k.startswith(prefix)}
        keys = {k.removeprefix(prefix) for k in self.file_keys if k.startswith(prefix)}
        return Settings(inner, self.source, keys, self.prefix + prefix)

    def origin(self, key: str) -> str:
        return f"{self.source}: " if key in self.file_keys else ""

    def name(self, key: str) -> str:
        return self.prefix + key


def read_toml(path: str | Path) -> Settings:
    """Read a TOML file; tables are flattened to dotted keys (``[unet] lr = 1e-4`` → ``"unet.lr"``). A missing or
    special file (a folder, a FIFO), one over :data:`MAX_CONFIG_BYTES`, not UTF-8 or not TOML raises
    :class:`ConfigError` naming it."""
    path = regular_file(path, "training config", ConfigError, missing="config file not found")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: training config over {MAX_CONFIG_BYTES} bytes")
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read training config: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: training config is not UTF-8 ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    flat = _flatten(data)
    return Settings(flat, str(path), flat)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _coerce(where: str, value: Any, default: Any) -> Any:
    """Convert ``value`` (TOML value or override string) to the type of the field's default; errors start with
    ``where``."""
    kind = type(default)
    if not isinstance(value, str) or kind is str or default is None:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind in (tuple, list) and isinstance(value, list):
            return kind(value)
        if default is not None and kind is not type(value):
            raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
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
        raise ConfigError(f"{where}: cannot read {value!r} as {kind.__name__}") from None


def _check(where: str, field: str, value: Any) -> None:
    """NaN and infinities are refused in every float (alone or in a list); :data:`RANGES` where the field has one.
    ``where``: ``"[file: ]name"`` for the message."""
    numbers = value if isinstance(value, tuple | list) else (value,)
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if field in RANGES:
        test, required = RANGES[field]
        try:
            fits = test(value)
        except TypeError:
            fits = False
        if not fits:
            raise ConfigError(f"{where} must be {required}, got {value!r}")


def check_settings(config: object) -> None:
    """Check every field of a settings dataclass by :data:`RANGES` and for NaN/infinity (``__post_init__`` of the
    training configs, so one built in Python obeys the rules a file's values do)."""
    for field in dataclasses.fields(config):
        _check(field.name, field.name, getattr(config, field.name))


def build_config(cls: type[T], values: Mapping[str, Any]) -> T:
    """Fill dataclass ``cls`` from flat ``values``; unknown keys, wrong types and values out of range raise
    ConfigError naming them (see :func:`replace_config`)."""
    return replace_config(cls(), values)


def replace_config(config: T, values: Mapping[str, Any]) -> T:
    """``dataclasses.replace(config, **values)`` with each value read as the type of the field's current value
    (so ``--arch.unet.model_channels=32`` from the command line is an int) and checked (:data:`RANGES`, finite
    floats); unknown keys and the config's own checks raise ConfigError, naming the file when ``values`` are
    :class:`Settings` read from one."""
    settings = values if isinstance(values, Settings) else Settings(values)
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values) - fields)
    if unknown:
        origin = settings.origin(unknown[0])
        raise ConfigError(f"{origin}unknown config key(s): {', '.join(map(settings.name, unknown))} "
                          f"(known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(f"{settings.origin(k)}config key {settings.name(k)!r}", v, getattr(config, k))
              for k, v in values.items()}
    for key, value in kwargs.items():
        _check(settings.origin(key) + settings.name(key), key, value)
    try:
        return dataclasses.replace(config, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{settings.source}: {e}" if settings.file_keys & set(kwargs) else str(e)) from None
