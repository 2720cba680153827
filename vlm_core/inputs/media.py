"""One preprocessed media item: what a vision tower encodes into one placeholder span.

A LLaVA image is one tile; an NVILA dynamic-S2 image is all tiles of all its scales plus the
last scale's block size; a video span is one frame, or with a temporal-spatial pool
(NVILA's TSP video encoder) a group of frames averaged into one. `hash` keys the prefix and
encoder caches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class MediaItem:
    pixels: torch.Tensor                       # [tiles, 3, S, S]; a video item: [frames, 3, S, S]
    block_size: tuple[int, int] | None = None  # (rows, cols) of the last S2 scale
    kind: str = "image"                        # "image" | "video"
    pool: tuple[int, int, int] | None = None   # video: mean-pool (frames, rows, cols) into one span

    @property
    def hash(self) -> str:
        h = hashlib.blake2b(self.pixels.contiguous().cpu().numpy().tobytes(), digest_size=16)
        if self.block_size is not None or self.pixels.shape[0] != 1 or self.kind != "image":
            h.update(repr((self.block_size, tuple(self.pixels.shape), self.kind, self.pool)).encode())
        return h.hexdigest()
