"""LLMServer deployment: the continuous-batching engine behind a streaming handle method.

Only the decoder is loaded; image embeddings arrive from the VisionEncoder as msgpack buffers.
"""

from __future__ import annotations

import os
import time

import torch

from vlm_core.engine.engine import AsyncLLMEngine, RequestFailedError
from vlm_core.engine.request import EngineRequest, merge_outputs
from vlm_core.families import LoadOptions
from vlm_core.vlm import VLM

from .metrics import metric
from .errors import ServerOverloadedError
from .settings import LLMSettings
from .wire import unpack_tensors


class LLMServer:
    def __init__(self, model_dir: str, dtype: str | None = None, settings: LLMSettings = LLMSettings(),
                 device: str | None = None, options: LoadOptions | None = None):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        o = options or LoadOptions()
        vlm = VLM.from_pretrained(model_dir, dtype=dtype, device=device, parts=("llm",), fuse_projections=True,
                                  vision_tower_dir=o.vision_tower_dir, conv_mode=o.conv_mode)
        self.engine = AsyncLLMEngine(vlm.engine(settings.engine))
        # admitted requests beyond what one engine step runs are refused past this many
        self.max_in_flight = settings.max_in_flight
        self.in_flight = 0
        self.active: set[str] = set()         # request ids being generated here
        # tokens produced within this long of the last message sent ride in the next one (fewer
        # messages through the ingress and proxy; the first token and the last go at once)
        self.stream_interval_s = settings.stream_interval_s
        latency = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30]
        self.m_ttft = metric("Histogram", "vlm_time_to_first_token_s", "time to first token", latency)
        self.m_tpot = metric("Histogram", "vlm_time_per_output_token_s", "time per output token after the first",
                                        latency)
        self.m_queue = metric("Histogram", "vlm_queue_time_s", "time from a request's arrival in the engine to "
                              "its first scheduled chunk", latency)
        self.m_running = metric("Gauge", "vlm_running_sequences", "sequences in the running batch")
        self.m_waiting = metric("Gauge", "vlm_waiting_sequences", "sequences waiting for admission")
        self.m_kv = metric("Gauge", "vlm_kv_cache_usage", "fraction of KV blocks in use")
        self.m_prefix = metric("Gauge", "vlm_prefix_cache_hit_rate", "prompt tokens served from the prefix cache / "
                               "prompt tokens, over this replica's requests")
        self.m_requests = metric("Counter", "vlm_requests", "finished requests", tag_keys=("finish_reason",))
        self.counts = {"requests": 0, "ttft_observations": 0, "tpot_observations": 0, "queue_observations": 0,
                       "aborted": 0, "refused": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0}

    async def generate(self, request_id: str, request: EngineRequest, media_embeds: bytes | None = None):
        """Stream the engine's `RequestOutput` deltas (merged within `stream_interval_s`); a cancelled
        stream aborts the request in the engine. `media_embeds`: the VisionEncoder's packed
        embeddings for the request's spans (None without images), passed beside the request so
        that Serve hands them over through the object store."""
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            self.counts["refused"] += 1
            raise ServerOverloadedError(f"{self.in_flight} requests in flight; this replica takes "
                                        f"{self.max_in_flight}")
        if media_embeds is not None:
            request = request.with_embeds(unpack_tensors(media_embeds))
        self.in_flight += 1
        self.active.add(request_id)
        start = last = sent = time.perf_counter()
        first, finish, open_choices = True, None, request.params.n
        queued = counted = False
        held: dict[int, object] = {}          # per choice, what waits for the next message
        try:
            async for out in self.engine.generate(request_id, request):
                now = time.perf_counter()
                if not counted:
                    counted = True
                    self.counts["prompt_tokens"] += out.prompt_tokens
                    self.counts["cached_prompt_tokens"] += out.cached_tokens
                    self.m_prefix.set(self.counts["cached_prompt_tokens"] / max(1, self.counts["prompt_tokens"]))
                if not queued and out.queue_time_s is not None:
                    queued = True
                    self.m_queue.observe(out.queue_time_s)
                    self.counts["queue_observations"] += 1
                if out.token_ids:
                    if first:
                        self.m_ttft.observe(now - start)
                        self.counts["ttft_observations"] += 1
                    else:
                        self.m_tpot.observe((now - last) / len(out.token_ids))
                        self.counts["tpot_observations"] += 1
                    last = now
                open_choices -= out.finish_reason is not None
                finish = out.finish_reason if open_choices == 0 else None
                held[out.index] = merge_outputs(held[out.index], out) if out.index in held else out
                if first or out.finish_reason is not None or now - sent >= self.stream_interval_s:
                    first, sent = False, now
                    self._gauges()
                    for o in held.values():
                        yield o
                    held = {}
        except RequestFailedError:
            finish = "error"
            raise
        finally:
            self.in_flight -= 1
            self.active.discard(request_id)
            finish = finish or "abort"
            self.counts["requests"] += 1
            self.counts["aborted"] += finish == "abort"
            self.m_requests.inc(tags={"finish_reason": finish})
            self._gauges()

    def _gauges(self) -> None:
        stats = self.engine.stats()
        self.m_running.set(stats["running"])
        self.m_waiting.set(stats["waiting"])
        self.m_kv.set(stats["kv_usage"])

    def stats(self) -> dict:
        return {"pid": os.getpid(), **self.counts, **self.engine.stats(), "in_flight": self.in_flight,
                "active": sorted(self.active)}

    def check_health(self) -> None:
        self.engine.check_health()
