"""VisionEncoder deployment: pixels -> projected image embeddings, batched across requests.

Requests' images are gathered by `@serve.batch` and run through the tower in one forward. A
batch is bounded by images, not requests (`max_batch_images`, counted by `batch_size_fn`, so a
request with many images or tiles takes its share of the budget), and waits at most
`batch_wait_timeout_s` to fill. An LRU cache keyed by the image content hash skips images seen
recently. Only the tower and projector are loaded. Each request's embeddings go back as one
msgpack buffer (`deployments.wire`).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
from ray import serve

from vlm_core.checkpoint import load_llava_hf

from .metrics import metric
from .wire import pack_tensors


def images_in(items: list[tuple[torch.Tensor, list[str]]]) -> int:
    return sum(len(hashes) for _, hashes in items)


class VisionEncoder:
    def __init__(self, model_dir: str, dtype: str | None = None, device: str | None = None, cache_size: int = 512,
                 max_batch_images: int = 32, batch_wait_timeout_s: float = 0.002):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_llava_hf(model_dir, dtype=dtype, device=device, parts=("vision",))
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size
        self.max_batch_images = max_batch_images
        self._encode_batch.set_max_batch_size(max_batch_images)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.hits = self.misses = 0
        self.batch_sizes: list[int] = []      # images encoded per tower forward
        self.largest_request_batch = 0         # requests served by one batch (cache hits included)
        self.m_batch = metric("Histogram", "vlm_encoder_batch_images", "images encoded per tower forward",
                                         [1, 2, 4, 8, 16, 32, 64])
        self.m_hit_rate = metric("Gauge", "vlm_encoder_cache_hit_rate", "encoder cache hits / lookups")

    async def encode(self, pixels: torch.Tensor, hashes: list[str]) -> bytes:
        """pixels [N, 3, S, S] of one request -> its N embeddings [tokens_per_image, H], packed."""
        if len(hashes) != len(pixels):
            raise ValueError(f"{len(hashes)} hashes for {len(pixels)} images")
        if len(hashes) > self.max_batch_images:
            raise ValueError(f"{len(hashes)} images in one request; this encoder batches at most "
                             f"{self.max_batch_images}")
        return pack_tensors(await self._encode_batch((pixels, list(hashes))))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, batch_size_fn=images_in)
    async def _encode_batch(self, items: list[tuple[torch.Tensor, list[str]]]) -> list[list[torch.Tensor]]:
        return self.encode_items(items)

    def encode_items(self, items: list[tuple[torch.Tensor, list[str]]]) -> list[list[torch.Tensor]]:
        """One batch: every (pixels, hashes) request's embeddings, with one tower forward for the
        images not in the cache (an image repeated within the batch is encoded once)."""
        self.largest_request_batch = max(self.largest_request_batch, len(items))
        fresh: dict[str, torch.Tensor] = {}
        todo = {}
        for pixels, hashes in items:
            for px, h in zip(pixels, hashes):
                if h not in self.cache and h not in todo:
                    todo[h] = px
        if todo:
            embeds = self.model.embed_images(torch.stack(list(todo.values()))).cpu()
            fresh = dict(zip(todo, embeds))
            self.m_batch.observe(len(todo))
        self.batch_sizes.append(len(todo))
        out = []
        for _, hashes in items:
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
        return {"pid": os.getpid(), "hits": self.hits, "misses": self.misses, "batches": len(self.batch_sizes),
                "images_encoded": sum(self.batch_sizes), "largest_batch": max(self.batch_sizes, default=0),
                "largest_request_batch": self.largest_request_batch, "max_batch_images": self.max_batch_images}

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("vision model not loaded")
