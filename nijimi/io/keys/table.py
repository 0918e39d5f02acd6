"""The one rename type: :class:`RenameTable`, ``(native_key, foreign_key)`` pairs usable in both directions.

A table is built from a model's own ``state_dict()`` (made on the ``meta`` device, so no memory) and a map of module
renames (:func:`module_table`, the one longest-prefix search), so it covers every parameter or fails naming the key.
Converting checks the whole state dict first: missing and unexpected keys raise one :class:`CheckpointError`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from nijimi.errors import CheckpointError

_SHOWN = 5


@dataclass(frozen=True)
class RenameTable:
    """``(native_key, foreign_key)`` pairs of one network in model order (``what``, ``foreign``: names for errors).

    Several native keys may share one foreign key: the foreign tensor is their equal row blocks concatenated in table
    order (OpenCLIP's fused q|k|v). ``transposed``: native keys stored transposed; ``flattened``: native 1×1
    convolution weights stored as Linear ``(out, in)`` matrices. ``native_extra`` / ``foreign_extra``: keys dropped
    without complaint when converting from that side (layers a format has no place for, stored buffers).
    ``alias`` maps an accepted variant of a foreign key onto the table's form before converting to native. A native
    key may also be listed with several foreign names (the adapter tables' other spellings): lookups
    (:attr:`natives_of`, :attr:`foreign_of`) read them all and write the first; state-dict conversions are for tables
    of one spelling.
    """

    what: str
    foreign: str
    pairs: tuple[tuple[str, str], ...]
    transposed: frozenset[str] = frozenset()
    flattened: frozenset[str] = frozenset()
    native_extra: frozenset[str] = frozenset()
    foreign_extra: frozenset[str] = frozenset()
    alias: Callable[[str], str] | None = None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    @functools.cached_property
    def natives_of(self) -> dict[str, tuple[str, ...]]:
        """Foreign key → the native keys it holds, in order (several: row blocks of a fused tensor)."""
        out: dict[str, tuple[str, ...]] = {}
        for native, foreign in self.pairs:
            out[foreign] = (*out.get(foreign, ()), native)
        return out

    @functools.cached_property
    def foreign_of(self) -> dict[str, str]:
        """Native key → its foreign key (the first listed, where a table also reads other spellings)."""
        out: dict[str, str] = {}
        for native, foreign in self.pairs:
            out.setdefault(native, foreign)
        return out

    def check(self, sd: Mapping[str, object], native: bool) -> None:
        """Raise :class:`CheckpointError` naming the missing and unexpected keys of ``sd`` (``native`` or foreign)."""
        expected = list(dict.fromkeys(row[0 if native else 1] for row in self.pairs))
        unknown = sorted(set(sd) - set(expected) - (self.native_extra if native else self.foreign_extra))
        missing = [k for k in expected if k not in sd]
        if unknown or missing:
            naming = "native" if native else self.foreign
            raise CheckpointError(f"{naming} {self.what} state dict does not fit the config: missing {missing[:_SHOWN]}"
                                  f" ({len(missing)}), unexpected {unknown[:_SHOWN]} ({len(unknown)})")

    def _layout(self, native: str, value: torch.Tensor, to_foreign: bool) -> torch.Tensor:
        if native in self.transposed:
            return value.t().contiguous()
        if native in self.flattened:
            return value.reshape(value.shape[0], -1) if to_foreign else value.reshape(*value.shape[:2], 1, 1)
        return value

    def to_foreign(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Native state dict → foreign keys (strict; fused rows concatenated)."""
        self.check(sd, native=True)
        groups: dict[str, list[torch.Tensor]] = {}
        for native, foreign in self.pairs:
            groups.setdefault(foreign, []).append(self._layout(native, sd[native], True))
        return {foreign: torch.cat(parts) if len(parts) > 1 else parts[0] for foreign, parts in groups.items()}

    def to_native(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Foreign state dict → native keys (strict; fused rows split into copies, so no two tensors share memory)."""
        if self.alias is not None:
            sd = {self.alias(k): v for k, v in sd.items()}
        self.check(sd, native=False)
        out = {}
        for foreign, names in self.natives_of.items():
            parts = [sd[foreign]] if len(names) == 1 else [p.clone() for p in sd[foreign].chunk(len(names))]
            out.update({n: self._layout(n, p, False) for n, p in zip(names, parts, strict=True)})
        return out


def native_keys(module: type[nn.Module], config: object) -> list[str]:
    """The state-dict keys of ``module(config)``, built on the ``meta`` device."""
    with torch.device("meta"):
        return list(module(config).state_dict())


def module_table(what: str, keys: list[str], modules: Mapping[str, str], **options: object) -> RenameTable:
    """A diffusers :class:`RenameTable` for ``keys`` from native module path → foreign module path renames: each key
    takes the rename of its longest dotted prefix in ``modules``; a key with none raises :class:`CheckpointError`."""
    pairs = []
    for key in keys:
        module = next((key[:cut] for cut in range(len(key) - 1, 0, -1) if key[cut] == "." and key[:cut] in modules),
                      None)
        if module is None:
            raise CheckpointError(f"{what} key {key!r} has no diffusers rename rule")
        pairs.append((key, modules[module] + key[len(module):]))
    return RenameTable(what, "diffusers", tuple(pairs), **options)
