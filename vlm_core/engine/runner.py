"""Model runner: turns a `SchedulerOutput` into flat tensors, runs the model, samples.

For a mixed batch of decodes and prefill chunks it builds, in chunk order:
  input_ids [T], positions [T], slot_mapping [T] (block_table[pos // bs] * bs + pos % bs),
  block_tables [S, max_blocks], seq_lens [S], query_start [S + 1],
and input embeddings where each chunk that covers image placeholder positions gets just the
slice of that image's embedding that falls inside it.

The host path is vectorised: per chunk only O(1) Python (its token ids and block table are
read once); positions, slots and offsets are numpy operations over the whole batch; each
tensor goes to the device in one copy (from pinned memory, non-blocking, on CUDA); the sampler
returns all tokens in one device-to-host copy. `launch` queues the step and returns at once, so
the engine can do host work while the device computes; `wait` is the step's one synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from ..inputs.placeholders import embed_chunks
from ..models.composed import MultimodalLM
from .batch import block_table_array, slot_mapping
from .transfer import to_device
from .graphs import DecodeGraphs
from .kv_cache import PagedKVCache, PagedKVView
from .sampling import SampledTokens, SamplingHistory, sample_async, score_tokens, scored_on_host
from .request import TokenLogprobs
from .scheduler import SchedulerOutput
from .sequence import Sequence

PROMPT_ROWS = 256     # logits rows made at once when scoring prompt tokens


class ModelRunner:
    def __init__(self, model: MultimodalLM, cache: PagedKVCache, use_triton: bool, graphs: DecodeGraphs | None = None,
                 eos_token_ids=(), grammar=None):
        self.model = model
        self.cache = cache
        self.use_triton = use_triton
        self.device = model.device
        self.graphs = graphs     # decode-only steps over static buffers (CUDA graphs), when set
        self.eos_token_ids = frozenset(eos_token_ids)   # what min_tokens holds back
        self.grammar = grammar                          # the engine's GrammarBackend (structured output)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> "Launched":
        """Queue one step's device work (forward and sampling) without waiting for it."""
        chunks = out.chunks
        if self.graphs is not None and self.graphs.fits(out):
            return self._sample([c.seq for c in chunks], self.graphs.run(out))
        n, bs, dev = len(chunks), self.cache.block_size, self.device
        starts = np.fromiter((c.start for c in chunks), np.int64, n)
        counts = np.fromiter((c.num_tokens for c in chunks), np.int64, n)
        query_start = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=query_start[1:])
        total = int(query_start[-1])
        ids = np.fromiter(chain.from_iterable(c.seq.tokens(c.start, c.start + c.num_tokens) for c in chunks),
                          np.int64, total)
        # position of each flat token: its chunk's start + its index inside the chunk
        positions = np.arange(total, dtype=np.int64) + np.repeat(starts - query_start[:-1], counts)
        tables = block_table_array(chunks, n, max(len(c.seq.block_table) for c in chunks))
        slots = slot_mapping(tables, np.repeat(np.arange(n), counts), positions, bs)
        input_ids = torch.from_numpy(ids)
        embeds = self._embeddings(out, input_ids)
        view = PagedKVView(self.cache, to_device(slots, dev), to_device(tables, dev),
                           to_device((starts + counts).astype(np.int32), dev),
                           to_device(query_start.astype(np.int32), dev), self.use_triton,
                           max_query_len=int(counts.max()))
        hidden = self.model(to_device(ids, dev), to_device(positions, dev), view, embeds)
        prompt = self._score_prompts(chunks, query_start, hidden)
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        if not sampling:
            return Launched([], None, prompt)
        last = to_device(query_start[1:][sampling] - 1, dev)
        logits = self.model.compute_logits(hidden[last]).float()
        return self._sample([chunks[i].seq for i in sampling], logits, prompt)

    def _sample(self, seqs, logits: torch.Tensor, prompt: dict | None = None) -> "Launched":
        params = [s.params for s in seqs]
        history = None
        if any(p.processes_logits for p in params):
            history = SamplingHistory([s.output_ids for s in seqs], [s.prompt.token_ids for s in seqs],
                                      self.eos_token_ids, [s.matcher for s in seqs], self.grammar)
        return Launched(seqs, sample_async(logits, params, [s.generator for s in seqs], history), prompt)

    def _score_prompts(self, chunks, query_start: np.ndarray, hidden: torch.Tensor) -> dict:
        """Prompt log-probabilities for the chunks of sequences that asked for them: the logits at
        each prompt position the chunk computes score the prompt token that follows it.
        seq -> (position of the first token scored, the tokens, `score_tokens`' tensors); the
        logits are made `PROMPT_ROWS` rows at a time, so a long chunk never holds [T, V] at once."""
        out = {}
        for i, c in enumerate(chunks):
            k = c.seq.params.prompt_logprobs
            end = min(c.start + c.num_tokens, c.seq.num_prompt_tokens - 1)   # position end - 1 scores token end
            if k is None or end <= c.start:
                continue
            targets = list(c.seq.prompt.token_ids[c.start + 1:end + 1])
            given = torch.tensor(targets, device=self.device)
            first = int(query_start[i])
            parts = [score_tokens(self.model.compute_logits(hidden[first + a:first + min(a + PROMPT_ROWS, len(targets))]),
                                  given[a:a + PROMPT_ROWS], k) for a in range(0, len(targets), PROMPT_ROWS)]
            out[c.seq] = (c.start + 1, targets, tuple(torch.cat(p) for p in zip(*parts)))
        return out

    def _embeddings(self, out: SchedulerOutput, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, H] with image slices spliced in (decode rows: no image work)."""
        chunks = [(c.seq.prompt.spans if c.start < c.seq.num_prompt_tokens else (), c.seq.media_embeds, c.start,
                   c.num_tokens) for c in out.chunks]
        return embed_chunks(self.model.embed_tokens, input_ids, chunks, self.device)


@dataclass
class StepResult:
    """What one step produced, per sequence: the sampled token (or the exception of a row that could
    not be sampled) of each chunk that samples, the `TokenLogprobs` of the rows that asked, and for
    prompt chunks that asked, (first prompt position scored, [`TokenLogprobs`, ...])."""
    tokens: dict[Sequence, int | BaseException] = field(default_factory=dict)
    logprobs: dict[Sequence, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[Sequence, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)

    def merge(self, other: "StepResult") -> None:
        self.tokens.update(other.tokens)
        self.logprobs.update(other.logprobs)
        self.prompt_logprobs.update(other.prompt_logprobs)


class Launched:
    """A step whose device work is queued; `wait()` gives its `StepResult`."""

    def __init__(self, seqs: list, tokens: SampledTokens | None, prompt: dict | None = None):
        self.seqs, self.tokens, self._prompt = seqs, tokens, prompt or {}

    def wait(self) -> StepResult:
        result = StepResult()
        if self.tokens is not None:
            result.tokens = dict(zip(self.seqs, self.tokens.wait()))
            result.logprobs = {s: lp for s, lp in zip(self.seqs, self.tokens.logprobs) if lp is not None}
        result.prompt_logprobs = {seq: (first, scored_on_host(targets, scored))
                                  for seq, (first, targets, scored) in self._prompt.items()}
        return result
