"""Model families: one module each, owning all the family knows.

    llava        LLaVA-1.5 in the llava-hf layout
    vila         VILA-1.5 and NVILA in the VILA folder layout
    llava_orig   the original LLaVA layout (liuhaotian LLaVA-1.5, VILA-1.0) and its AutoAWQ / TinyChat forms

Each module provides the same functions (its `FAMILY` entry below):
    detect(folder) -> bool                       is this folder one of ours
    read_config(folder, options) -> config       the family's config dataclass
    load(folder, dtype, device, parts, options) -> model   a `ComposedVLM` subclass, weights mapped by its table
    load_processor(folder, config, options)      prompt + media -> token ids with spans, media items
    save_awq(src, out, model, packed, group)     an AutoAWQ copy in the folder's own layout (the quantizer)
    save(model, processor, out)                  the model back in its folder layout (VILA)
    media_tokens(config, item) -> int            an item's embedding length (the only place it is computed)
    max_item_tiles(config) -> int                the most tiles one media item can have

`family_of(folder)` picks the family; the rest of the code asks it rather than the folder.
`options` (`LoadOptions`: vision_tower_dir, conv_mode) is what only an original-layout folder
needs; the other layouts refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection

from ..checkpoint import MODEL_PARTS
from ..errors import CheckpointError
from . import llava, llava_orig, vila
from .options import NO_OPTIONS, LoadOptions


@dataclass(frozen=True)
class Family:
    name: str
    detect: Callable[[str | Path], bool]
    read_config: Callable[..., Any]
    load: Callable[..., Any]
    processor: type
    media_tokens: Callable[[Any, Any], int]
    max_item_tiles: Callable[[Any], int]
    save_awq: Callable[..., Path] | None = None
    save: Callable[..., Path] | None = None          # (model, processor, out_dir): the folder layout back
    takes_options: bool = False

    def _check(self, options: LoadOptions | None) -> LoadOptions:
        options = options or NO_OPTIONS
        if not self.takes_options:
            options.refuse_for(self.name)
        return options

    def config(self, model_dir: str | Path, options: LoadOptions | None = None):
        options = self._check(options)
        return self.read_config(model_dir, options) if self.takes_options else self.read_config(model_dir)

    def load_model(self, model_dir: str | Path, dtype=None, device="cpu", parts: Collection[str] = MODEL_PARTS,
                   options: LoadOptions | None = None):
        options = self._check(options)
        extra = {"options": options} if self.takes_options else {}
        return self.load(model_dir, dtype=dtype, device=device, parts=parts, **extra)

    def load_processor(self, model_dir: str | Path, config=None, options: LoadOptions | None = None):
        options = self._check(options)
        if self.takes_options:
            return self.processor.from_pretrained(model_dir, config, options)
        return self.processor.from_pretrained(model_dir, config)


LLAVA = Family("llava-hf", llava.detect, llava.read_config, llava.load, llava.LlavaProcessor, llava.media_tokens,
               llava.max_item_tiles, llava.save_awq_checkpoint)
VILA = Family("VILA", vila.detect, vila.read_config, vila.load, vila.VilaProcessor, vila.media_tokens,
              vila.max_item_tiles, save=vila.save_pretrained)
LLAVA_ORIG = Family("original LLaVA", llava_orig.detect, llava_orig.read_config, llava_orig.load,
                    llava_orig.LlavaOrigProcessor, llava_orig.media_tokens, llava_orig.max_item_tiles,
                    llava_orig.save_awq_checkpoint, takes_options=True)
FAMILIES = (VILA, LLAVA_ORIG, LLAVA)      # most specific first; llava-hf last (the fallback)


def family_of(model_dir: str | Path) -> Family:
    """The family whose layout the folder has; llava-hf otherwise, whose loader then names what
    is missing or malformed."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory {d} does not exist")
    return next((f for f in FAMILIES if f.detect(d)), LLAVA)


def load_model(model_dir: str | Path, dtype=None, device="cpu", parts: Collection[str] = MODEL_PARTS,
               options: LoadOptions | None = None):
    """The model a checkpoint folder holds, whichever family it is."""
    return family_of(model_dir).load_model(model_dir, dtype=dtype, device=device, parts=parts, options=options)


def load_processor(model_dir: str | Path, config=None, options: LoadOptions | None = None):
    """The processor a checkpoint folder needs (tokenizer and image settings; no weights loaded)."""
    return family_of(model_dir).load_processor(model_dir, config, options)
