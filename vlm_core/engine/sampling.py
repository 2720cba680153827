"""Sampling parameters and the sampler.

temperature 0 is greedy, and so is any temperature below `SAMPLING_EPS` (1e-5): dividing fp32
logits by a smaller one overflows them, and the distribution it asks for is already the argmax.
Otherwise logits are divided by the temperature, cut to the top-k and then to the smallest set
whose probability reaches top_p (never fewer than the most likely token, however small top_p
is), and sampled with a per-request `torch.Generator` (seeded when `seed` is given, so a request
is reproducible whatever else shares its batch).

`sample` never lets one row's failure reach another row: a row that cannot be sampled (its
logits are not finite, say) yields the exception in its place, and the engine ends that request
alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SamplingParamsError

SAMPLING_EPS = 1e-5          # temperatures below this sample greedily
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)   # what torch.Generator.manual_seed accepts

@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                       # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()           # generation ends before the first occurrence
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_new_tokens < 1:
            raise SamplingParamsError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise SamplingParamsError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingParamsError(f"top_k must be >= 0, got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingParamsError("stop strings must be non-empty strings")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise SamplingParamsError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to one row of fp32 logits [V]; removed entries are -inf."""
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= p.top_p
        drop_sorted[0] = False    # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int | Exception]:
    """One token per row of logits [B, V], or the exception that row raised."""
    logits = logits.float()
    out: list[int | Exception] = []
    for row, p, g in zip(logits, params, generators):
        try:
            out.append(_sample_row(row, p, g))
        except Exception as e:     # this row alone fails; the others keep their tokens
            out.append(e)
    return out


def _sample_row(row: torch.Tensor, p: SamplingParams, g: torch.Generator | None) -> int:
    if p.greedy:
        return int(row.argmax())
    probs = filter_logits(row, p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=g))
