"""A vision-language model composed of parts (no mixins), and the protocol the engine runs.

    embed_media(items) -> one [n_i, H] tensor per media item       (the family's model class)
    embed_tokens(ids [T]) -> [T, H]
    forward(input_ids [T], positions [T], kv, inputs_embeds [T, H] | None) -> hidden [T, H]
    compute_logits(hidden [N, H]) -> [N, V]

Placeholder expansion and the splicing of media embeddings into token embeddings happen before
`forward` (`vlm_core.inputs.placeholders.embed_chunks`), so the decoder only ever sees
embeddings and positions. Each family (`vlm_core.families`) subclasses `ComposedVLM` with its
`embed_media`.
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from .attention import KVView
from .layers import LinearFactory, dense_linear
from .projector import build_projector
from .llama import LlamaDecoder
from .qwen2 import Qwen2Decoder
from .vision import VisionTower


class MultimodalLM(Protocol):
    """What the engine, the runner and prompt scoring need of a model."""

    config: Any            # a family config: `.text` is the decoder's TextConfig
    decoder: nn.Module | None

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...

    def embed_media(self, items: Sequence[Any]) -> list[torch.Tensor]: ...

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVView,
                 inputs_embeds: torch.Tensor | None = None) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


DECODERS = {"llama": LlamaDecoder, "qwen2": Qwen2Decoder}


def build_decoder(cfg, linear: LinearFactory = dense_linear) -> LlamaDecoder:
    """The decoder class for a text config's model_type."""
    return DECODERS[cfg.model_type](cfg, linear)


class ComposedVLM(nn.Module):
    """Tower + projector + decoder. `vision`/`projector` or `decoder` may be None when only one
    side was loaded (`parts=`): a vision replica has no decoder, an LLM replica no tower."""

    def __init__(self, config, vision: VisionTower | None, projector: nn.Module | None, decoder: nn.Module | None):
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = projector
        self.decoder = decoder

    @classmethod
    def build(cls, config, linear: LinearFactory = dense_linear):
        """Randomly initialised model (weights come from a checkpoint loader in practice)."""
        return cls(config, VisionTower(config.vision), build_projector(config.projector),
                   build_decoder(config.text, linear))

    @classmethod
    def build_parts(cls, config, parts: set[str], dtype: torch.dtype, linear: LinearFactory = dense_linear):
        """The model with only `parts` built, for a loader to fill: the tower in `dtype`
        (transformers module, loaded in place), projector and decoder on the meta device (their
        tensors are assigned)."""
        vision = projector = decoder = None
        if "vision" in parts:
            vision = VisionTower(config.vision).to(dtype)
            with torch.device("meta"):
                projector = build_projector(config.projector)
        if "llm" in parts:
            with torch.device("meta"):
                decoder = build_decoder(config.text, linear)
        return cls(config, vision, projector, decoder)

    def tie_head(self) -> None:
        """Share the embedding with the output head when the decoder's config ties them."""
        if self.decoder is not None and self.decoder.config.tie_word_embeddings:
            self.decoder.lm_head.weight = self.decoder.embed_tokens.weight

    def _reference_weight(self) -> torch.Tensor:
        if self.decoder is not None:
            return self.decoder.embed_tokens.weight
        return next(itertools.chain(self.projector.parameters(), self.vision.parameters()))

    @property
    def dtype(self) -> torch.dtype:
        return self._reference_weight().dtype

    @property
    def device(self) -> torch.device:
        return self._reference_weight().device

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    @property
    def has_llm(self) -> bool:
        return self.decoder is not None

    def _check_vision(self) -> None:
        if self.vision is None:
            raise RuntimeError("this model was loaded without its vision tower (parts=('llm',))")

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVView,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(input_ids, positions, kv, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.compute_logits(hidden)
