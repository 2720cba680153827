"""Model runner: turns a `SchedulerOutput` into flat tensors, runs the model, samples.

For a mixed batch of decodes and prefill chunks it builds, in chunk order:
  input_ids [T], positions [T], slot_mapping [T] (block_table[pos // bs] * bs + pos % bs),
  block_tables [S, max_blocks], seq_lens [S], query_start [S + 1],
and input embeddings where each chunk that covers image placeholder positions gets just the
slice of that image's embedding that falls inside it.
"""

from __future__ import annotations

import torch

from ..inputs.placeholders import splice_images
from ..models.llava import LlavaModel
from .kv_cache import PagedKVCache, PagedKVView
from .sampling import sample
from .scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, model: LlavaModel, cache: PagedKVCache, use_triton: bool):
        self.model = model
        self.cache = cache
        self.use_triton = use_triton
        self.device = model.device

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[int, int]:
        """Run one step; returns id(seq) -> sampled token for each chunk that samples."""
        bs = self.cache.block_size
        ids, positions, slots, seq_lens, query_start = [], [], [], [], [0]
        width = max(len(c.seq.block_table) for c in out.chunks)
        tables = torch.zeros(len(out.chunks), width, dtype=torch.int32)
        for i, c in enumerate(out.chunks):
            seq, end = c.seq, c.start + c.num_tokens
            ids += seq.tokens(c.start, end)
            pos = torch.arange(c.start, end)
            positions.append(pos)
            table = torch.tensor(seq.block_table, dtype=torch.long)
            slots.append(table[pos // bs] * bs + pos % bs)
            tables[i, :len(seq.block_table)] = table.to(torch.int32)
            seq_lens.append(end)
            query_start.append(query_start[-1] + c.num_tokens)
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.long)
        embeds = self._embeddings(out, input_ids)
        view = PagedKVView(self.cache, torch.cat(slots).to(dev), tables.to(dev),
                           torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                           torch.tensor(query_start, dtype=torch.int32, device=dev), self.use_triton)
        hidden = self.model(input_ids.to(dev), torch.cat(positions).to(dev), view, embeds)
        sampling = [(i, c.seq) for i, c in enumerate(out.chunks) if c.samples]
        if not sampling:
            return {}
        last = torch.tensor([query_start[i + 1] - 1 for i, _ in sampling], device=dev)
        logits = self.model.compute_logits(hidden[last]).float()
        seqs = [s for _, s in sampling]
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        return {id(s): t for s, t in zip(seqs, tokens)}

    def _embeddings(self, out: SchedulerOutput, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, H] with image slices spliced in (placeholder ids are never looked up)."""
        mask = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        off, splices = 0, []
        for c in out.chunks:
            p = c.seq.prompt
            if c.start < len(p) and p.spans:
                end = min(c.start + c.num_tokens, len(p))
                for s in p.spans:
                    lo, hi = max(s.offset, c.start), min(s.end, end)
                    if lo < hi:
                        mask[off + lo - c.start:off + hi - c.start] = True
                splices.append((off, c))
            off += c.num_tokens
        emb = self.model.embed_tokens(input_ids.masked_fill(mask, 0).to(self.device))
        for off, c in splices:
            end = min(c.start + c.num_tokens, len(c.seq.prompt))
            splice_images(emb[off:off + end - c.start], c.seq.prompt.spans, c.seq.image_embeds, c.start, end)
        return emb
