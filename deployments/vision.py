"""VisionEncoder deployment: media items -> projected embeddings, batched across requests.

A request sends its `MediaItem`s (a LLaVA image is one tile; an NVILA image all its S2 tiles;
a video frame one tile) with their content hashes. `@serve.batch` gathers requests' items and
runs every tile through the tower in one forward. A batch is bounded by tiles, not requests
(`vision.max_batch_images`, counted by `batch_size_fn`), and waits at most `vision.batch_wait_s` to
fill; a request with more tiles than that is encoded in several batches. An LRU cache keyed by the content hash skips items seen recently. Only the tower and
projector are loaded (LLaVA or VILA-family checkpoints alike). Each request's embeddings go
back as one msgpack buffer (`deployments.wire`), one tensor per item.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict

import torch
from ray import serve

from vlm_core.families import LoadOptions, family_of
from vlm_core.inputs.media import MediaItem

from .metrics import metric
from .settings import VisionSettings
from .wire import pack_tensors

Request = tuple[list[MediaItem], list[str]]


def tiles_in(requests: list[Request]) -> int:
    return sum(it.pixels.shape[0] for items, _ in requests for it in items)


def split_by_tiles(items: list[MediaItem], hashes: list[str], budget: int) -> list[Request]:
    """Consecutive groups of a request's items, each within `budget` tiles."""
    groups: list[Request] = [([], [])]
    used = 0
    for it, h in zip(items, hashes):
        n = it.pixels.shape[0]
        if used + n > budget and groups[-1][0]:
            groups.append(([], []))
            used = 0
        groups[-1][0].append(it)
        groups[-1][1].append(h)
        used += n
    return groups


class VisionEncoder:
    def __init__(self, model_dir: str, dtype: str | None = None, settings: VisionSettings = VisionSettings(),
                 device: str | None = None, options: LoadOptions | None = None):
        max_batch_images = settings.max_batch_images
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        family = family_of(model_dir)
        self.model = family.load_model(model_dir, dtype=dtype, device=device, parts=("vision",), options=options)
        need = family.max_item_tiles(self.model.config)
        if max_batch_images < need:
            raise ValueError(f"vision.max_batch_images ({max_batch_images}) is below the {need} tiles one media item "
                             f"of {model_dir} can have")
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = settings.cache_size
        self.max_batch_images = max_batch_images
        self._encode_batch.set_max_batch_size(max_batch_images)
        self._encode_batch.set_batch_wait_timeout_s(settings.batch_wait_s)
        self.hits = self.misses = 0
        self.in_flight = 0                     # encode calls waiting for or inside a batch
        self.batch_sizes: list[int] = []      # items encoded per tower forward
        self.largest_request_batch = 0         # requests served by one batch (cache hits included)
        self.m_batch = metric("Histogram", "vlm_encoder_batch_images", "media items encoded per tower forward",
                              [1, 2, 4, 8, 16, 32, 64])
        self.m_hit_rate = metric("Gauge", "vlm_encoder_cache_hit_rate", "encoder cache hits / lookups")

    async def encode(self, items: list[MediaItem], hashes: list[str]) -> bytes:
        """One request's media items -> their embeddings [n_i, H], packed."""
        if len(hashes) != len(items):
            raise ValueError(f"{len(hashes)} hashes for {len(items)} media items")
        for it in items:
            if it.pixels.shape[0] > self.max_batch_images:
                raise ValueError(f"a media item of {it.pixels.shape[0]} tiles exceeds the encoder's batch of "
                                 f"{self.max_batch_images}")
        self.in_flight += 1
        try:
            parts = await asyncio.gather(*(self._encode_batch(g)
                                           for g in split_by_tiles(list(items), list(hashes), self.max_batch_images)))
            return pack_tensors([e for part in parts for e in part])
        finally:
            self.in_flight -= 1

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, batch_size_fn=tiles_in)
    async def _encode_batch(self, requests: list[Request]) -> list[list[torch.Tensor]]:
        return self.encode_items(requests)

    def encode_items(self, requests: list[Request]) -> list[list[torch.Tensor]]:
        """One batch: every request's embeddings, with one tower forward for the items not in the
        cache (an item repeated within the batch is encoded once)."""
        self.largest_request_batch = max(self.largest_request_batch, len(requests))
        todo: dict[str, MediaItem] = {}
        for items, hashes in requests:
            for it, h in zip(items, hashes):
                if h not in self.cache and h not in todo:
                    todo[h] = it
        fresh: dict[str, torch.Tensor] = {}
        if todo:
            fresh = {h: e.cpu() for h, e in zip(todo, self.model.embed_media(list(todo.values())))}
            self.m_batch.observe(len(todo))
        self.batch_sizes.append(len(todo))
        out = []
        for _, hashes in requests:
            res = []
            for h in hashes:
                if h in fresh:
                    self.misses += 1
                    res.append(fresh[h])
                else:
                    self.hits += 1
                    self.cache.move_to_end(h)
                    res.append(self.cache[h])
            out.append(res)
        for h, e in fresh.items():
            self.cache[h] = e
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        self.m_hit_rate.set(self.hits / max(1, self.hits + self.misses))
        return out

    def stats(self) -> dict:
        return {"pid": os.getpid(), "in_flight": self.in_flight, "hits": self.hits, "misses": self.misses, "batches": len(self.batch_sizes),
                "images_encoded": sum(self.batch_sizes), "largest_batch": max(self.batch_sizes, default=0),
                "largest_request_batch": self.largest_request_batch, "max_batch_images": self.max_batch_images}

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("vision model not loaded")
