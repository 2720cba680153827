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


def content_hash(t: torch.Tensor, extra: str = "") -> str:
    """The content key of a tensor (pixels or embeddings) for the encoder and prefix caches:
    blake2b-128 of its bytes as fp32 (so the same values hash alike on any device and dtype),
    followed by `extra` (what else distinguishes two items with equal values)."""
    h = hashlib.blake2b(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(), digest_size=16)
    if extra:
        h.update(extra.encode())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class MediaItem:
    pixels: torch.Tensor                       # [tiles, 3, S, S]; a video item: [frames, 3, S, S]
    block_size: tuple[int, int] | None = None  # (rows, cols) of the last S2 scale
    kind: str = "image"                        # "image" | "video"
    pool: tuple[int, int, int] | None = None   # video: mean-pool (frames, rows, cols) into one span

    @property
    def hash(self) -> str:
        plain = self.block_size is None and self.pixels.shape[0] == 1 and self.kind == "image"
        return content_hash(self.pixels, "" if plain else repr((self.block_size, tuple(self.pixels.shape), self.kind,
                                                                self.pool)))
