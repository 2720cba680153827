"""Prompt scoring: the logits of every prompt position, outside the engine.

`prompt_logits` runs prompts through the model in chunks over a contiguous KV cache; a chunk
may cut through an image's placeholder run.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .engine.request import EngineRequest
from .inputs.placeholders import chunk_embeddings
from .models.attention import ContiguousKVCache, SeqChunk
from .models.composed import MultimodalLM


@torch.inference_mode()
def prompt_logits(model: MultimodalLM, requests: Sequence[EngineRequest], chunk_size: int | None = None
                  ) -> list[torch.Tensor]:
    """fp32 logits [len, V] of every prompt position, prefilled in chunks of `chunk_size` tokens
    per request (the whole prompt when None) over a contiguous KV cache. For scoring and tests;
    serving goes through `vlm_core.engine`."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    t = model.config.text
    cache = ContiguousKVCache(t.num_layers, len(requests), max(len(r.prompt) for r in requests), t.num_kv_heads,
                              t.head_dim, model.dtype, model.device)
    done = [0] * len(requests)
    kept: list[list[torch.Tensor]] = [[] for _ in requests]
    while any(d < len(r.prompt) for d, r in zip(done, requests)):
        chunks, ids, embeds, positions = [], [], [], []
        for i, r in enumerate(requests):
            n = len(r.prompt) - done[i]
            if n <= 0:
                continue
            n = n if chunk_size is None else min(n, chunk_size)
            chunks.append(SeqChunk(slot=i, start=done[i], length=n))
            ids.append(torch.tensor(r.prompt.token_ids[done[i]:done[i] + n]))
            embeds.append(chunk_embeddings(model.embed_tokens, r.prompt, r.media_embeds, done[i], done[i] + n))
            positions.append(torch.arange(done[i], done[i] + n))
        hidden = model(torch.cat(ids).to(model.device), torch.cat(positions).to(model.device), cache.view(chunks),
                       torch.cat(embeds))
        off = 0
        for c in chunks:
            kept[c.slot].append(model.compute_logits(hidden[off:off + c.length]).float())
            off += c.length
            done[c.slot] += c.length
    return [torch.cat(k) for k in kept]
