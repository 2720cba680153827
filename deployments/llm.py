"""LLMServer deployment: the continuous-batching engine behind a streaming handle method."""

from __future__ import annotations

import torch

from vlm_core.engine.engine import AsyncLLMEngine, EngineConfig
from vlm_core.engine.sampling import SamplingParams
from vlm_core.inputs.placeholders import ImageSpan, MultimodalPrompt
from vlm_core.vlm import VLM


class LLMServer:
    def __init__(self, model_dir: str, dtype: str | None = None, device: str | None = None,
                 engine: dict | None = None):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        vlm = VLM.from_pretrained(model_dir, dtype=dtype, device=device)
        self.engine = AsyncLLMEngine(vlm.engine(EngineConfig(**(engine or {}))))

    async def generate(self, request_id: str, token_ids: list[int], spans: list[tuple[int, int]],
                       image_embeds: list[torch.Tensor], image_hashes: list[str], sampling: SamplingParams):
        """Stream output deltas as dicts; a cancelled stream aborts the request in the engine."""
        prompt = MultimodalPrompt(tuple(token_ids), tuple(ImageSpan(o, n) for o, n in spans))
        async for out in self.engine.generate(request_id, prompt, image_embeds, sampling, image_hashes):
            yield {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                   "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                   "cached_tokens": out.cached_tokens}

    def check_health(self) -> None:
        task = self.engine._task
        if task is not None and task.done() and task.exception() is not None:
            raise RuntimeError(f"engine loop failed: {task.exception()!r}")
