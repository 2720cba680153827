"""Sampling parameters and the batched sampler.

temperature 0 is greedy, and so is any temperature below `SAMPLING_EPS` (1e-5): dividing fp32
logits by a smaller one overflows them, and the distribution it asks for is already the argmax.
Otherwise logits are divided by the temperature, cut to the `top_k` most likely tokens (exactly
k, ties broken by a stable sort) and then to the smallest set whose probability reaches top_p
(never fewer than the most likely token, however small top_p is).

`sample` works on the whole batch on the logits' device: one argmax for every row, the filters
for the sampling rows as batched tensor ops, and one draw by the exponential race (the token
maximising p_i / E_i with E_i ~ Exp(1) is distributed as p). A seeded request draws its E from
its own `torch.Generator`, so its tokens do not depend on what shares its batch; unseeded rows
share one draw from the global generator. One device-to-host copy returns the tokens; with
`sample_async` it is queued behind the device's work and waited for only when the host needs them.

No row can fail another: a row whose logits are not finite (a fault upstream) yields an
exception in its place, and the engine ends that request alone.
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
        """A generator for a seeded sampling request; None when greedy or unseeded."""
        if self.greedy or self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to one row of fp32 logits [V]; removed entries are
    -inf. The per-row definition `filter_logits_batch` is tested against."""
    logits = logits / p.temperature
    sorted_logits, order = torch.sort(logits, descending=True, stable=True)
    if 0 < p.top_k < logits.shape[-1]:
        sorted_logits[p.top_k:] = float("-inf")
    if p.top_p < 1.0:
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[0] = False    # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)


def filter_logits_batch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                        top_p: torch.Tensor) -> torch.Tensor:
    """`filter_logits` for every row of logits [B, V] at once; temperature/top_p [B] float,
    top_k [B] long (V or more: no cut)."""
    logits = logits / temperature[:, None]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def exponential_noise(shape: tuple[int, ...], device, generator: torch.Generator | None) -> torch.Tensor:
    """E ~ Exp(1), kept away from 0 (a zero would pick a token of probability 0)."""
    return torch.empty(shape, device=device).exponential_(generator=generator).clamp_min_(1e-20)


class SampledTokens:
    """Tokens on their way to the host: the copy is queued behind the device's work (pinned
    memory, non-blocking), and `wait()` is the step's one synchronisation."""

    def __init__(self, tokens: torch.Tensor):
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = tokens, None

    def wait(self) -> list[int | Exception]:
        if self._event is not None:
            self._event.synchronize()
        return [t if t >= 0 else FloatingPointError("the model produced non-finite logits for this request")
                for t in self._host.tolist()]


def sample_async(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> SampledTokens:
    """Queue the sampling of one token per row of logits [B, V]; nothing waits for the device."""
    logits = logits.float()
    dev, vocab = logits.device, logits.shape[-1]
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        picked = [params[i] for i in rows]
        idx = torch.tensor(rows, device=dev)
        filtered = filter_logits_batch(
            logits[idx], torch.tensor([p.temperature for p in picked], device=dev),
            torch.tensor([p.top_k if p.top_k > 0 else vocab for p in picked], device=dev),
            torch.tensor([p.top_p for p in picked], device=dev))
        unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
        noise = torch.empty(len(rows), vocab, device=dev)
        if unseeded:                          # one draw from the global generator for all of them
            noise[unseeded] = exponential_noise((len(unseeded), vocab), dev, None)
        for j, i in enumerate(rows):         # seeded rows: their own draw, whatever shares the batch
            if generators[i] is not None:
                noise[j] = exponential_noise((vocab,), dev, generators[i])
        tokens[idx] = (filtered.softmax(-1) / noise).argmax(-1)
    finite = torch.isfinite(logits).all(-1)
    return SampledTokens(torch.where(finite, tokens, -1))     # -1 marks a row that cannot be sampled


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int | Exception]:
    """One token per row of logits [B, V], or the exception standing for a row that cannot be
    sampled."""
    return sample_async(logits, params, generators).wait()


def sample_reference(logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | None]) -> list[int]:
    """Row by row, the definition `sample` is tested against (same draws for seeded rows)."""
    out = []
    for row, p, g in zip(logits.float(), params, generators):
        if p.greedy:
            out.append(int(row.argmax()))
        else:
            probs = filter_logits(row, p).softmax(-1)
            out.append(int((probs / exponential_noise(row.shape, row.device, g)).argmax()))
    return out
