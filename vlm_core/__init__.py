"""vlm_core: LLaVA-family vision-language models in plain PyTorch (no Ray in here)."""

from .engine.sampling import SamplingParams
from .errors import (CheckpointError, ConfigError, ContextLengthError, ImageError, InputError,
                     PlaceholderMismatchError, SamplingParamsError, UnknownProjectorError, VLMError)

__all__ = [
    "SamplingParams", "VLMError", "CheckpointError", "ConfigError", "UnknownProjectorError", "InputError",
    "ImageError", "PlaceholderMismatchError", "SamplingParamsError", "ContextLengthError", "VLM",
]


def __getattr__(name):
    if name == "VLM":
        from .vlm import VLM
        return VLM
    raise AttributeError(name)
