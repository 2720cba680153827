"""VILA-1.5 and NVILA: a vision tower (SigLIP or CLIP), a VILA projector and a LLaMA or Qwen2
decoder, composed like `LlavaModel`.

embed_media(items) -> one [n_i, H] tensor per media item
    plain: tower -> projector per tile, tiles' tokens concatenated
    dynamic S2 (NVILA): tower over every tile of every scale -> `s2.merge_scales` ->
    projector per tile-sized block -> merged back, row-major (see `vlm_core.models.s2`)
    static S2 (VILA-1.5-S2): the same merge of square grids, the projector over the whole map
embed_tokens / forward / compute_logits: the decoder's.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import VilaConfig
from ..inputs.media import MediaItem
from .llava import ComposedVLM
from .s2 import merge_scales, project_blocks


class VilaModel(ComposedVLM):
    config: VilaConfig

    @torch.inference_mode()
    def embed_media(self, items: Sequence[MediaItem]) -> list[torch.Tensor]:
        """One tower forward over every tile of every item; per-item projection."""
        if not items:
            return []
        self._check_vision()
        tiles = torch.cat([it.pixels for it in items]).to(self.device)
        feats = self.vision(tiles).to(self.dtype)                      # [T, g*g, C]
        out, start = [], 0
        for it in items:
            f = feats[start:start + it.pixels.shape[0]]
            start += it.pixels.shape[0]
            if it.pool:   # a pooled video group: frames one by one, then the pool over them
                frames = torch.stack([self._project(f[i:i + 1], None) for i in range(f.shape[0])])
                out.append(pool_frames(frames, it.pool))
            else:
                out.append(self._project(f, it.block_size))
        return out

    def _project(self, f: torch.Tensor, block_size) -> torch.Tensor:
        """Tile features [n, g*g, C] of one image -> [tokens, H]."""
        cfg = self.config
        if cfg.s2_scales:
            merged, grid = merge_scales(f, cfg.s2_scales, block_size, cfg.s2_output_scale_idx)
            return project_blocks(merged, grid if cfg.s2_dynamic else (1, 1), self.projector)
        return self.projector(f).flatten(0, 1)


def pool_frames(frames: torch.Tensor, pool: tuple[int, int, int]) -> torch.Tensor:
    """[t, n, H] frame tokens (n a square grid) -> mean over (frames, rows, cols) blocks, [t'*n', H]
    (NVILA's TSP video pooling; t and the grid side must divide by the pool)."""
    t, n, h = frames.shape
    side = int(round(n ** 0.5))
    pt, pr, pc = pool
    if t % pt or side % pr or side % pc:
        raise ValueError(f"{t} frames of {side}x{side} tokens do not pool by {pool}")
    x = frames.view(t // pt, pt, side // pr, pr, side // pc, pc, h).mean(dim=(1, 3, 5))
    return x.reshape(-1, h)
