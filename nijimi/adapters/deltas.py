"""Weight updates ΔW of the LoRA family: pure functions of the adapter tensors (and, for some kinds, the base weight).

A Linear weight is ``(out, in)``, a Conv2d weight ``(out, in, kh, kw)``. Factors of a convolution may be stored 4-D
(kohya's ``lora_down (r, in, kh, kw)`` / ``lora_up (out, r, 1, 1)``) or flattened (``(r, in·kh·kw)``); every
function here takes the target weight's ``shape`` and returns ΔW in that shape. Tensor names follow the files of
kohya sd-scripts and LyCORIS (arXiv 2309.14859): :func:`module_delta` dispatches on the adapter kind.

The effective weight of one adapter with multiplier ``m`` is ``W + m·ΔW``; the ``scale`` (``alpha / rank``, or 1 for
kinds without a rank) is inside ΔW, and so is DoRA's weight decomposition (arXiv 2402.09353) when a magnitude
``dora_scale`` is present: ``ΔW = m_dora · (W + ΔW₀) / ‖W + ΔW₀‖ − W``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from nijimi.errors import CheckpointError

ADDITIVE_KINDS = ("lora", "loha", "lokr", "full", "norm")
"""Kinds whose ΔW does not depend on the base weight (without DoRA): merging them is undone by subtraction."""
WEIGHT_DEPENDENT_KINDS = ("ia3", "glora", "oft")
"""Kinds whose ΔW is a function of the base weight too."""
KINDS = ADDITIVE_KINDS + WEIGHT_DEPENDENT_KINDS


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """A factor as a matrix: ``(rows, rest…)`` → ``(rows, prod(rest))``."""
    return t.reshape(t.shape[0], -1)


def tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker/CP rebuild of a convolution factor (LyCORIS ``use_tucker``, as in LoHa's and LoKr's ``t`` tensors).

    core: (r, r, kh, kw), wa: (r, out), wb: (r, in) → ``W[p, q, k, l] = Σ_ij core[i, j, k, l]·wa[i, p]·wb[j, q]``,
    shape (out, in, kh, kw).
    """
    return torch.einsum("i j k l, i p, j q -> p q k l", core, wa, wb)


def lora_delta(down: torch.Tensor, up: torch.Tensor, shape: torch.Size,
               mid: torch.Tensor | None = None) -> torch.Tensor:
    """LoRA (Hu et al., arXiv 2106.09685) and LoCon: ``ΔW = up · down``.

    down: (r, in) or (r, in, kh, kw); up: (out, r) or (out, r, 1, 1). With a Tucker ``mid`` (r, r, kh, kw) the down
    factor is 1×1 and ``ΔW[o, i, k, l] = Σ_ab up[o, a]·mid[a, b, k, l]·down[b, i]`` (LyCORIS LoCon with ``use_tucker``).
    Returns ΔW of ``shape``.
    """
    if mid is None:
        return (_matrix(up) @ _matrix(down)).reshape(shape)
    return torch.einsum("a b k l, o a, b i -> o i k l", mid, _matrix(up), _matrix(down)).reshape(shape)


def loha_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, shape: torch.Size,
               t1: torch.Tensor | None = None, t2: torch.Tensor | None = None) -> torch.Tensor:
    """LoHa (FedPara, Hyeon-Woo et al., arXiv 2108.06098; LyCORIS): ``ΔW = (w1a · w1b) ⊙ (w2a · w2b)``.

    w·a: (out, r), w·b: (r, in[·kh·kw]); with Tucker cores t· (r, r, kh, kw) the pair is rebuilt by :func:`tucker`
    instead (then w·a is (r, out) and w·b is (r, in)). Returns ΔW of ``shape``.
    """
    first = tucker(t1, w1a, w1b) if t1 is not None else w1a @ _matrix(w1b)
    second = tucker(t2, w2a, w2b) if t2 is not None else w2a @ _matrix(w2b)
    return first.reshape(shape) * second.reshape(shape)


def lokr_factor(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None,
                core: torch.Tensor | None = None) -> torch.Tensor:
    """One Kronecker factor of LoKr: stored whole, as a low-rank product ``a · b``, or Tucker ``(core, a, b)``."""
    if full is not None:
        return full
    if core is not None:
        return tucker(core, a, b)
    return a @ b


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """LoKr (LyCORIS, arXiv 2309.14859): ``ΔW = w1 ⊗ w2`` (Kronecker product).

    w1: (a, c); w2: (b, d) or (b, d, kh, kw) or flattened (b, d·kh·kw), with ``out = a·b`` and ``in = c·d``.
    Returns ΔW of ``shape``.
    """
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape)


