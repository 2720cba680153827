"""The KV interface between decoder layers and whatever cache holds keys and values.

Model code calls exactly one thing: `kv.attend(layer, q, k, v, scale)` on a flat batch of
tokens. The object passed as `kv` knows the layout of that batch (which tokens belong to
which sequence, how many tokens each sequence already has cached) and where to store the
new keys/values. `ContiguousKV` below is the simple per-sequence cache used by
`vlm_core.scoring`; the engine supplies a paged implementation of the same protocol, so
decoder code never changes.

Shapes: T = tokens in this forward (all sequences concatenated), Hq / Hkv = query / kv
heads, D = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from ..errors import ContextLengthError


class KVView(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Store k/v for this forward's tokens and return causal attention output.

        q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]
        """
        ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     q_offset: int) -> torch.Tensor:
    """Attention of `n` new queries over `q_offset + n` keys of one sequence.

    q [n, Hq, D], k/v [q_offset + n, Hkv, D] -> [n, Hq, D]. Query j sits at absolute
    position q_offset + j and sees keys 0..q_offset + j. GQA by head grouping.
    """
    n, kv_len = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, S, D]
    mask = None
    is_causal = False
    if n > 1:
        if q_offset == 0:
            is_causal = True
        else:
            kpos = torch.arange(kv_len, device=q.device)
            qpos = torch.arange(q_offset, q_offset + n, device=q.device)
            mask = kpos[None, :] <= qpos[:, None]  # [n, kv_len]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=qh.shape[0] != kh.shape[0])
    return out.transpose(0, 1)


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a flat batch."""

    slot: int     # cache slot of the sequence
    start: int    # tokens of this sequence already in the cache (= position of its first new token)
    length: int   # new tokens of this sequence in this forward


class ContiguousKVCache:
    """Per-sequence contiguous KV storage: k/v [layers, slots, max_len, Hkv, D]."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, num_slots, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def view(self, chunks: Sequence[SeqChunk]) -> "ContiguousKVView":
        for c in chunks:
            if c.start + c.length > self.max_len:
                raise ContextLengthError(
                    f"sequence in slot {c.slot} needs {c.start + c.length} positions; the cache holds {self.max_len}")
        return ContiguousKVView(self, tuple(chunks))


class ContiguousKVView:
    def __init__(self, cache: ContiguousKVCache, chunks: tuple[SeqChunk, ...]):
        self.cache = cache
        self.chunks = chunks

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        off = 0
        for c in self.chunks:
            end = c.start + c.length
            kc[c.slot, c.start:end] = k[off:off + c.length]
            vc[c.slot, c.start:end] = v[off:off + c.length]
            out[off:off + c.length] = causal_attention(
                q[off:off + c.length], kc[c.slot, :end], vc[c.slot, :end], scale, c.start)
            off += c.length
        return out


class UncachedKV:
    """Whole sequences attended without storing keys/values (calibration, scoring).

    The flat batch holds sequences of `lengths` tokens, each starting at position 0.
    """

    def __init__(self, lengths: Sequence[int]):
        self.lengths = tuple(lengths)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        off = 0
        for n in self.lengths:
            out[off:off + n] = causal_attention(q[off:off + n], k[off:off + n], v[off:off + n], scale, 0)
            off += n
        return out
