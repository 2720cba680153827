"""LLaVA: a vision tower, a projector and a decoder, composed (no mixins).

embed_images(pixel_values [N, 3, S, S]) -> [N, tokens_per_image, H]
embed_tokens(ids [T]) -> [T, H]
forward(input_ids [T], positions [T], kv, inputs_embeds [T, H] | None) -> hidden [T, H]
compute_logits(hidden [N, H]) -> [N, V]

Placeholder expansion and the splicing of image embeddings into token embeddings happen
before `forward` (see `vlm_core.inputs.placeholders`), so the decoder only ever sees
embeddings and positions.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VLMConfig
from .attention import KVView
from .layers import LinearFactory, dense_linear
from .projector import build_projector
from .qwen2 import build_decoder
from .vision import VisionTower


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

    def _reference_weight(self) -> torch.Tensor:
        if self.decoder is not None:
            return self.decoder.embed_tokens.weight
        return next(self.projector.parameters())

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


class LlavaModel(ComposedVLM):
    config: VLMConfig

    @torch.inference_mode()
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._check_vision()
        feats = self.vision(pixel_values.to(self.device))         # [N, n_tok, C_v]
        return self.projector(feats.to(self.dtype))               # [N, n_tok, H]

    def embed_media(self, items) -> list[torch.Tensor]:
        """One embedding [tokens_per_image, H] per one-tile `MediaItem`, in one tower forward."""
        if not items:
            return []
        return list(self.embed_images(torch.cat([it.pixels for it in items])))
