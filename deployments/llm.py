"""LLMServer deployment: the continuous-batching engine behind a streaming handle method.

Only the decoder is loaded; image embeddings arrive from the VisionEncoder as msgpack buffers.
"""

from __future__ import annotations

import time

import torch

from vlm_core.engine.engine import AsyncLLMEngine, EngineConfig
from vlm_core.engine.sampling import SamplingParams
from vlm_core.inputs.placeholders import ImageSpan, MultimodalPrompt
from vlm_core.vlm import VLM

from .metrics import metric
from .wire import unpack_tensors


class LLMServer:
    def __init__(self, model_dir: str, dtype: str | None = None, device: str | None = None,
                 engine: dict | None = None):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        vlm = VLM.from_pretrained(model_dir, dtype=dtype, device=device, parts=("llm",))
        self.engine = AsyncLLMEngine(vlm.engine(EngineConfig(**(engine or {}))))
        latency = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30]
        self.m_ttft = metric("Histogram", "vlm_time_to_first_token_s", "time to first token", latency)
        self.m_tpot = metric("Histogram", "vlm_time_per_output_token_s", "time per output token after the first",
                                        latency)
        self.m_running = metric("Gauge", "vlm_running_sequences", "sequences in the running batch")
        self.m_waiting = metric("Gauge", "vlm_waiting_sequences", "sequences waiting for admission")
        self.m_kv = metric("Gauge", "vlm_kv_cache_usage", "fraction of KV blocks in use")
        self.m_requests = metric("Counter", "vlm_requests", "finished requests", tag_keys=("finish_reason",))
        self.counts = {"requests": 0, "ttft_observations": 0, "tpot_observations": 0, "aborted": 0}

    async def generate(self, request_id: str, token_ids: list[int], spans: list[tuple[int, int]],
                       image_embeds: bytes | None, image_hashes: list[str], sampling: SamplingParams):
        """Stream output deltas as dicts; a cancelled stream aborts the request in the engine.
        `image_embeds`: the VisionEncoder's packed embeddings (None without images)."""
        prompt = MultimodalPrompt(tuple(token_ids), tuple(ImageSpan(o, n) for o, n in spans))
        image_embeds = unpack_tensors(image_embeds) if image_embeds is not None else []
        start = last = time.perf_counter()
        first, finish = True, None
        try:
            async for out in self.engine.generate(request_id, prompt, image_embeds, sampling, image_hashes):
                now = time.perf_counter()
                if out.token_ids:
                    if first:
                        self.m_ttft.observe(now - start)
                        self.counts["ttft_observations"] += 1
                        first = False
                    else:
                        self.m_tpot.observe((now - last) / len(out.token_ids))
                        self.counts["tpot_observations"] += 1
                    last = now
                finish = out.finish_reason
                self._gauges()
                yield {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                       "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                       "cached_tokens": out.cached_tokens}
        finally:
            finish = finish or "abort"
            self.counts["requests"] += 1
            self.counts["aborted"] += finish == "abort"
            self.m_requests.inc(tags={"finish_reason": finish})
            self._gauges()

    def _gauges(self) -> None:
        eng = self.engine.engine
        self.m_running.set(len(eng.scheduler.running))
        self.m_waiting.set(len(eng.scheduler.waiting))
        self.m_kv.set(eng.blocks.usage)

    def stats(self) -> dict:
        eng = self.engine.engine
        return {**self.counts, "running": len(eng.scheduler.running), "waiting": len(eng.scheduler.waiting),
                "kv_usage": eng.blocks.usage, "free_blocks": eng.blocks.num_free_blocks,
                "num_blocks": eng.blocks.num_blocks, "prefix_hit_blocks": eng.blocks.stats.prefix_hits,
                "preemptions": eng.scheduler.num_preemptions}

    def check_health(self) -> None:
        task = self.engine._task
        if task is not None and task.done() and task.exception() is not None:
            raise RuntimeError(f"engine loop failed: {task.exception()!r}")
