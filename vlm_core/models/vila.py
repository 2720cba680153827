"""VILA-1.5 and NVILA: a vision tower (SigLIP or CLIP), a VILA projector and a LLaMA or Qwen2
decoder, composed like `LlavaModel`.

embed_media(items) -> one [n_i, H] tensor per media item
    plain: tower -> projector per tile, tiles' tokens concatenated
    dynamic S2 (NVILA): tower over every tile of every scale -> `s2.merge_scales` ->
    projector per tile-sized block -> merged back, row-major (see `vlm_core.models.s2`)
embed_tokens / forward / compute_logits: the decoder's.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import VilaConfig
from ..inputs.media import MediaItem
from .layers import LinearFactory, dense_linear
from .llava import ComposedVLM
from .projector import build_projector
from .qwen2 import build_decoder
from .s2 import merge_scales, project_blocks
from .vision import VisionTower


class VilaModel(ComposedVLM):
    config: VilaConfig

    @classmethod
    def build(cls, config: VilaConfig, linear: LinearFactory = dense_linear) -> "VilaModel":
        return cls(config, VisionTower(config.vision), build_projector(config.projector),
                   build_decoder(config.text, linear))

    @torch.inference_mode()
    def embed_media(self, items: Sequence[MediaItem]) -> list[torch.Tensor]:
        """One tower forward over every tile of every item; per-item projection."""
        if not items:
            return []
        self._check_vision()
        tiles = torch.cat([it.pixels for it in items]).to(self.device)
        feats = self.vision(tiles).to(self.dtype)                      # [T, g*g, C]
        cfg, out, start = self.config, [], 0
        for it in items:
            f = feats[start:start + it.pixels.shape[0]]
            start += it.pixels.shape[0]
            if cfg.s2_scales:
                merged, grid = merge_scales(f, cfg.s2_scales, it.block_size, cfg.s2_output_scale_idx)
                out.append(project_blocks(merged, grid, self.projector))
            else:
                out.append(self.projector(f).flatten(0, 1))
        return out
