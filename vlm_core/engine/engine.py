"""The continuous-batching engine: `step()` = schedule -> execute -> update.

`LLMEngine` is synchronous and thread-safe for `add_request` / `abort` (they are queued and
applied at the start of the next step). `AsyncLLMEngine` runs steps in a background thread and
hands each request an async iterator of `RequestOutput` deltas; leaving the iterator early
(client gone, task cancelled) aborts the request and frees its KV blocks.

Image embeddings arrive already computed (by a vision encoder elsewhere) with a content hash
per image; the engine never runs the vision tower.

Failure isolation: work that belongs to one sequence (its sampling, its detokenizing, its chunk
of the forward pass) can fail that sequence alone. When a batched forward pass raises, each
chunk is run again on its own; chunks that fail alone end their requests with finish reason
"error" (and `RequestOutput.error` saying why) while every other sequence gets its token and
keeps running. Recomputing a chunk writes the same KV slots with the same values, so the retry
is exact. Only a failure outside any sequence's work (the scheduler itself) fails every request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Sequence as Seq

import torch

from kernels.utils import check_attention_shapes, triton_available

from ..errors import ContextLengthError, InputError, PlaceholderMismatchError
from ..inputs.media import content_hash
from ..models.composed import MultimodalLM
from .graphs import DecodeGraphs
from .blocks import BlockManager
from .kv_cache import PagedKVCache
from .output import OutputProcessor
from .request import EngineRequest, RequestOutput, merge_outputs
from .runner import ModelRunner, StepResult
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from .sequence import Sequence
from .structured import GrammarBackend

log = logging.getLogger(__name__)


class RequestFailedError(Exception):
    """A request ended because work for it failed inside the engine (a server-side fault; the
    other requests in the batch were unaffected)."""


@dataclass(frozen=True)
class EngineConfig(SchedulerConfig):
    """The scheduler's fields (max_num_batched_tokens, max_num_seqs, prefill_chunk_cap,
    max_partial_prefills: `SchedulerConfig`) and the engine's own."""
    block_size: int = 16
    num_blocks: int | None = None               # else sized from kv_cache_bytes
    kv_cache_bytes: int | None = None           # default: 80% of free GPU memory, or 512 MiB on CPU
    enable_prefix_caching: bool = True
    attention: str = "auto"                     # "auto" (Triton on CUDA, torch on CPU) | "triton" | "torch"
    cuda_graphs: bool = False                   # replay decode-only steps as CUDA graphs (CUDA only)

    def __post_init__(self):
        super().__post_init__()
        if self.attention not in ("auto", "triton", "torch"):
            raise ValueError(f"attention must be auto, triton or torch, got {self.attention!r}")
        if self.block_size < 1:
            raise ValueError("block_size must be positive")
        if self.cuda_graphs and self.attention == "torch":
            raise ValueError("cuda_graphs needs attention 'triton' or 'auto': the torch attention reads the batch's "
                             "lengths on the host (nonzero, tolist), which a CUDA graph cannot capture")


