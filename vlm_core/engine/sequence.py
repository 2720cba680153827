"""A request's state inside the engine.

Prefill and decode are one thing here: every step a sequence is scheduled for some of its
tokens not yet in the KV cache (`num_computed_tokens` .. `len(tokens)`); when a step brings it
to the end of its tokens, the step samples its next token. Preemption by recompute just resets
`num_computed_tokens` to 0 (the generated tokens stay and are prefilled again).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..inputs.placeholders import MultimodalPrompt
from .params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: MultimodalPrompt
    media_embeds: list[torch.Tensor]     # one [tokens_per_image, H] per prompt span
    media_hashes: tuple[str, ...]        # content hash per prompt span (prefix-cache keys)
    params: SamplingParams
    arrival: int                          # admission order; newer sequences are preempted first
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0            # prompt tokens served from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # chained hashes of full blocks, in order
    num_registered_blocks: int = 0        # leading blocks of block_table already offered to the prefix cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None   # per-request RNG (seeded when params.seed is set)
    index: int = 0                        # which of the request's n choices
    matcher: object | None = None         # its structured-output grammar matcher, if any
    prompt_logprobs: list | None = None   # when asked for: `TokenLogprobs` of prompt tokens 1, 2, ... scored so far
    prompt_logprobs_sent: bool = False    # they went out with the request's first output
    priority: int = 0                     # lower first (admission), and last to be preempted
    queued_at: float = 0.0                # time.perf_counter() when the request was added
    queue_time_s: float | None = None     # from queued_at to its first scheduled chunk
    cache_salt: str | None = None         # its prefix-cache namespace (blocks.root_key)

    @property
    def rank(self) -> tuple[int, int]:
        """Scheduling order: priority, then arrival."""
        return self.priority, self.arrival

    @property
    def max_prefix_hit(self) -> int:
        """Leading tokens the prefix cache may serve: all, but a position whose prompt
        log-probability is still owed has to be computed (its logits are needed)."""
        return self.num_tokens if self.prompt_logprobs is None else len(self.prompt_logprobs)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt.token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens not yet in the KV cache."""
        return self.num_tokens - self.num_computed_tokens

    def token(self, i: int) -> int:
        p = self.num_prompt_tokens
        return self.prompt.token_ids[i] if i < p else self.output_ids[i - p]

    def tokens(self, start: int, end: int) -> list[int]:
        p = self.num_prompt_tokens
        out = list(self.prompt.token_ids[start:min(end, p)])
        if end > p:
            out += self.output_ids[max(start, p) - p:end - p]
        return out

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
