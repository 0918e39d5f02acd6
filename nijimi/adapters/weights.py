"""Adapter weights independent of any file format: one :class:`ModuleWeights` per adapted module, an :class:`Adapter`
mapping native module paths (the single-file key tree, e.g. ``model.diffusion_model.input_blocks.1.1.proj_in``) to
them.

Tensors carry the names of kohya sd-scripts / LyCORIS files without the ``.weight`` ending (``lora_down``,
``hada_w1_a``, ``lokr_w2``, ``diff``, ``dora_scale`` …); the scalars ``alpha`` and ``scale`` are plain floats. The
kind of a module is recognised from its tensor names, the way A1111 recognises them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from nijimi.adapters import deltas
from nijimi.errors import CheckpointError

# kind → (required names, optional names); LoKr and OFT have alternatives and are checked by rule below.
_SIGNATURES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "lora": (frozenset({"lora_down", "lora_up"}), frozenset({"lora_mid"})),
    "loha": (frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}), frozenset({"hada_t1", "hada_t2"})),
    "lokr": (frozenset(), frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                     "lokr_t2"})),
    "full": (frozenset({"diff"}), frozenset({"diff_b"})),
    "ia3": (frozenset({"weight"}), frozenset({"on_input"})),
    "norm": (frozenset({"w_norm"}), frozenset({"b_norm"})),
    "glora": (frozenset({"a1", "a2", "b1", "b2"}), frozenset()),
    "oft": (frozenset(), frozenset({"oft_blocks", "oft_diag", "rescale"})),
}
_COMMON = frozenset({"dora_scale"})
SCALARS = ("alpha", "scale")
"""Per-module scalar entries of a file, kept as floats on :class:`ModuleWeights`."""
TENSOR_NAMES = frozenset().union(*(req | opt for req, opt in _SIGNATURES.values()), _COMMON)
"""Every per-module tensor name some kind uses."""


def _lokr_complete(names: set[str]) -> bool:
    first = "lokr_w1" in names or {"lokr_w1_a", "lokr_w1_b"} <= names
    second = "lokr_w2" in names or {"lokr_w2_a", "lokr_w2_b"} <= names
    return first and second


def kind_of(names: set[str]) -> str | None:
    """The adapter kind a module's tensor names (scalars excluded) make up, or None when they make none."""
    for kind, (required, optional) in _SIGNATURES.items():
        if kind == "lokr":
            complete = _lokr_complete(names)
        elif kind == "oft":
            complete = bool(names & {"oft_blocks", "oft_diag"})
        else:
            complete = required <= names
        if complete and names <= required | optional | _COMMON:
            return kind
    return None


def _glora_a1111_layout(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GLoRA tensors in the layout A1111 reads and :func:`~nijimi.adapters.deltas.glora_delta` takes — ``a1``, ``b1``:
    (r, in), ``a2``: (in, r), ``b2``: (out, r), ``ΔW = b2·b1 + W·a2·a1`` — from either that layout (LyCORIS before 3)
    or the current LyCORIS one, which names the same factors the other way round: ``a1``: (in, r), ``a2``, ``b2``:
    (r, in), ``b1``: (out, r), ``ΔW = W·a1·a2 + b1·b2`` (on a k×k convolution the b factor with input channels is
    k×k). In the old layout ``a1`` and ``b1`` always share their first two sides, in the new one ``a2`` and ``b2``;
    for a square weight, where both pairs do, the rank is the smaller side."""
    a1, a2, b1, b2 = (t[k].shape[:2] for k in ("a1", "a2", "b1", "b2"))
    new = a2 == b2 and (a1 != b1 or a1[0] > a1[1])
    return {**t, "a1": t["a2"], "a2": t["a1"], "b1": t["b2"], "b2": t["b1"]} if new else t


@dataclass
class ModuleWeights:
    """One adapter's tensors on one module. ``alpha``: the file's alpha (scale = alpha / rank); ``scale``: an explicit
    scale that overrides it (A1111's ``scale`` entry; also how a peft LoKr without low-rank factors keeps alpha/r)."""

    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if kind_of(set(self.tensors)) != self.kind:
            raise CheckpointError(f"tensors {sorted(self.tensors)} do not make a {self.kind!r} adapter")

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by (A1111's ``dim``), or None for kinds without one (full, IA³, norm, OFT)."""
        t = self.tensors
        if self.kind == "lora":
            return t["lora_down"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if self.kind == "glora":
            return t["a1"].shape[0]
        if self.kind == "lokr":
            low_rank = t.get("lokr_w2_b", t.get("lokr_w1_b"))
            return None if low_rank is None else low_rank.shape[0]
        return None

    @property
    def effective_scale(self) -> float:
        """``scale`` if set, else ``alpha / rank`` when both exist, else 1 (A1111's ``calc_scale``)."""
        if self.scale is not None:
            return self.scale
        if self.alpha is not None and self.rank is not None and self.kind != "oft":
            return self.alpha / self.rank
        return 1.0

    @property
    def dora(self) -> bool:
        """Whether the weight decomposition of DoRA applies (a ``dora_scale`` magnitude is present)."""
        return "dora_scale" in self.tensors

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW on a base weight (out, in[, kh, kw]), scale and DoRA included; computed in float32 or wider."""
        dtype = torch.promote_types(weight.dtype, torch.float32)
        tensors = {k: v.to(dtype) for k, v in self.tensors.items()}
        return deltas.module_delta(self.kind, tensors, weight.to(dtype), self.effective_scale, self.alpha)

    def bias_delta(self) -> torch.Tensor | None:
        """Δb of the kinds that change a bias (full, norm), or None."""
        return deltas.bias_delta(self.kind, self.tensors, self.effective_scale)

    def flat(self) -> dict[str, torch.Tensor]:
        """The tensors plus ``alpha``/``scale`` as float32 scalars, as a file stores them."""
        out = dict(self.tensors)
        for name in SCALARS:
            value = getattr(self, name)
            if value is not None:
                out[name] = torch.tensor(value, dtype=torch.float32)
        return out

    @classmethod
    def from_flat(cls, entries: dict[str, torch.Tensor], where: str) -> ModuleWeights:
        """The inverse of :meth:`flat`; ``where`` names the module in the error when the names make no known kind."""
        scalars = {k: float(entries[k].float().item()) for k in SCALARS if k in entries}
        tensors = {k: v for k, v in entries.items() if k not in SCALARS}
        if "on_input" in tensors:  # LyCORIS saves this flag in the file's float dtype
            tensors["on_input"] = tensors["on_input"].reshape(()).bool()
        if {"a1", "a2", "b1", "b2"} <= set(tensors):
            tensors = _glora_a1111_layout(tensors)
        kind = kind_of(set(tensors))
        if kind is None:
            raise CheckpointError(f"{where}: tensors {sorted(tensors)} make no known adapter kind")
        return cls(kind, tensors, scalars.get("alpha"), scalars.get("scale"))


@dataclass
class Adapter:
    """A whole adapter: native module path → :class:`ModuleWeights`, plus the file's str → str metadata."""

    modules: dict[str, ModuleWeights]
    metadata: dict[str, str] = field(default_factory=dict)

    def kinds(self) -> Counter:
        """How many modules of each kind (``"lora"``, ``"loha"`` …; DoRA modules counted as ``"<kind>+dora"``)."""
        return Counter(mw.kind + ("+dora" if mw.dora else "") for mw in self.modules.values())

    def ranks(self) -> Counter:
        """How many modules have each rank (None: kinds without a rank)."""
        return Counter(mw.rank for mw in self.modules.values())
