"""One error hierarchy for everything nijimi reports to a user.

Messages name the file, key, shape or value at fault; the CLI prints ``error: <message>`` and exits 2.
"""

import importlib
from types import ModuleType


class NijimiError(Exception):
    """Base class of every error nijimi raises on purpose."""


class ConfigError(NijimiError):
    """A bad argument, option or configuration value."""


class OutputExistsError(ConfigError):
    """An output file or folder exists and replacing it was not asked for (``--overwrite``)."""


class SamplerError(ConfigError):
    """A bad sampler name, step count, strength or σ schedule."""


class CheckpointError(NijimiError):
    """A checkpoint file that cannot be read, or whose keys/shapes do not fit the model."""


class PromptError(NijimiError):
    """A prompt that cannot be parsed or encoded."""


class ImageError(NijimiError):
    """An image or mask that cannot be read or does not fit."""


class DataError(NijimiError):
    """A training data folder or caption file that cannot be used."""


class MissingExtraError(ConfigError):
    """A feature whose optional dependency (a ``nijimi[extra]``) is not installed."""


def optional_import(module: str, needs: str, extra: str) -> ModuleType:
    """Import ``module`` at the point of use; when it is missing raise MissingExtraError
    ``<needs>: pip install 'nijimi[<extra>]'`` (``needs`` says what needs which package: "canny needs OpenCV")."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{needs}: pip install 'nijimi[{extra}]'") from None
