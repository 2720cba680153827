"""The batched sampler (its parameters: `params.py`).

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
from typing import Collection, Sequence

import numpy as np
import torch

from .params import SamplingParams
from .request import TokenLogprobs
from .transfer import to_device


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, min-p, top-k and top-p (vLLM's order) applied to one row of fp32 logits [V];
    removed entries are -inf. The per-row definition `filter_logits_batch` is tested against."""
    logits = logits / p.temperature
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
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
                        top_p: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """`filter_logits` for every row of logits [B, V] at once; temperature/top_p/min_p [B] float,
    top_k [B] long (V or more: no cut)."""
    logits = logits / temperature[:, None]
    if min_p is not None:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
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
    """The logits each row's sampling sees, fp32 [B, V], in vLLM's order: allowed_token_ids (all
    others at -inf), min_tokens (EOS and
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

    allowed = [i for i in rows if params[i].allowed_token_ids]
    if allowed:                  # every other token at -inf
        keep = torch.zeros(len(allowed), vocab, dtype=torch.bool, device=dev)
        r, t = _flat(list(range(len(allowed))), [params[i].allowed_token_ids for i in allowed], vocab)
        keep[idx(r), idx(t)] = True
        logits[idx(allowed)] = logits[idx(allowed)].masked_fill(~keep, float("-inf"))
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
                         [p.top_p for p in picked], [p.min_p for p in picked]], dtype=np.float64)
        dev_rows = to_device(host, dev)
        idx = dev_rows[0].long()
        min_p = dev_rows[4].float() if any(p.min_p > 0 for p in picked) else None
        filtered = filter_logits_batch(logits[idx], dev_rows[1].float(), dev_rows[2].long(), dev_rows[3].float(),
                                       min_p)
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
