"""The sampling references of the parity tests: diffusers' pipeline loop over a scheduler, and k-diffusion's
``sampling`` and ``external`` modules (the ``k-diffusion`` package, installed by the Makefile with ``--no-deps``),
loaded without the package's ``__init__``, which imports torchvision and CLIP: each file is executed as a module of
a stand-in package whose ``utils`` holds the one helper they use (``append_dims``: index with trailing ``None``'s up
to a rank); nothing of k-diffusion is copied here."""

import importlib.util
import sys
import types
from pathlib import Path

import torch

_PACKAGE = "_kdiffusion_reference"


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load_sampling() -> types.ModuleType:
    """``k_diffusion.sampling``, loaded once per process."""
    return _load("sampling")


def load_external() -> types.ModuleType:
    """``k_diffusion.external`` (``DiscreteSchedule``, ``CompVisDenoiser``: A1111's model wrappers), loaded once per
    process after ``sampling``, which it imports."""
    load_sampling()
    return _load("external")


def _load(name: str) -> types.ModuleType:
    if f"{_PACKAGE}.{name}" in sys.modules:
        return sys.modules[f"{_PACKAGE}.{name}"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: run `make test` (pip install --no-deps k-diffusion)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if _PACKAGE not in sys.modules:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(folder)]
        package.utils = types.ModuleType(f"{_PACKAGE}.utils")
        package.utils.append_dims = _append_dims
        sys.modules[_PACKAGE], sys.modules[f"{_PACKAGE}.utils"] = package, package.utils
    module_spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    setattr(sys.modules[_PACKAGE], name, module)
    return module


def diffusers_loop(scheduler, net, latents, steps, *, start=0, step_kwargs=lambda k: {}, blend=None):
    """diffusers' pipeline loop: scale_model_input, net, step (plus img2img start and inpainting blend)."""
    timesteps = scheduler.timesteps[start * scheduler.order:]
    if start:
        scheduler.set_begin_index(start * scheduler.order)
    for k, t in enumerate(timesteps):
        out = net(scheduler.scale_model_input(latents, t), t.float().expand(latents.shape[0]))
        latents = scheduler.step(out, t, latents, **step_kwargs(k)).prev_sample
        if blend is not None and scheduler.order == 1:
            latents = blend(latents, timesteps[k + 1] if k + 1 < len(timesteps) else None)
    return latents
