"""Decode steps over static buffers, replayed as CUDA graphs.

A decode-only step (every chunk one generated token) runs the decoder on fixed-size input
buffers padded to a bucket size (1, 2, 4, 8, then steps of 16 up to `max_num_seqs`):
    ids [B], positions [B], slot_mapping [B], block_tables [B, W], seq_lens [B], query_start [B + 1]
with W = blocks of a full context. Rows past the batch are padding: they read and write one
reserved scratch block, and their logits are dropped. On CUDA the forward of each bucket is
captured once as a CUDA graph and replayed: one launch for the whole decoder instead of ~35
per layer. Every bucket is captured when the engine starts (`capture_all`, largest first, all sharing one
memory pool), so no Triton compile or capture ever runs while requests are served; captures use the
thread-local capture mode. With `capture=False` the same padded forward runs eagerly (how CPU tests check the
padding against the unpadded step). Sampling stays outside the graph.

Graph-safety: nothing in the captured forward reads a device value on the host — attention
gets `max_query_len=1` instead of computing it, and the W4A16 and paged-attention kernels'
launch grids depend only on the bucket's shapes.
"""

from __future__ import annotations

import numpy as np
import torch

from .batch import block_table_array, slot_mapping
from .transfer import host_tensor
from .kv_cache import PagedKVCache, PagedKVView
from .scheduler import SchedulerOutput


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, model, cache: PagedKVCache, use_triton: bool, max_num_seqs: int, max_model_len: int,
                 scratch_block: int, capture: bool):
        self.model, self.cache, self.use_triton, self.capture = model, cache, use_triton, capture
        self.buckets = bucket_sizes(max_num_seqs)
        dev = model.device
        b, bs = self.buckets[-1], cache.block_size
        self.width = -(-max_model_len // bs)
        self.scratch = scratch_block
        self.ids = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.slots = torch.full((b,), scratch_block * bs, dtype=torch.long, device=dev)
        self.tables = torch.full((b, self.width), scratch_block, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None
        self.memory_bytes = 0

    def fits(self, out: SchedulerOutput) -> bool:
        """Decode-only, at most the largest bucket, every block table within W."""
        return (len(out.chunks) <= self.buckets[-1]
                and all(c.num_tokens == 1 and c.start >= c.seq.num_prompt_tokens for c in out.chunks)
                and max(len(c.seq.block_table) for c in out.chunks) <= self.width)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _forward(self, b: int) -> torch.Tensor:
        view = PagedKVView(self.cache, self.slots[:b], self.tables[:b], self.seq_lens[:b],
                           self.query_start[:b + 1], self.use_triton, max_query_len=1)
        hidden = self.model(self.ids[:b], self.positions[:b], view, None)
        return self.model.compute_logits(hidden).float()

    def _fill(self, out: SchedulerOutput, b: int) -> None:
        chunks, bs = out.chunks, self.cache.block_size
        n = len(chunks)
        positions = np.fromiter((c.start for c in chunks), np.int64, n)
        ids = np.fromiter((c.seq.token(c.start) for c in chunks), np.int64, n)
        tables = block_table_array(chunks, b, self.width, fill=self.scratch)
        slots = np.full(b, self.scratch * bs, np.int64)
        slots[:n] = slot_mapping(tables, np.arange(n), positions, bs)
        lens = np.ones(b, np.int32)
        lens[:n] = positions + 1
        pad = np.zeros(b - n, np.int64)
        for buf, arr in ((self.ids, np.concatenate([ids, pad])), (self.positions, np.concatenate([positions, pad])),
                         (self.slots, slots), (self.tables, tables), (self.seq_lens, lens)):
            buf[:b].copy_(host_tensor(arr, buf.device), non_blocking=True)

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> torch.Tensor:
        """fp32 logits [n, V] of a decode-only step's n sequences."""
        n = len(out.chunks)
        b = self.bucket(n)
        self._fill(out, b)
        if not self.capture:
            return self._forward(b)[:n]
        self.graphs[b].replay()
        return self.logits[b][:n]

    def capture_all(self) -> None:
        """Capture every bucket, largest first (the smaller ones reuse its pool's memory). The memory the
        graphs hold is `memory_bytes`; running out of device memory here names the bucket."""
        before = torch.cuda.memory_reserved(self.model.device)
        for b in reversed(self.buckets):
            try:
                self._capture(b)
            except torch.cuda.OutOfMemoryError as e:
                raise RuntimeError(f"capturing the decode graph of batch {b} ran out of device memory; give the "
                                   f"KV cache less (kv_cache_bytes) or lower max_num_seqs") from e
        torch.cuda.synchronize(self.model.device)
        self.memory_bytes = torch.cuda.memory_reserved(self.model.device) - before

    def _capture(self, b: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):      # warm-up outside the graph (Triton compiles, allocator)
            for _ in range(2):
                self._forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.logits[b] = self._forward(b)
        self.pool = graph.pool()
        self.graphs[b] = graph