class LLMEngine:
    def __init__(self, model: MultimodalLM, tokenizer, eos_token_ids: Seq[int] = (), config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.eos = set(eos_token_ids)
        t = model.config.text
        self.max_model_len = t.max_position_embeddings
        per_block = PagedKVCache.bytes_per_block(t.num_layers, config.block_size, t.num_kv_heads, t.head_dim, model.dtype)
        # never more than every running sequence at full context could use
        cap = config.max_num_seqs * -(-self.max_model_len // config.block_size)
        num_blocks = config.num_blocks or max(1, min(cap, self._kv_budget() // per_block))
        # one block more than the manager hands out: the scratch block padded decode rows write to
        self.cache = PagedKVCache(t.num_layers, num_blocks + 1, config.block_size, t.num_kv_heads, t.head_dim,
                                  model.dtype, model.device)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks)
        use_triton = config.attention == "triton" or (config.attention == "auto" and model.device.type == "cuda")
        if use_triton and not triton_available(model.device):
            raise ValueError("Triton attention needs a CUDA device or TRITON_INTERPRET=1")
        if use_triton:
            check_attention_shapes(config.block_size, t.head_dim)
        graphs = None
        if config.cuda_graphs:
            if model.device.type != "cuda":
                raise ValueError("cuda_graphs needs a model on a CUDA device")
            graphs = DecodeGraphs(model, self.cache, use_triton, config.max_num_seqs, self.max_model_len,
                                  scratch_block=num_blocks, capture=True)
            graphs.capture_all()      # now, before any request: never JIT or capture while serving
        self.grammar = GrammarBackend(tokenizer, t.vocab_size, self.eos)      # structured output (loads when used)
        self.runner = ModelRunner(model, self.cache, use_triton, graphs, self.eos, self.grammar)
        self._seqs: dict[str, list[Sequence]] = {}      # a request's choices not yet finished
        self.outputs = OutputProcessor(tokenizer, self.eos, self.max_model_len)
        self._pending: list[tuple] = []
        self._lock = threading.Lock()
        self._arrivals = 0

    def _kv_budget(self) -> int:
        if self.config.kv_cache_bytes:
            return self.config.kv_cache_bytes
        if self.model.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.model.device)[0] * 0.8)
        return 512 * 1024 * 1024

    # ---- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, request: EngineRequest) -> None:
        """Queue `request` under `request_id` (checked now; admitted at the next step)."""
        prompt, media_embeds, params, media_hashes = (request.prompt, request.media_embeds, request.params,
                                                      request.media_hashes)
        if len(media_embeds) != len(prompt.spans):
            raise PlaceholderMismatchError(f"prompt has {len(prompt.spans)} image spans but "
                                           f"{len(media_embeds)} image embeddings were given")
        if len(prompt) == 0:
            raise InputError("prompt is empty")
        if len(prompt) >= self.max_model_len:
            raise ContextLengthError(f"prompt has {len(prompt)} tokens; the model's context is {self.max_model_len}")
        if -(-(len(prompt) + 1) // self.config.block_size) > self.blocks.num_blocks:
            raise ContextLengthError(f"prompt of {len(prompt)} tokens does not fit the KV cache "
                                     f"({self.blocks.num_blocks} blocks of {self.config.block_size})")
        if media_hashes is not None and len(media_hashes) != len(media_embeds):
            raise InputError(f"{len(media_hashes)} image hashes for {len(media_embeds)} images")
        hidden = self.model.config.text.hidden_size
        for i, (span, e) in enumerate(zip(prompt.spans, media_embeds)):
            if tuple(e.shape) != (span.length, hidden):
                raise PlaceholderMismatchError(f"image {i}: embedding of shape {tuple(e.shape)} for a placeholder "
                                               f"span of {span.length} tokens (expected ({span.length}, {hidden}))")
        hashes = tuple(media_hashes) if media_hashes is not None else tuple(content_hash(e) for e in media_embeds)
        compiled = self.grammar.compile(params.structured) if params.structured is not None else None
        embeds = [e.to(self.model.device, self.model.dtype) for e in media_embeds]
        with self._lock:
            if request_id in self._seqs or any(p[0] == "add" and p[1][0].request_id == request_id
                                               for p in self._pending):
                raise InputError(f"request id {request_id!r} is already in use")
            choices = []
            for i in range(params.n):
                self._arrivals += 1
                p = params.choice(i)
                choices.append(Sequence(request_id, prompt, embeds, hashes, p, self._arrivals,
                                        generator=p.make_generator(self.model.device), index=i,
                                        matcher=self.grammar.matcher(compiled, params.structured)
                                        if compiled else None,
                                        prompt_logprobs=[] if p.prompt_logprobs is not None else None,
                                        priority=request.priority, queued_at=time.perf_counter(),
                                        cache_salt=request.cache_salt))
            self._pending.append(("add", choices))

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending.append(("abort", request_id))

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._pending) or self.scheduler.has_unfinished

    def apply_pending(self) -> list[RequestOutput]:
        """Take the requests added and aborted since the last step into the scheduler (`step` does
        this first); returns the outputs of the aborts."""
        with self._lock:
            pending, self._pending = self._pending, []
        outputs = []
        for kind, item in pending:
            if kind == "add":
                self._seqs[item[0].request_id] = list(item)
                for seq in item:           # choices 1..n-1 wait while choice 0 computes the prompt
                    self.outputs.add(seq)  # blocks they share, then take them from the prefix cache
                    self.scheduler.add(seq)
            else:
                for seq in list(self._seqs.get(item, ())):
                    if not seq.finished:
                        self.scheduler.finish(seq, "abort")
                        outputs.append(self._output(seq, "", []))
                        self._forget(seq)
        return outputs

    # ---- the step --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs = self.apply_pending()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs
        now = time.perf_counter()
        for c in sched.chunks:
            if c.seq.queue_time_s is None:
                c.seq.queue_time_s = now - c.seq.queued_at
        result, late = self._execute(sched)
        outputs.extend(late)
        failed = {seq: e for seq, e in result.tokens.items() if isinstance(e, BaseException)}
        # chunks of sequences aborted while the device worked are dropped with their tokens
        gone = {c.seq for c in sched.chunks if c.seq.finished}
        if failed or gone:
            for c in sched.chunks:
                if c.seq in failed and c.seq not in gone:
                    outputs.append(self._fail(c.seq, failed[c.seq]))
            sched.chunks = [c for c in sched.chunks if c.seq not in failed and c.seq not in gone]
        for c in sched.chunks:
            if c.seq in result.prompt_logprobs:
                self._record_prompt_logprobs(c.seq, *result.prompt_logprobs[c.seq])
        for seq, token in self.scheduler.update(sched, result.tokens):
            try:
                text, new, finish = self.outputs.process(seq, token)
            except Exception as e:   # this sequence's text cannot be made: it alone ends
                outputs.append(self._fail(seq, e))
                continue
            if finish is not None:
                self.scheduler.finish(seq, finish)
            lp = result.logprobs.get(seq) if new else None
            out = self._output(seq, text, new, logprobs=[lp] if lp is not None else
                               ([] if seq.params.logprobs is not None else None))
            if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
                out.prompt_logprobs, seq.prompt_logprobs_sent = list(seq.prompt_logprobs), True
            outputs.append(out)
            if seq.finished:
                self._forget(seq)
        return outputs

    def _execute(self, sched: SchedulerOutput) -> tuple[StepResult, list[RequestOutput]]:
        """The runner's tokens for `sched`, the log-probabilities of the rows that asked (generated
        and prompt tokens), and the outputs of aborts applied meanwhile; when the batch fails, each
        chunk alone, so that only the chunks that fail by themselves map to their exception.

        Overlap: the step is queued on the device first; requests and aborts that arrived since
        the step began are applied (host work that needs no sampled token) while the device
        computes, and only then does the host wait for the tokens. Blocks join the prefix cache
        only after the wait, and only for chunks that did not fail."""
        late: list[RequestOutput] = []
        try:
            launched = self.runner.launch(sched)
            late = self.apply_pending()
            return launched.wait(), late
        except Exception as batch_error:
            chunks = [c for c in sched.chunks if not c.seq.finished]   # not those aborted meanwhile
            if len(chunks) == 1:
                return StepResult(tokens={chunks[0].seq: batch_error}), late
        result = StepResult()
        for chunk in chunks:
            try:
                result.merge(self.runner.launch(SchedulerOutput([chunk])).wait())
            except Exception as e:
                result.tokens[chunk.seq] = e
        return result, late

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, first: int, scored: list) -> None:
        """Keep the prompt scores a chunk computed that `seq` does not hold yet (a chunk run again
        after a preemption scores positions it already has)."""
        have = len(seq.prompt_logprobs)          # prompt tokens 1..have are scored
        if first <= have + 1:
            seq.prompt_logprobs.extend(scored[have + 1 - first:])

    def _fail(self, seq: Sequence, error: BaseException) -> RequestOutput:
        """End one sequence because its own work failed; the others are untouched."""
        log.error("request %s failed in the engine", seq.request_id, exc_info=error)
        self.scheduler.finish(seq, "error")
        self._forget(seq)
        return self._output(seq, "", [], error=f"{type(error).__name__}: {error}")

    def _output(self, seq: Sequence, text: str, new: list[int], error: str | None = None,
                logprobs: list | None = None) -> RequestOutput:
        return RequestOutput(seq.request_id, text, new, seq.finish_reason, seq.num_prompt_tokens,
                             len(seq.output_ids), seq.num_cached_tokens, error, logprobs, seq.index,
                             queue_time_s=seq.queue_time_s)

    def _forget(self, seq: Sequence) -> None:
        choices = self._seqs.get(seq.request_id)
        if choices is not None and all(s.finished for s in choices):
            del self._seqs[seq.request_id]
        self.outputs.drop(seq)

    def stats(self) -> dict:
        """Scheduler and KV-cache figures for metrics and operators."""
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_usage": self.blocks.usage, "free_blocks": self.blocks.num_free_blocks,
                "num_blocks": self.blocks.num_blocks, "prefix_hit_blocks": self.blocks.stats.prefix_hits,
                "preemptions": self.scheduler.num_preemptions}

    def run_to_completion(self) -> dict[str, list[RequestOutput]]:
        """Step until every request has finished; outputs grouped by request (for batch jobs, tests)."""
        got: dict[str, list[RequestOutput]] = {}
        while self.has_unfinished():
            for o in self.step():
                got.setdefault(o.request_id, []).append(o)
        return got


