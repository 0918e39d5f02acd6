"""What every flat model config (U-Net, VAE, text encoder) shares: storage as a JSON-ready dict and range checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Self

from nijimi.errors import ConfigError


class StoredConfig:
    """Base of a frozen config dataclass whose fields are plain values (tuples stored as lists)."""

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists), stored next to the weights."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` naming them (they would silently
        change nothing)."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
        return cls(**data)

    def require_positive(self, names: Iterable[str]) -> None:
        """Raise :class:`ConfigError` naming the first field of ``names`` that is below 1."""
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"{type(self).__name__}.{name} must be ≥ 1, got {getattr(self, name)}")
