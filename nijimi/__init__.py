"""nijimi (滲み): latent diffusion from scratch — readable, fast on CPU, numerically Stable Diffusion."""

from nijimi.errors import CheckpointError, ConfigError, NijimiError, PromptError, SamplerError

__version__ = "0.1.0"
__all__ = ["NijimiError", "ConfigError", "SamplerError", "CheckpointError", "PromptError", "__version__"]
