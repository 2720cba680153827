"""VisionEncoder deployment: pixels -> projected image embeddings, batched across requests.

Requests' images are gathered by `@serve.batch` (up to `max_batch_size` requests, waiting at
most `batch_wait_timeout_s`) and run through the tower in one forward; an LRU cache keyed by
the image content hash skips images seen recently.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from ray import serve

from vlm_core.checkpoint import load_llava_hf


class VisionEncoder:
    def __init__(self, model_dir: str, dtype: str | None = None, device: str | None = None, cache_size: int = 512,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # the decoder is not used here; LLaVA checkpoints keep all parts in one file
        self.model = load_llava_hf(model_dir, dtype=dtype, device=device)
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size
        self._encode_batch.set_max_batch_size(max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.hits = self.misses = 0
        self.batch_sizes: list[int] = []      # images encoded per tower forward
        self.largest_request_batch = 0         # requests served by one batch (cache hits included)
        from ray.serve import metrics

        self.m_batch = metrics.Histogram("vlm_encoder_batch_images", "images encoded per tower forward",
                                         [1, 2, 4, 8, 16, 32, 64])
        self.m_hit_rate = metrics.Gauge("vlm_encoder_cache_hit_rate", "encoder cache hits / lookups")

    async def encode(self, pixels: torch.Tensor, hashes: list[str]) -> list[torch.Tensor]:
        """pixels [N, 3, S, S] of one request -> N embeddings [tokens_per_image, H] (CPU tensors)."""
        return await self._encode_batch((pixels, list(hashes)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, items: list[tuple[torch.Tensor, list[str]]]) -> list[list[torch.Tensor]]:
        self.largest_request_batch = max(self.largest_request_batch, len(items))
        todo, keys = [], []
        for pixels, hashes in items:
            for px, h in zip(pixels, hashes):
                if h in self.cache or h in keys:
                    continue
                todo.append(px)
                keys.append(h)
        if todo:
            embeds = self.model.embed_images(torch.stack(todo)).cpu()
            for h, e in zip(keys, embeds):
                self.cache[h] = e
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        self.batch_sizes.append(len(todo))
        if todo:
            self.m_batch.observe(len(todo))
        out = []
        for pixels, hashes in items:
            res = []
            for h in hashes:
                if h in keys:
                    self.misses += 1
                else:
                    self.hits += 1
                self.cache.move_to_end(h)
                res.append(self.cache[h])
            out.append(res)
        self.m_hit_rate.set(self.hits / max(1, self.hits + self.misses))
        return out

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "batches": len(self.batch_sizes),
                "images_encoded": sum(self.batch_sizes), "largest_batch": max(self.batch_sizes, default=0),
                "largest_request_batch": self.largest_request_batch}

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("vision model not loaded")
