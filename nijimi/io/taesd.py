"""Reading TAESD weights (:mod:`nijimi.models.taesd`) from the files users hold.

- ``taesd_decoder.safetensors`` / ``taesd_encoder.safetensors`` (or ``.pth``): one half each, in our own key tree
  (the decoder's file starts at ``1.weight``, the encoder's at ``0.weight``);
- a folder holding either or both of them (the published repository's layout);
- a diffusers ``AutoencoderTiny`` folder (``config.json`` + ``diffusion_pytorch_model.*``), or its weights file
  alone: ``encoder.layers.i.…`` / ``decoder.layers.i.…``. The renames are one rule (:func:`from_diffusers`,
  :func:`to_diffusers`): DecoderTiny clamps in ``forward`` instead of in a layer 0, so its layer ``i`` is our ``i+1``.

The config is read off the weights: the width and latent channels from the first conv, the blocks per stage from
the runs of blocks between plain convs; then each half loads with one strict ``load_state_dict``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from nijimi.errors import CheckpointError
from nijimi.io.files import load_state_dict, require_finite_float
from nijimi.models.taesd import TAESD, TAESDConfig

_PARTS = ("encoder", "decoder")
_SHIFT = {"encoder": 0, "decoder": 1}  # our layer index minus diffusers' (DecoderTiny has no clamp layer)
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                      "diffusion_pytorch_model.fp16.safetensors")


def _move(sd: Mapping[str, torch.Tensor], pattern: str, template: str, sign: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(pattern, key)
        if m is None:
            raise CheckpointError(f"{key}: not a TAESD key")
        part, index, rest = m.groups()
        out[template.format(part, int(index) + sign * _SHIFT[part], rest)] = value
    return out


def from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderTiny keys (``decoder.layers.0.weight``) → ours with the half as prefix (``decoder.1.weight``)."""
    return _move(sd, r"(encoder|decoder)\.layers\.(\d+)\.(.+)", "{}.{}.{}", 1)


def to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`from_diffusers`: ``decoder.1.weight`` → ``decoder.layers.0.weight``."""
    return _move(sd, r"(encoder|decoder)\.(\d+)\.(.+)", "{}.layers.{}.{}", -1)


def config_from_weights(sd: Mapping[str, torch.Tensor], part: str, source: str) -> TAESDConfig:
    """The config of one half's weights ``sd`` (our keys, no prefix); CheckpointError naming ``source`` when they are
    not a TAESD ``part``."""
    layers = sorted({int(k.split(".")[0]) for k in sd if k.split(".")[0].isdigit()})
    runs = [0]  # blocks in a row; a plain conv ends a run
    for i in layers:
        if f"{i}.conv.0.weight" in sd:
            runs[-1] += 1
        elif runs[-1]:
            runs.append(0)
    first = sd.get("1.weight" if part == "decoder" else "0.weight")
    last = sd.get(f"{layers[-1]}.weight") if layers else None
    if first is None or last is None or first.ndim != 4 or runs == [0]:
        raise CheckpointError(f"{source}: not a TAESD {part} (no first conv and blocks)")
    blocks = tuple(n for n in runs if n)
    latent = first.shape[1] if part == "decoder" else last.shape[0]
    return TAESDConfig(latent, first.shape[0], blocks[::-1] if part == "decoder" else blocks)


def _halves(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each half found at ``path``, in our keys without prefix."""
    if path.is_dir():
        published = [path / f"taesd_{part}{suffix}" for part in _PARTS for suffix in (".safetensors", ".pth")]
        found = {file.stem[len("taesd_"):]: file for file in reversed(published) if file.is_file()}  # .safetensors wins
        if found:
            return {part: load_state_dict(file)[0] for part, file in found.items()}
        weights = [path / name for name in _DIFFUSERS_WEIGHTS if (path / name).is_file()]
        if not weights:
            raise CheckpointError(f"{path}: holds neither taesd_decoder/taesd_encoder files nor diffusers weights "
                                  f"({_DIFFUSERS_WEIGHTS[0]})")
        path = weights[0]
    sd = load_state_dict(path)[0]
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in sd):
        native = from_diffusers(sd)
        return {part: {k[len(part) + 1:]: v for k, v in native.items() if k.startswith(part + ".")}
                for part in _PARTS if any(k.startswith(part + ".") for k in native)}
    return {"encoder" if "0.weight" in sd else "decoder": sd}


def load_taesd(path: str | os.PathLike) -> TAESD:
    """The TAESD halves in ``path`` (see the module docstring), float32, in eval mode; the missing half is None.

    Raises CheckpointError naming the file for anything else, halves of different shapes, or weights that do not
    fit (missing, unexpected or mis-shaped keys by name).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such TAESD file or folder")
    halves = _halves(path)
    configs = {part: config_from_weights(sd, part, str(path)) for part, sd in halves.items()}
    if len(set(configs.values())) > 1:
        raise CheckpointError(f"{path}: the encoder and decoder have different shapes: {configs}")
    model = TAESD(next(iter(configs.values())), encoder="encoder" in halves, decoder="decoder" in halves)
    for part, sd in halves.items():
        require_finite_float(sd, path)
        try:
            getattr(model, part).load_state_dict(sd, strict=True)  # copies cast fp16/bf16 to float32
        except RuntimeError as exc:
            problems = " ".join(str(exc).split())
            raise CheckpointError(f"{path}: the {part} weights do not fit TAESD: {problems}") from None
    return model.eval()
