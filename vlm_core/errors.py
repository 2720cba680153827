"""Typed errors. Everything a user can cause derives from `VLMError`.

`InputError` marks problems with a request (bad image, placeholder mismatch, bad sampling
parameters); the HTTP layer maps it to 4xx. `CheckpointError` and `ConfigError` are raised
while loading a model and name the file or field at fault.
"""


class VLMError(Exception):
    """Base class of every error raised on purpose by vlm_core."""


class CheckpointError(VLMError):
    """A checkpoint folder is missing a file, a file is malformed, or weights do not fit."""


class ConfigError(VLMError):
    """A model configuration value is missing, inconsistent or unsupported."""


class UnknownProjectorError(ConfigError):
    """The configured multimodal projector type is not one we implement."""


class InputError(VLMError):
    """A request is invalid (maps to HTTP 400)."""


class ImageError(InputError):
    """An image cannot be read or decoded."""


class ImageTooLargeError(ImageError):
    """An image has more pixels than allowed (decompression-bomb guard; HTTP 413)."""


class PlaceholderMismatchError(InputError):
    """The number of image placeholders in a prompt differs from the number of images."""


class SamplingParamsError(InputError):
    """A sampling parameter is out of range."""


class ContextLengthError(InputError):
    """A prompt plus its requested completion does not fit the model's context."""
