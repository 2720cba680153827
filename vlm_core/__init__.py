"""vlm_core: LLaVA-family vision-language models in plain PyTorch (no Ray in here)."""

from .engine.params import SamplingParams
from .errors import (CheckpointError, ConfigError, ContextLengthError, ImageError, InputError,
                     PlaceholderMismatchError, SamplingParamsError, UnknownProjectorError, VLMError)

__all__ = [
    "SamplingParams", "VLMError", "CheckpointError", "ConfigError", "UnknownProjectorError", "InputError",
    "ImageError", "PlaceholderMismatchError", "SamplingParamsError", "ContextLengthError", "VLM",
    "EngineConfig", "EngineRequest", "RequestOutput",
]


def __getattr__(name):
    if name == "VLM":
        from .vlm import VLM
        return VLM
    if name == "EngineConfig":
        from .engine.engine import EngineConfig
        return EngineConfig
    if name in ("EngineRequest", "RequestOutput"):
        from .engine import request
        return getattr(request, name)
    raise AttributeError(name)
