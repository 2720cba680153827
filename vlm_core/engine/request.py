"""The one request type and the one output type of every entry point.

`EngineRequest` is what `VLM.request` builds, `LLMEngine.add_request` / `AsyncLLMEngine.generate`
take and the ingress sends to `LLMServer` (it pickles as it is; over Serve its embeddings travel
beside it, through the object store). `RequestOutput` is what comes back: a delta while a
request runs, and — from `VLM.generate`, merged — the whole result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from ..inputs.placeholders import MultimodalPrompt
from .params import SamplingParams


@dataclass
class EngineRequest:
    prompt: MultimodalPrompt
    media_embeds: Sequence[torch.Tensor] = ()      # one [span length, H] per prompt span
    params: SamplingParams = field(default_factory=SamplingParams)
    media_hashes: tuple[str, ...] | None = None    # content hash per span (prefix / encoder cache keys);
                                                   # None: the engine hashes the embeddings
    priority: int = 0                              # lower is admitted first and preempted last;
                                                   # equal priorities keep arrival order
    cache_salt: str | None = None                  # prefix-cache blocks are shared only between requests
                                                   # with the same salt (tenants apart)

    def with_embeds(self, media_embeds: Sequence[torch.Tensor]) -> "EngineRequest":
        """This request with its embeddings (for a request that crossed a process without them)."""
        return replace(self, media_embeds=list(media_embeds))


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one position (generated, or of the prompt), from the raw model distribution."""
    token_id: int
    logprob: float                                # of the token chosen (or given, in the prompt)
    top: tuple[tuple[int, float], ...] = ()       # the `logprobs` most likely (token id, logprob), best first
    rank: int | None = None                       # prompt positions: 1 + how many tokens are more likely


@dataclass
class RequestOutput:
    request_id: str
    text: str                    # new text since the previous output of this request
    token_ids: list[int]         # new tokens since the previous output
    finish_reason: str | None    # "stop" | "length" | "abort" | "error" on the last output
    prompt_tokens: int
    completion_tokens: int       # tokens generated so far
    cached_tokens: int           # prompt tokens served from the prefix cache
    error: str | None = None     # with finish_reason "error": what failed
    logprobs: list[TokenLogprobs] | None = None   # one per new token, when the request asked for them
    index: int = 0               # which of the request's n choices this output belongs to
    # with SamplingParams.prompt_logprobs, on the first output of choice 0: one `TokenLogprobs` per
    # prompt token after the first (its log-probability given the tokens before it, its rank, the top k)
    prompt_logprobs: list[TokenLogprobs] | None = None
    queue_time_s: float | None = None   # from the request's arrival in the engine to its first scheduled chunk


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive deltas of one choice of a request as one."""
    if a.index != b.index:
        raise ValueError("outputs of different choices do not merge")
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return RequestOutput(a.request_id, a.text + b.text, a.token_ids + b.token_ids, b.finish_reason,
                         b.prompt_tokens, b.completion_tokens, b.cached_tokens, b.error, logprobs, b.index,
                         a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
                         a.queue_time_s if a.queue_time_s is not None else b.queue_time_s)
