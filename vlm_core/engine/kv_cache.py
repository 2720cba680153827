"""Paged KV cache tensors and the attention view the model layers use (block bookkeeping:
`blocks.py`)."""

from __future__ import annotations

import torch

from kernels.paged_attention import paged_attention, paged_attention_torch


class PagedKVCache:
    """k/v [layers, num_blocks, block_size, Hkv, D]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


class PagedKVView:
    """The KV interface (`attend`) for one engine step over the paged cache."""

    def __init__(self, cache: PagedKVCache, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, query_start: torch.Tensor, use_triton: bool,
                 max_query_len: int | None = None):
        self.cache = cache
        self.max_query_len = max_query_len      # known on the host (no device read; CUDA-graph safe)
        self.slot_mapping = slot_mapping        # [T] int64 flat slot of each new token
        self.block_tables = block_tables        # [S, max_blocks] int32
        self.seq_lens = seq_lens                # [S] int32 context incl. new tokens
        self.query_start = query_start          # [S + 1] int32
        self.attn = paged_attention if use_triton else paged_attention_torch

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        flat_k = kc.view(-1, *kc.shape[2:])
        flat_v = vc.view(-1, *vc.shape[2:])
        flat_k.index_copy_(0, self.slot_mapping, k.to(kc.dtype))
        flat_v.index_copy_(0, self.slot_mapping, v.to(vc.dtype))
        if self.attn is paged_attention:
            return paged_attention(q, kc, vc, self.block_tables, self.seq_lens, self.query_start, scale,
                                   max_query_len=self.max_query_len)
        return self.attn(q, kc, vc, self.block_tables, self.seq_lens, self.query_start, scale)
