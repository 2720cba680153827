"""What a request asks of generation: `SamplingParams` with its validation, and `StructuredOutput`
(a grammar the output must follow; `structured.py` applies it). Plain Python: the API layer and
the scheduler import this without the sampler's tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import InputError, SamplingParamsError

KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")


@dataclass(frozen=True)
class StructuredOutput:
    kind: str            # one of KINDS
    spec: str = ""       # the schema (JSON text), regex, EBNF grammar, or a JSON list of choices

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"structured output kind must be one of {KINDS}, got {self.kind!r}")


SAMPLING_EPS = 1e-5          # temperatures below this sample greedily
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)   # what torch.Generator.manual_seed accepts
MAX_LOGPROBS = 20                        # top log-probabilities per token (OpenAI's bound)
MAX_N = 128                              # choices per request (OpenAI's bound)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                       # 0 = no top-k cut
    min_p: float = 0.0                   # vLLM: drop tokens below min_p x the most likely one's probability
    seed: int | None = None
    stop: tuple[str, ...] = ()           # generation ends before the first occurrence
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0        # OpenAI: minus this once for every token already generated
    frequency_penalty: float = 0.0       # OpenAI: minus this per earlier occurrence in the generated text
    repetition_penalty: float = 1.0      # transformers: logits of prompt and generated tokens / p (x p if < 0)
    min_tokens: int = 0                  # EOS and stop_token_ids are masked until this many tokens exist
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit)
    logprobs: int | None = None          # None: none; k >= 0: the sampled token's and the k most likely
    prompt_logprobs: int | None = None   # None: none; k >= 0: each prompt token's and the k most likely there
    n: int = 1                           # choices generated from the prompt (sharing its KV blocks)
    structured: StructuredOutput | None = None   # a grammar the output must follow (engine/structured.py)
    allowed_token_ids: tuple[int, ...] | None = None   # vLLM: only these tokens may be produced

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        if self.max_new_tokens < 1:
            raise SamplingParamsError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise SamplingParamsError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(int(t) for t in self.allowed_token_ids))
            if not self.allowed_token_ids:
                raise SamplingParamsError("allowed_token_ids must name at least one token")
        if self.top_k < 0:
            raise SamplingParamsError(f"top_k must be >= 0, got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingParamsError("stop strings must be non-empty strings")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise SamplingParamsError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise SamplingParamsError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise SamplingParamsError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise SamplingParamsError(f"min_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                                      f"got {self.min_tokens}")
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise SamplingParamsError("logit_bias values must be in [-100, 100]")
        if not 1 <= self.n <= MAX_N:
            raise SamplingParamsError(f"n must be in [1, {MAX_N}], got {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise SamplingParamsError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")

    @property
    def processes_logits(self) -> bool:
        """Whether the logits change before selection (penalties, bias, min_tokens)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens or self.structured or self.allowed_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def choice(self, index: int) -> "SamplingParams":
        """The parameters of choice `index` of n: one choice each, seeded `seed + index` (so choice i
        reproduces alone as a request with that seed). The prompt's log-probabilities belong to
        the request, so choice 0 alone computes them."""
        if self.n == 1 and index == 0:
            return self
        seed = self.seed
        if seed is not None:
            seed = seed + index if seed + index <= SEED_RANGE[1] else seed - index
        return dataclasses.replace(self, n=1, seed=seed, prompt_logprobs=self.prompt_logprobs if index == 0 else None)

    def make_generator(self, device="cpu"):
        """A `torch.Generator` for a seeded sampling request; None when greedy or unseeded."""
        if self.greedy or self.seed is None:
            return None
        import torch

        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g