class AsyncLLMEngine:
    """Background step loop over an `LLMEngine`, with per-request async output streams."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    async def generate(self, request_id: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self._ensure_loop()
        queue: asyncio.Queue = asyncio.Queue()
        if request_id in self._queues:
            raise InputError(f"request id {request_id!r} is already in use")
        self._queues[request_id] = queue          # before the engine can produce anything for it
        try:
            if request.params.structured is not None:   # compiling a grammar takes a while: off the loop
                await asyncio.to_thread(self.engine.add_request, request_id, request)
            else:
                self.engine.add_request(request_id, request)
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        self._wake.set()
        finished = False
        open_choices = request.params.n
        try:
            while True:
                got = [await queue.get()]
                while not queue.empty():        # a consumer slower than the engine: what was produced
                    got.append(queue.get_nowait())   # meanwhile, as one delta per choice
                error = next((o for o in got if isinstance(o, BaseException)), None)
                if error is not None:
                    raise error
                merged: dict[int, RequestOutput] = {}
                for o in got:
                    merged[o.index] = merge_outputs(merged[o.index], o) if o.index in merged else o
                for out in merged.values():
                    if out.error is not None:
                        finished = True
                        raise RequestFailedError(out.error)
                    open_choices -= out.finish_reason is not None
                    finished = open_choices == 0
                    yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.engine.abort(request_id)
                self._wake.set()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        if self._wake is not None:
            self._wake.set()

    def stats(self) -> dict:
        return self.engine.stats()

    def check_health(self) -> None:
        """Raise if the background step loop has died."""
        task = self._task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"engine loop failed: {task.exception()!r}")

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self._wake.clear()
                if not self.engine.has_unfinished():
                    await self._wake.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # a failed step fails every request in flight, never hangs them
                for rid, q in list(self._queues.items()):
                    q.put_nowait(e)
                    self.engine.abort(rid)
                await asyncio.to_thread(self.engine.apply_pending)
                continue
            for o in outputs:
                q = self._queues.get(o.request_id)
                if q is not None:
                    q.put_nowait(o)
