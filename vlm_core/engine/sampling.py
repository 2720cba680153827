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

import dataclasses
from dataclasses import dataclass
from typing import Collection, Sequence

import numpy as np
import torch

from ..errors import SamplingParamsError
from .structured import StructuredOutput
from .transfer import to_device

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
                    or self.logit_bias or self.min_tokens or self.structured)

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


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one position (generated, or of the prompt), from the raw model distribution."""
    token_id: int
    logprob: float                                # of the token chosen (or given, in the prompt)
    top: tuple[tuple[int, float], ...] = ()       # the `logprobs` most likely (token id, logprob), best first
    rank: int | None = None                       # prompt positions: 1 + how many tokens are more likely


@dataclass(frozen=True)
class SamplingHistory:
    """What the logits processors read besides the logits, one entry per row."""
    output_ids: list[Sequence[int]]          # tokens generated so far (presence / frequency, min_tokens)
    prompt_ids: list[Sequence[int]]          # prompt tokens (repetition penalty covers them too)
    eos_token_ids: Collection[int] = ()      # masked, with each row's stop_token_ids, under min_tokens
    matchers: list | None = None             # a grammar matcher per row (None: unconstrained)
    grammar: object | None = None            # the GrammarBackend that applies them


def _flat(rows: list[int], per_row: list[Sequence[int]], vocab: int) -> tuple[list[int], list[int]]:
    """(row, token) index pairs of every in-vocabulary token of each row."""
    r, t = [], []
    for i, toks in zip(rows, per_row):
        toks = [x for x in toks if 0 <= x < vocab]
        r += [i] * len(toks)
        t += toks
    return r, t


def process_logits(logits: torch.Tensor, params: list[SamplingParams], history: SamplingHistory | None
                   ) -> torch.Tensor:
    """The logits each row's sampling sees, fp32 [B, V], in vLLM's order: min_tokens (EOS and
    stop_token_ids at -inf until that many tokens exist), logit_bias (added), then the penalties —
    repetition (transformers: over prompt and generated tokens, logit / p when positive, x p when
    negative), frequency and presence (OpenAI: over generated tokens, minus frequency x count and
    presence once), and last a structured-output grammar's token bitmask. Rows without any of these
    are returned unchanged (no copy when none has)."""
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    if history is None:
        raise ValueError("penalties and min_tokens need the rows' token history")
    logits, dev, vocab = logits.clone(), logits.device, logits.shape[-1]

    def idx(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=dev)

    banned = [i for i in rows if params[i].min_tokens and len(history.output_ids[i]) < params[i].min_tokens]
    if banned:
        r, t = _flat(banned, [sorted(set(history.eos_token_ids) | set(params[i].stop_token_ids)) for i in banned],
                     vocab)
        logits[idx(r), idx(t)] = float("-inf")
    biased = [i for i in rows if params[i].logit_bias]
    if biased:
        r, t = _flat(biased, [[tok for tok, _ in params[i].logit_bias] for i in biased], vocab)
        b = [bias for i in biased for tok, bias in params[i].logit_bias if 0 <= tok < vocab]
        logits.index_put_((idx(r), idx(t)), torch.tensor(b, device=dev), accumulate=True)
    rep = [i for i in rows if params[i].repetition_penalty != 1.0]
    if rep:
        r, t = _flat(rep, [sorted(set(history.prompt_ids[i]) | set(history.output_ids[i])) for i in rep], vocab)
        r, t = idx(r), idx(t)
        pen = torch.tensor([params[i].repetition_penalty for i in range(len(params))], device=dev)[r]
        seen = logits[r, t]
        logits[r, t] = torch.where(seen < 0, seen * pen, seen / pen)
    pf = [i for i in rows if params[i].presence_penalty or params[i].frequency_penalty]
    if pf:
        counts = torch.zeros(len(pf), vocab, device=dev)
        r, t = _flat(list(range(len(pf))), [history.output_ids[i] for i in pf], vocab)
        counts.index_put_((idx(r), idx(t)), torch.ones(len(r), device=dev), accumulate=True)
        freq = torch.tensor([params[i].frequency_penalty for i in pf], device=dev)[:, None]
        pres = torch.tensor([params[i].presence_penalty for i in pf], device=dev)[:, None]
        logits[idx(pf)] -= freq * counts + pres * (counts > 0)
    constrained = [i for i in rows if history.matchers and history.matchers[i] is not None]
    if constrained:
        history.grammar.apply(logits, constrained, [history.matchers[i] for i in constrained])
    return logits


class SampledTokens:
    """Tokens (and log-probabilities, for rows that asked) on their way to the host: the copies are
    queued behind the device's work (pinned memory, non-blocking), and `wait()` is the step's one
    synchronisation. After it, `logprobs[row]` is a `TokenLogprobs` or None."""

    def __init__(self, tokens: torch.Tensor, lp_rows: list[int] = (), extras: tuple[torch.Tensor, ...] = (),
                 lp_k: list[int] = ()):
        self._rows, self._k = list(lp_rows), list(lp_k)   # rows that asked, and how many top entries each
        self._dev = [tokens, *extras]
        if tokens.is_cuda:
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in self._dev]
            for h, t in zip(self._host, self._dev):
                h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = self._dev, None
        self.logprobs: list[TokenLogprobs | None] = []

    def wait(self) -> list[int | Exception]:
        if self._event is not None:
            self._event.synchronize()
        tokens = self._host[0].tolist()
        self.logprobs = [None] * len(tokens)
        if self._rows:
            chosen, top_ids, top_lp = (h.tolist() for h in self._host[1:])
            for j, (i, k) in enumerate(zip(self._rows, self._k)):
                if tokens[i] >= 0:
                    self.logprobs[i] = TokenLogprobs(tokens[i], chosen[j], tuple(zip(top_ids[j][:k], top_lp[j][:k])))
        return [t if t >= 0 else FloatingPointError("the model produced non-finite logits for this request")
                for t in tokens]


def sample_async(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 history: SamplingHistory | None = None) -> SampledTokens:
    """Queue the sampling of one token per row of logits [B, V]; nothing waits for the device."""
    raw = logits.float()
    dev, vocab = raw.device, raw.shape[-1]
    logits = process_logits(raw, params, history)
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        picked = [params[i] for i in rows]
        # every per-row number in one host array, copied without waiting for the device
        host = np.array([rows, [p.temperature for p in picked], [p.top_k if 0 < p.top_k < vocab else vocab for p in picked],
                         [p.top_p for p in picked]], dtype=np.float64)
        dev_rows = to_device(host, dev)
        idx = dev_rows[0].long()
        filtered = filter_logits_batch(logits[idx], dev_rows[1].float(), dev_rows[2].long(), dev_rows[3].float())
        unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
        if len(unseeded) == len(rows):        # one draw from the global generator for all of them
            noise = exponential_noise((len(rows), vocab), dev, None)
        else:
            noise = _row_noise(rows, len(unseeded), generators, vocab, dev)
        tokens[idx] = (filtered.softmax(-1) / noise).argmax(-1)
    finite = torch.isfinite(raw).all(-1)
    tokens = torch.where(finite, tokens, -1)     # -1 marks a row that cannot be sampled
    lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not lp_rows:
        return SampledTokens(tokens)
    # log-probabilities of the raw model distribution (before penalties and temperature)
    lp_idx = to_device(np.array(lp_rows, dtype=np.int64), dev)
    lp = torch.log_softmax(raw[lp_idx], -1)
    chosen = lp.gather(1, tokens[lp_idx].clamp_min(0)[:, None])[:, 0]
    ks = [params[i].logprobs for i in lp_rows]
    top_lp, top_ids = _top(lp, max(ks))
    return SampledTokens(tokens, lp_rows, (chosen, top_ids, top_lp), ks)


def _row_noise(rows, unseeded: int, generators, vocab: int, dev) -> torch.Tensor:
    """Noise rows when seeded rows share a batch: one global draw for the unseeded ones (if any), then
    each seeded row its own draw, whatever shares the batch."""
    shared = iter(exponential_noise((unseeded, vocab), dev, None) if unseeded else ())
    return torch.stack([exponential_noise((vocab,), dev, generators[i]) if generators[i] is not None else next(shared)
                        for i in rows])


def _top(lp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities, token ids) of each row's k most likely tokens, best first."""
    return lp.topk(k, -1) if k else (lp[:, :0], lp[:, :0].long())


def score_tokens(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """For logits [m, V] (raw) and a given token per row [m]: that token's log-probability, its rank
    (1 + the tokens more likely) and the k most likely (ids, log-probabilities), still on the device."""
    lp = torch.log_softmax(logits.float(), -1)
    chosen = lp.gather(1, targets[:, None])[:, 0]
    rank = (lp > chosen[:, None]).sum(-1) + 1
    top_lp, top_ids = _top(lp, k)
    return chosen, rank, top_ids, top_lp


def scored_on_host(targets: Sequence[int], scored: Sequence[torch.Tensor]) -> list[TokenLogprobs]:
    """`score_tokens`' tensors as one `TokenLogprobs` per row (the copies wait for the device)."""
    chosen, rank, top_ids, top_lp = (t.tolist() for t in scored)
    return [TokenLogprobs(t, c, tuple(zip(i, v)), r) for t, c, r, i, v in zip(targets, chosen, rank, top_ids, top_lp)]


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
