"""nijimi (滲み): latent diffusion from scratch — readable, fast on CPU, numerically Stable Diffusion.

``pipe = nijimi.load("embedded" | "model.safetensors" | "diffusers-folder/", device="cpu", dtype=torch.float32)``
then ``pipe.generate("a red circle on the left", seed=1).images``, or ``pipe.generate(GenerationRequest(...))``
(:mod:`nijimi.pipelines.request`).
"""

from nijimi.errors import CheckpointError, ConfigError, NijimiError, PromptError, SamplerError

__version__ = "0.1.0"
__all__ = ["load", "NijimiError", "ConfigError", "SamplerError", "CheckpointError", "PromptError", "__version__"]


def load(source="embedded", config=None, *, device="cpu", dtype=None):
    """Load a model into a :class:`nijimi.pipelines.pipeline.Pipeline` on ``device`` with the U-Net and text encoder
    in ``dtype`` (default float32; see :func:`nijimi.pipelines.pipeline.load`); imported on first use."""
    import torch

    from nijimi.pipelines.pipeline import load as load_pipeline

    return load_pipeline(source, config, device=device, dtype=torch.float32 if dtype is None else dtype)
