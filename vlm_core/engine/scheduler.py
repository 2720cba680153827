"""Scheduler: which sequences run this step, and how many of their tokens.

Policy, per step:
  1. running sequences, decodes (one token left) first, then unfinished prefills, oldest first;
     each takes min(tokens left, token budget). When the KV blocks it needs are not free, the
     running sequence not yet scheduled this step with the largest (priority, arrival) — the least
     urgent, then the newest — is preempted (its blocks freed, to be recomputed later); if there is
     none, the sequence itself waits.
  2. waiting sequences in (priority, arrival) order while the token budget, `max_num_seqs` and free blocks
     allow; a new sequence first takes whatever prefix of it the prefix cache holds (short of
     prompt positions whose log-probabilities it still owes).
  3. while other prompts compete (sequences wait, or several prefills run), a prefill chunk takes
     at most `prefill_chunk_cap` tokens in steps 1 and 2, so a long prompt cannot hold the whole
     budget while a short one queues behind it (head-of-line blocking); whatever budget is left
     after step 2 goes back to the capped chunks, oldest first, so no step leaves budget unused
     that a prefill could take. A long prompt still advances by at least the cap every step,
     however many short ones arrive.
  4. at most `max_partial_prefills` prompts are part-way through their prefill at once: a waiting
     sequence whose chunk would not finish its prompt this step is passed over (it keeps its
     place) while that many are, and the shorter ones behind it that finish this step are
     admitted; it starts as soon as one of those prefills completes, which takes a bounded number
     of steps because each advances by at least the cap. Several long prompts thus share a step
     without all of them holding KV blocks and stretching each other's time to first token. Budget
     still left at the end of the step (those prefills are finishing) goes to the prompts passed
     over, so the bound never leaves a step short of work.
  5. a waiting sequence whose first block the prefix cache lacks is one a running prefill is
     computing (turns about one picture arriving together, a shared system prompt, a request's n
     choices) keeps its place until that block is computed, then takes it from the cache: a burst
     computes what it shares once. The wait ends when that prefill computes the block or stops.
A long prompt is thus split over steps (chunked prefill) without ever stalling running decodes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Mapping

from .blocks import BlockManager
from .sequence import Sequence, SeqStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048   # token budget of one step (decodes + prefill chunks)
    max_num_seqs: int = 64               # sequences running at once
    prefill_chunk_cap: int | None = None  # a prefill's tokens per step while others compete;
                                          # None: a quarter of the budget
    max_partial_prefills: int = 2         # prompts part-way through their prefill at once

    def __post_init__(self):
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1 or self.max_partial_prefills < 1:
            raise ValueError("max_num_batched_tokens, max_num_seqs and max_partial_prefills must be positive")
        if self.prefill_chunk_cap is not None and self.prefill_chunk_cap < 1:
            raise ValueError("prefill_chunk_cap must be positive")

    @property
    def chunk_cap(self) -> int:
        return self.prefill_chunk_cap or max(1, self.max_num_batched_tokens // 4)


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int        # first position computed this step (= tokens already in the KV cache)
    num_tokens: int   # positions start .. start + num_tokens - 1 are computed this step

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the sequence's tokens, so its last logits are sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """The one contract between scheduler and runner."""

    # Chunks in execution order: decodes first, then prefill chunks. The runner lays their tokens
    # out flat in this order and samples one token for each chunk whose `samples` is true.
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # Sequences preempted this step (their KV was dropped; they will be recomputed).
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: list[Sequence] = []      # kept in (priority, arrival) order
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.rank)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stop condition, abort) and release its blocks at once."""
        if seq.finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()
        order = sorted(self.running, key=lambda s: (s.num_remaining > 1, s.rank))
        contended = bool(self.waiting) or sum(s.num_remaining > 1 for s in self.running) > 1
        cap = self.config.chunk_cap if contended else budget
        capped: list[int] = []     # indexes in out.chunks of chunks the cap cut short
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:   # preempted earlier in this loop
                continue
            n = min(seq.num_remaining, budget)
            cut = n > cap
            n = min(n, cap)
            while not self.blocks.can_allocate(seq, seq.num_computed_tokens + n):
                victims = [s for s in self.running if id(s) not in scheduled and s is not seq]
                if not victims:
                    break
                self._preempt(max(victims, key=lambda s: s.rank), out)
            if not self.blocks.can_allocate(seq, seq.num_computed_tokens + n):
                self._preempt(seq, out)
                continue
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            if cut:
                capped.append(len(out.chunks))
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            scheduled.add(id(seq))
            budget -= n

        # prompts still part-way through their prefill after this step's chunks
        finishing = {id(c.seq) for c in out.chunks if c.samples}
        partial = sum(1 for s in self.running if s.num_remaining > 1 and id(s) not in finishing)
        # blocks running prefills are computing (admissions below add theirs): rule 5
        computing = self.blocks.computing(self.running) if self.waiting else set()
        budget = self._admit(out, budget, cap, capped, self.config.max_partial_prefills - partial, computing)
        for i in capped:              # budget nobody else took goes back to the capped prefills
            if budget == 0:
                break
            c = out.chunks[i]
            more = min(c.seq.num_tokens - c.start - c.num_tokens, budget)
            if more > 0 and self.blocks.can_allocate(c.seq, c.start + c.num_tokens + more):
                self.blocks.allocate(c.seq, c.start + c.num_tokens + more)
                out.chunks[i] = ScheduledChunk(c.seq, c.start, c.num_tokens + more)
                budget -= more
        # budget still left (the prefills above are about to finish): prompts passed over for the
        # partial-prefill bound take it rather than leave it unused
        self._admit(out, budget, budget, [], None, computing)
        return out

    def _admit(self, out: SchedulerOutput, budget: int, cap: int, capped: list[int], partial_room: int | None,
               computing: set[bytes]) -> int:
        """Admit waiting sequences in order into `out` within `budget` (chunks of at most `cap`);
        with `partial_room` not None, at most that many may stay part-way through their prefill,
        the others keep their place while shorter ones behind them go; a sequence whose next block
        is in `computing` waits (rule 5), and each one admitted adds the blocks it will compute.
        Returns the budget left."""
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs \
                and not out.preempted:
            seq = self.waiting[i]
            prefix = self.blocks.match_prefix(seq)[:seq.max_prefix_hit // self.blocks.block_size] \
                if seq.num_computed_tokens == 0 else []
            if self._next_block_computing(seq, prefix, computing):
                i += 1                # keeps its place, and finds those blocks cached a step later
                continue
            start = len(prefix) * self.blocks.block_size
            n = min(seq.num_tokens - start, budget)
            cut = n > cap
            n = min(n, cap)
            unfinished = start + n < seq.num_tokens
            if unfinished and partial_room is not None and partial_room <= 0:
                i += 1                # keeps its place; shorter prompts behind it may go
                continue
            if not self.blocks.can_allocate(seq, start + n, prefix):
                break
            self.waiting.pop(i)
            if unfinished and partial_room is not None:
                partial_room -= 1
            if prefix:
                self.blocks.take_prefix(seq, prefix)
            computing.update(seq.block_hashes[seq.num_registered_blocks:])
            self.blocks.allocate(seq, start + n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if cut:
                capped.append(len(out.chunks))
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return budget

    def _next_block_computing(self, seq: Sequence, prefix: list[int], computing: set[bytes]) -> bool:
        """The first block of `seq` the prefix cache lacks is one a running prefill is computing
        (a burst of turns of one conversation, or of one system prompt): `seq` waits for it rather
        than compute the shared blocks again. The wait is bounded, as that prefill advances every
        step or, preempted, stops being waited for."""
        n = len(prefix)
        return bool(computing) and seq.num_computed_tokens == 0 and n < len(seq.block_hashes) \
            and n < seq.max_prefix_hit // self.blocks.block_size and seq.block_hashes[n] in computing

    def update(self, out: SchedulerOutput, sampled: Mapping[Sequence, int]) -> list[tuple[Sequence, int]]:
        """Advance sequences after the runner ran `out`: their computed tokens move on and their
        full blocks join the prefix cache. Returns (seq, sampled token) for the chunks that
        sample; what the token means (append, stop) is the output processor's to decide."""
        results = []
        for chunk in out.chunks:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            self.blocks.register(seq)
            if chunk.samples:
                results.append((seq, sampled[seq]))
        return results
