"""Few-step adapters — LCM-LoRA (2311.05556), TCD-LoRA (2402.19159), Hyper-SD (2404.13686) — told apart by the
names their authors publish them under, and the sampler settings those authors give for them.

A file is recognised by its name (``Hyper-SD15-4steps-lora.safetensors``, ``lcm-lora-sdv1-5.safetensors``,
``TCD-SD15-LoRA.safetensors``), by its folder's name when the file has diffusers' generic name
(``lcm-lora-sdv1-5/pytorch_lora_weights.safetensors``, as downloaded from the Hub), or by the title in its kohya /
ModelSpec metadata (``ss_output_name``, ``modelspec.title``). The advice is the authors' recipe: LCM-LoRA with
diffusers' LCMScheduler, 4 steps, no CFG; TCD with its scheduler, 4 steps, γ 0.3, no CFG; Hyper-SD's N-step LoRAs
with DDIM on trailing timesteps and N steps (no CFG, or guidance 5 to 8 for the CFG-preserving ones), its one-step
LoRA with TCD and η 1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from nijimi.errors import CheckpointError
from nijimi.io import safetensors

GENERIC_STEMS = ("pytorch_lora_weights", "adapter_model", "diffusion_pytorch_model")
"""File names that say nothing about the adapter (diffusers' and peft's); their folder is read instead."""
TITLE_KEYS = ("ss_output_name", "modelspec.title")
"""Metadata entries that name an adapter (kohya's output name, ModelSpec's title)."""

_HYPER = re.compile(r"hyper[\W_]*sd", re.I)
_STEPS = re.compile(r"(\d+)[\W_]*steps?(?![a-z])", re.I)
_WORD = r"(?<![a-z]){}(?![a-z])"


@dataclass(frozen=True)
class FewStep:
    """A recognised few-step adapter: what it is, and its authors' recipe as generation-request settings
    (``sampler``, and ``steps``, ``guidance``, ``eta`` where they give one). ``advice`` adds what a single value
    cannot say."""

    kind: str
    settings: tuple[tuple[str, object], ...]
    advice: str = ""

    @property
    def sampler(self) -> str:
        """The nijimi sampler name of the recipe."""
        return dict(self.settings)["sampler"]

    @property
    def flags(self) -> str:
        """The recipe as ``nijimi generate`` flags: ``"--sampler lcm --steps 4 --guidance 1"``."""
        return " ".join(f"--{name} {value:g}" if isinstance(value, float) else f"--{name} {value}"
                        for name, value in self.settings) + self.advice


def _names(path: Path) -> list[str]:
    names = [path.parent.name if path.stem.lower() in GENERIC_STEMS else path.stem]
    if path.suffix.lower() == ".safetensors":
        try:
            metadata = safetensors.read_metadata(path)
        except (CheckpointError, OSError):  # unreadable: loading it reports the problem
            metadata = {}
        names += [metadata[key] for key in TITLE_KEYS if metadata.get(key)]
    return names


def few_step_adapter(path: str | os.PathLike) -> FewStep | None:
    """The few-step adapter at ``path``, or None when its names say it is none (see the module's docstring)."""
    for name in _names(Path(path)):
        if _HYPER.search(name):
            return _hyper_sd(name)
        if re.search(_WORD.format("tcd"), name, re.I):
            return FewStep("TCD-LoRA", (("sampler", "tcd"), ("steps", 4), ("eta", 0.3), ("guidance", 1.0)))
        if re.search(_WORD.format("lcm"), name, re.I):
            return FewStep("LCM-LoRA", (("sampler", "lcm"), ("steps", 4), ("guidance", 1.0)))
    return None


def _hyper_sd(name: str) -> FewStep:
    """Hyper-SD's recipe by the step count and CFG mark in a file name such as ``Hyper-SD15-8steps-CFG-lora``."""
    steps = _STEPS.search(name)
    if steps and steps.group(1) == "1":
        return FewStep("Hyper-SD one-step LoRA", (("sampler", "tcd"), ("eta", 1.0), ("guidance", 1.0)))
    recipe = (("sampler", "ddim-trailing"),) + ((("steps", int(steps.group(1))),) if steps else ())
    if re.search(_WORD.format("cfg"), name, re.I):
        return FewStep("Hyper-SD CFG-preserving LoRA", (*recipe, ("guidance", 6.0)), " (guidance 5 to 8)")
    return FewStep("Hyper-SD LoRA", (*recipe, ("guidance", 1.0)))