def ia3_delta(weight: torch.Tensor, gains: torch.Tensor, on_input: bool) -> torch.Tensor:
    """(IA)³ (Liu et al., arXiv 2205.05638): ``W' = W ⊙ (1 + ℓ)`` along outputs (rows) or inputs, so ``ΔW = W ⊙ ℓ``.

    weight: (out, in[, kh, kw]); gains: (out,) or (in,). Returns ΔW shaped like ``weight``.
    """
    view = [1] * weight.ndim
    view[1 if on_input else 0] = -1
    return weight * gains.reshape(view)


def glora_delta(weight: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor,
                b2: torch.Tensor) -> torch.Tensor:
    """GLoRA (Chavan et al., arXiv 2306.07967) in LyCORIS's form: ``ΔW = b2 · b1 + W · a2 · a1``.

    weight: (out, in[, kh, kw]); a1: (r, in), a2: (in, r), b2: (out, r) (1×1 convolution factors count as their
    matrices); b1: (r, in[, kh, kw]). On a k×k convolution ``W · a2 · a1`` mixes the input channels of every tap.
    """
    a1, a2, b2 = _matrix(a1), _matrix(a2), _matrix(b2)
    if weight.shape[1] != a2.shape[0] or b1[0].numel() != weight[0].numel():
        raise CheckpointError(f"GLoRA factors a2 {tuple(a2.shape)}, b1 {tuple(b1.shape)} do not fit a weight of "
                              f"shape {tuple(weight.shape)}")
    mixed = torch.einsum("o i ..., i r, r j -> o j ...", weight, a2, a1)
    return (b2 @ _matrix(b1)).reshape(weight.shape) + mixed


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Orthogonal blocks from free ones (OFT, Qiu et al., arXiv 2306.07280): ``Q = B − Bᵀ``, ``R = (I + Q)(I − Q)⁻¹``.

    blocks: (..., b, b). A positive ``constraint`` (COFT) first rescales ``Q`` to Frobenius norm at most ``constraint``.
    """
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = q.norm()
        q = q * ((norm.clamp(max=constraint) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def oft_delta(weight: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """OFT: each block of ``b`` output rows is rotated, ``W'_k = R_kᵀ W_k``; returns ``ΔW = W' − W``.

    weight: (out, …); rotations: (out / b, b, b) orthogonal blocks.
    """
    k, b, _ = rotations.shape
    blocks = weight.reshape(k, b, -1)
    rotated = torch.einsum("k n m, k n r -> k m r", rotations, blocks)
    return rotated.reshape(weight.shape) - weight


def boft_delta(weight: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """BOFT (Liu et al., arXiv 2311.06243): ``m`` butterfly stages of block rotations applied to the output rows.

    weight: (out, …); rotations: (m, out / b, b, b). Stage ``i`` groups rows with stride ``2^i · b/2`` before the
    block product, as LyCORIS's ``boft`` module does. Returns ``ΔW = W' − W``.
    """
    stages, _, b, _ = rotations.shape
    out = weight.shape[0]
    x = weight.reshape(out, -1)
    for i in range(stages):
        k = 2 ** i * (b // 2)
        perm = torch.arange(out).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
        x = x[perm].reshape(-1, b, x.shape[1])
        x = torch.einsum("g i j, g j r -> g i r", rotations[i], x).reshape(out, -1)
        x = x[torch.argsort(perm)]
    return x.reshape(weight.shape) - weight


def column_norm(weight: torch.Tensor, per_output: bool) -> torch.Tensor:
    """L2 norm of each output row (``per_output``) or each input column of a weight, broadcastable against it.

    weight: (out, in, …) → (out, 1, …) or (1, in, …).
    """
    if per_output:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
    moved = weight.transpose(0, 1)
    norm = moved.reshape(moved.shape[0], -1).norm(dim=1)
    return norm.reshape(1, -1, *[1] * (weight.ndim - 2))


def dora_delta(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
               detach_norm: bool = False) -> torch.Tensor:
    """DoRA weight decomposition (Liu et al., arXiv 2402.09353, eq. 5): ``W' = m · (W + ΔW) / ‖W + ΔW‖``; returns
    ``W' − W``.

    magnitude: (out, 1, …) — one norm per output row, as peft and LyCORIS ≥ 2 (``wd_on_out``) store it — or
    (1, in, …) — one per input column, as early LyCORIS files do. ``detach_norm`` treats the norm as a constant for
    the gradient (the paper's §4.3 memory saving, as peft trains).
    """
    per_output = magnitude.shape[0] == weight.shape[0] and magnitude[0].numel() == 1
    if not per_output and magnitude.numel() != weight.shape[1]:
        raise CheckpointError(f"DoRA magnitude of shape {tuple(magnitude.shape)} fits neither the rows nor the columns "
                              f"of a weight of shape {tuple(weight.shape)}")
    merged = weight + delta
    norm = column_norm(merged, per_output)
    if detach_norm:
        norm = norm.detach()
    return merged * (magnitude.reshape(norm.shape) / norm) - weight


def _oft(tensors: Mapping[str, torch.Tensor], weight: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """OFT/COFT/BOFT as A1111 loads them: kohya ``oft_blocks`` (alpha = COFT constraint per output), LyCORIS
    ``oft_diag`` (rotations stored directly), 4-D ``oft_blocks`` (BOFT); an optional ``rescale`` (out, 1, …)."""
    if "oft_diag" in tensors:
        rotations = tensors["oft_diag"]
    else:
        rotations = cayley(tensors["oft_blocks"], (alpha or 0.0) * weight.shape[0])
    delta = boft_delta(weight, rotations) if rotations.ndim == 4 else oft_delta(weight, rotations)
    if "rescale" in tensors:
        delta = (delta + weight) * tensors["rescale"].reshape(-1, *[1] * (weight.ndim - 1)) - weight
    return delta


def _lokr(t: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    w1 = lokr_factor(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"))
    w2 = lokr_factor(t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"))
    return lokr_delta(w1, w2, shape)


def raw_delta(kind: str, t: Mapping[str, torch.Tensor], weight: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """ΔW of one adapter before its scale and DoRA, shaped like ``weight``. ``t`` maps LyCORIS tensor names."""
    shape = weight.shape
    if kind == "lora":
        return lora_delta(t["lora_down"], t["lora_up"], shape, t.get("lora_mid"))
    if kind == "loha":
        return loha_delta(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], shape,
                          t.get("hada_t1"), t.get("hada_t2"))
    if kind == "lokr":
        return _lokr(t, shape)
    if kind == "full":
        return t["diff"].reshape(shape)
    if kind == "norm":
        return t["w_norm"].reshape(shape)
    if kind == "ia3":
        return ia3_delta(weight, t["weight"], bool(t["on_input"].item()) if "on_input" in t else False)
    if kind == "glora":
        return glora_delta(weight, t["a1"], t["a2"], t["b1"], t["b2"])
    if kind == "oft":
        return _oft(t, weight, alpha)
    raise CheckpointError(f"unknown adapter kind {kind!r}; known: {', '.join(KINDS)}")


def module_delta(kind: str, tensors: Mapping[str, torch.Tensor], weight: torch.Tensor, scale: float,
                 alpha: float | None = None, detach_norm: bool = False) -> torch.Tensor:
    """The full ΔW of one adapter on a weight: ``scale · raw ΔW``, then DoRA if ``tensors`` has ``dora_scale``.

    This is A1111's order (scale before the decomposition, multiplier after). weight: (out, in[, kh, kw]).
    """
    if math.prod(weight.shape) == 0:
        return torch.zeros_like(weight)
    delta = raw_delta(kind, tensors, weight, alpha) * scale
    if "dora_scale" in tensors:
        delta = dora_delta(weight, delta, tensors["dora_scale"], detach_norm)
    return delta


def bias_delta(kind: str, tensors: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor | None:
    """Δb of the kinds that also change a bias (``full``: ``diff_b``; ``norm``: ``b_norm``), or None.

    The scale multiplies it as in A1111 (1 for both kinds unless the file stores an explicit ``scale``).
    """
    name = {"full": "diff_b", "norm": "b_norm"}.get(kind)
    if name is None or name not in tensors:
        return None
    return tensors[name] * scale


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension = m · n`` with ``m ≤ n`` for LoKr's two Kronecker factors.

    ``factor > 0`` dividing ``dimension``: ``(factor, dimension / factor)`` ordered; otherwise the pair closest to
    the square root whose smaller part does not exceed ``factor`` (``-1``: no limit), as LyCORIS chooses.
    """
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate + dimension // candidate > m + n or candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return min(m, n), max(m, n)
