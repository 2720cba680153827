"""What every family's processor shares: the tokenizer, its special-token lookup, the EOS set and
BOS-aware tokenizing. A family's processor (`vlm_core.families.*`) adds its prompt rendering
and media handling on top:

    prepare_media(prompt, media, apply_template) -> (MultimodalPrompt, [MediaItem])

with `media` a dict of lists (`{"image": [...], "video": [[frames]]}`) and one placeholder span per
returned item, as long as that item's embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection, Protocol, Sequence, runtime_checkable

from ..config import read_json
from ..errors import CheckpointError
from .image import ImageProcessor, ImageProcessorConfig
from .template import Message

Prompt = str | Sequence[Message]


@runtime_checkable
class Processor(Protocol):
    """What the serving layer and `VLM` need of a family's processor."""

    tokenizer: Any
    image_processor: Any
    config: Any                          # the family's config (`.text` is the decoder's TextConfig)
    eos_token_ids: frozenset[int]
    media_kinds: tuple[str, ...]         # the media dict keys `prepare_media` takes
    media_token_ids: frozenset[int]      # placeholder ids media expand into

    def prepare_media(self, prompt: Prompt, media: dict | None = None, apply_template: bool = True) -> tuple:
        """(MultimodalPrompt, [MediaItem]): token ids with one span per item, as long as its embedding."""

    def select_frames(self, frames: Sequence[Any]) -> list[Any]:
        """The frames of a video the model will see (so callers decode no others)."""


class BaseProcessor:
    media_kinds: tuple[str, ...] = ("image",)
    media_token_ids: frozenset[int] = frozenset()    # placeholder ids a prompt's media expand into

    def __init__(self, tokenizer, config_eos_ids: Collection[int]):
        self.tokenizer = tokenizer
        eos = set(config_eos_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

    @staticmethod
    def image_processor_from(preprocessor_json: Path, pad_to_square: bool,
                             fallback: ImageProcessorConfig) -> ImageProcessor:
        """The folder's `preprocessor_config.json` when it has one, else the family's fallback."""
        if preprocessor_json.is_file():
            return ImageProcessor(ImageProcessorConfig.from_preprocessor_json(read_json(preprocessor_json),
                                                                              pad_to_square))
        return ImageProcessor(fallback)

    def token_id(self, token: str, required: bool = False) -> int | None:
        """The id of a single token of the vocabulary (None when absent and not required)."""
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            if required:
                raise CheckpointError(f"the tokenizer has no {token!r} token")
            return None
        return int(tid)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of rendered text; BOS is added unless the text already starts with it."""
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def select_frames(self, frames: Sequence[Any]) -> list[Any]:
        """Families without video take none."""
        return []

    def text_ids(self, text: str | None) -> list[int]:
        """Token ids of a text fragment, no special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
