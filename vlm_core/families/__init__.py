"""Model families: one module each, owning all the family knows.

    llava   LLaVA-1.5 in the llava-hf layout
    vila    VILA-1.5 and NVILA in the VILA folder layout

Each module provides the same functions (its `FAMILY` entry below):
    detect(folder) -> bool                       is this folder one of ours
    read_config(folder) -> config                the family's config dataclass
    load(folder, dtype, device, parts) -> model  a `ComposedVLM` subclass, weights mapped by its table
    Processor.from_pretrained(folder, config)    prompt + media -> token ids with spans, media items
    media_tokens(config, item) -> int            an item's embedding length (the only place it is computed)
    max_item_tiles(config) -> int                the most tiles one media item can have

`family_of(folder)` picks the family; the rest of the code asks it rather than the folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection

from ..checkpoint import MODEL_PARTS
from ..errors import CheckpointError
from . import llava, vila


@dataclass(frozen=True)
class Family:
    name: str
    detect: Callable[[str | Path], bool]
    read_config: Callable[[str | Path], Any]
    load: Callable[..., Any]
    processor: type
    media_tokens: Callable[[Any, Any], int]
    max_item_tiles: Callable[[Any], int]


LLAVA = Family("llava", llava.detect, llava.read_config, llava.load, llava.LlavaProcessor, llava.media_tokens,
               llava.max_item_tiles)
VILA = Family("vila", vila.detect, vila.read_config, vila.load, vila.VilaProcessor, vila.media_tokens,
              vila.max_item_tiles)
FAMILIES = (VILA, LLAVA)      # the VILA layout is the more specific: asked first


def family_of(model_dir: str | Path) -> Family:
    """The family whose layout the folder has; llava-hf otherwise, whose loader then names what
    is missing or malformed."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory {d} does not exist")
    return next((f for f in FAMILIES if f.detect(d)), LLAVA)


def load_model(model_dir: str | Path, dtype=None, device="cpu", parts: Collection[str] = MODEL_PARTS):
    """The model a checkpoint folder holds, whichever family it is."""
    return family_of(model_dir).load(model_dir, dtype=dtype, device=device, parts=parts)


def load_processor(model_dir: str | Path, config=None):
    """The processor a checkpoint folder needs (tokenizer and image settings; no weights loaded)."""
    return family_of(model_dir).processor.from_pretrained(model_dir, config)
