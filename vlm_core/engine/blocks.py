"""KV block bookkeeping (pure Python: what the scheduler and the routers import): the block manager
with prefix caching and the block keys. The cache tensors and the attention view: `kv_cache.py`.

Blocks of `block_size` token slots. A full block is keyed by a chained hash of its token ids
and, where it holds image placeholder positions, the content hash of that image and the slice
of it; so a second turn with the same image finds the first turn's blocks, and two different
images behind the same text never share one. Freed blocks keep their key and stay findable
until they are reallocated (least recently freed first, tail blocks of a sequence before its
head blocks).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


def block_key(prev: bytes, tokens, start: int, spans, media_hashes) -> bytes:
    """The prefix-cache key of the block holding `tokens` from position `start`: chained on the
    previous block's key, with the content hash and slice of every image span it overlaps."""
    end = start + len(tokens)
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(array("q", tokens).tobytes())
    for span, img in zip(spans, media_hashes):
        if span.offset < end and span.end > start:
            h.update(f"|{img}:{max(span.offset, start) - span.offset}:{min(span.end, end) - span.offset}".encode())
    return h.digest()


def root_key(cache_salt: str | None) -> bytes:
    """What a prompt's first block key is chained on: nothing, or its cache salt, so that requests
    with different salts never share a block (nor can time each other's cache hits)."""
    return b"" if not cache_salt else hashlib.blake2b(b"salt\0" + cache_salt.encode(), digest_size=16).digest()


def prompt_block_keys(prompt, media_hashes, block_size: int, cache_salt: str | None = None) -> list[bytes]:
    """The keys of a prompt's full blocks, first to last: what a replica's prefix cache holds
    after serving it (a cache-aware router matches requests on them)."""
    keys: list[bytes] = []
    ids = prompt.token_ids
    for start in range(0, len(ids) - block_size + 1, block_size):
        keys.append(block_key(keys[-1] if keys else root_key(cache_salt), ids[start:start + block_size], start,
                              prompt.spans, media_hashes))
    return keys


@dataclass
class BlockStats:
    allocated: int = 0        # fresh blocks handed out
    freed: int = 0            # block references released
    prefix_hits: int = 0      # blocks shared from the prefix cache
    evicted: int = 0          # cached blocks reused for other content


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.stats = BlockStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    # ---- hashing --------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        bs = self.block_size
        while len(seq.block_hashes) < num_full_blocks:
            i = len(seq.block_hashes)
            seq.block_hashes.append(block_key(seq.block_hashes[-1] if i else root_key(seq.cache_salt),
                                              seq.tokens(i * bs, (i + 1) * bs),
                                              i * bs, seq.prompt.spans, seq.media_hashes))
        return seq.block_hashes[:num_full_blocks]

    # ---- allocation -----------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of `seq`; at least one token is left to compute."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self.cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    @staticmethod
    def computing(seqs) -> set[bytes]:
        """Keys of the full blocks `seqs` were admitted to compute and have not yet registered: a
        request that shares them finds them cached once they are, instead of computing them too."""
        return {k for s in seqs for k in s.block_hashes[s.num_registered_blocks:]}

    def blocks_needed(self, seq: Sequence, num_tokens: int, prefix: list[int] | None = None) -> int:
        """Fresh blocks needed for `seq` to hold `num_tokens` (after taking `prefix` blocks)."""
        have = len(prefix) if prefix else len(seq.block_table)
        fresh = max(0, -(-num_tokens // self.block_size) - have)
        # prefix blocks that sit in the free pool leave it when taken
        taken_from_free = sum(1 for b in prefix if self.ref[b] == 0) if prefix else 0
        return fresh + taken_from_free

    def can_allocate(self, seq: Sequence, num_tokens: int, prefix: list[int] | None = None) -> bool:
        return self.blocks_needed(seq, num_tokens, prefix) <= len(self.free)

    def take_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        assert not seq.block_table, "prefix blocks are taken before any allocation"
        for b in blocks:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        seq.block_table = list(blocks)
        seq.num_registered_blocks = len(blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size
        seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        self.stats.prefix_hits += len(blocks)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to hold `num_tokens` slots."""
        need = -(-num_tokens // self.block_size) - len(seq.block_table)
        if need > len(self.free):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self.free)} free")
        for _ in range(max(0, need)):
            b, _ = self.free.popitem(last=False)
            key = self.key[b]
            if key is not None:
                if self.cached.get(key) == b:
                    del self.cached[key]
                self.key[b] = None
                self.stats.evicted += 1
            self.ref[b] = 1
            seq.block_table.append(b)
            self.stats.allocated += 1

    def register(self, seq: Sequence) -> None:
        """Make the full blocks of `seq`'s computed tokens findable by later requests."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_registered_blocks:
            return
        keys = self._hashes(seq, full)
        for i in range(seq.num_registered_blocks, full):
            b, key = seq.block_table[i], keys[i]
            if self.key[b] is None and key not in self.cached:
                self.cached[key] = b
                self.key[b] = key
        seq.num_registered_blocks = full

    def free_seq(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):
            self.ref[b] -= 1
            self.stats.freed += 1
            if self.ref[b] == 0:
                self.free[b] = None
        seq.block_table = []
        seq.num_registered_blocks = 0
