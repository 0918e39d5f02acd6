"""nijimi (滲み): latent diffusion from scratch — readable, fast on CPU, numerically Stable Diffusion.

``pipe = nijimi.load("embedded" | "model.safetensors" | "diffusers-folder/")`` then
``pipe.generate("a red circle on the left", seed=1).images``.
"""

from nijimi.errors import CheckpointError, ConfigError, NijimiError, PromptError, SamplerError

__version__ = "0.1.0"
__all__ = ["load", "NijimiError", "ConfigError", "SamplerError", "CheckpointError", "PromptError", "__version__"]


def load(source: str = "embedded", config=None):
    """Load a model into a :class:`nijimi.pipelines.pipeline.Pipeline` (see there); imported on first use."""
    from nijimi.pipelines.pipeline import load as load_pipeline

    return load_pipeline(source, config)
