"""What every flat model config (U-Net, VAE, text encoder) shares: storage as a JSON-ready dict, the type check of
stored values against the fields' annotations, and range checks."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from typing import Any, Self

from nijimi.errors import ConfigError


def _fits(value: object, hint: object) -> bool:
    """Whether a JSON value is of the annotated type: ``int`` (not a bool), ``float`` (finite int or float), ``bool``,
    ``str``, ``None``, unions of these and ``tuple[T, ...]`` (a JSON list of T); other annotations accept anything."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is tuple:
        return isinstance(value, list | tuple) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint in (int, bool, str, type(None)):
        return type(value) is hint
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    return True


def check_field_types(cls: type, data: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` ``"<Class>.<field> must be <type>, got <value>"`` for the first entry of ``data``
    (a stored config of dataclass ``cls``, from JSON) whose value does not fit the field's annotation."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if name in hints and not _fits(value, hints[name]):
            hint = hints[name]
            shown = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise ConfigError(f"{cls.__name__}.{name} must be {shown}, got {value!r:.80}")


def require_mapping(data: object, what: str) -> dict:
    """``data`` if it is a JSON object, else :class:`ConfigError` naming ``what``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(data).__name__} {data!r:.80}")
    return data


class StoredConfig:
    """Base of a frozen config dataclass whose fields are plain values (tuples stored as lists)."""

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists), stored next to the weights."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; unknown keys (they would silently change nothing) and values of the wrong type
        raise :class:`ConfigError` naming them."""
        require_mapping(data, cls.__name__)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
        check_field_types(cls, data)
        return cls(**data)

    def require_positive(self, names: Iterable[str]) -> None:
        """Raise :class:`ConfigError` naming the first field of ``names`` that is below 1."""
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"{type(self).__name__}.{name} must be ≥ 1, got {getattr(self, name)}")
