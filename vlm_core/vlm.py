"""`VLM`: a loaded model with its tokenizer and processor, and the offline API (shaped like vLLM's `LLM`).

    vlm = VLM.from_pretrained("path/to/checkpoint")          # llava-hf, original LLaVA, VILA-1.5 or NVILA folder
    out = vlm.generate("What is in the picture?", {"image": ["cat.png"]}, SamplingParams(max_new_tokens=64))
    outs = vlm.generate(["What colour?", "How many?"], [{"image": ["a.png"]}, None])
    for delta in vlm.stream("Describe the video.", {"video": [["f0.png", "f1.png"]]}):
        print(delta, end="")
    engine = vlm.engine(EngineConfig(max_num_seqs=32))         # the continuous-batching engine
    engine.add_request("r1", vlm.request("Hi", sampling=SamplingParams(max_new_tokens=8)))

A prompt is a user question (the chat template applied, media placed before the text unless the
text holds `<image>` itself), a list of chat messages, or an `EngineRequest` already prepared
(`vlm.request`). Media are always a dict of lists: `{"image": [...], "video": [[frame, ...], ...]}`
(videos for VILA-family models). `generate` returns one merged `RequestOutput` per prompt — the
engine's output type — and `stream` the text deltas of one prompt.

Public entry points: `from_pretrained`, `generate`, `stream`, `request`, `engine`, and
`save_pretrained` for VILA-family folders. Scoring lives in `vlm_core.scoring.prompt_logits`.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .checkpoint import MODEL_PARTS
from .errors import CheckpointError
from .memory import return_freed_memory
from .families import Family, LoadOptions, family_of
from .engine.engine import EngineConfig, LLMEngine
from .engine.request import EngineRequest, RequestOutput, merge_outputs
from .engine.params import SamplingParams
from .inputs.processor import Processor, Prompt
from .models.composed import ComposedVLM
from .quant.awq_linear import prepare_awq

Media = dict[str, Sequence[Any]]


def _is_one(prompts) -> bool:
    """A single prompt (text, a message list or a prepared request) rather than a list of them."""
    if isinstance(prompts, (str, EngineRequest)):
        return True
    return isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], dict)


class VLM:
    def __init__(self, model: ComposedVLM, processor: Processor, engine_config: EngineConfig | None = None,
                 family: Family | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.spec = getattr(processor, "spec", None)
        self.eos_token_ids = processor.eos_token_ids
        self.family = family
        self.engine_config = engine_config or EngineConfig()
        self._engine = None
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str | torch.dtype | None = None,
                        device: str | torch.device = "cpu", engine_config: EngineConfig | None = None,
                        parts: Sequence[str] = MODEL_PARTS, fuse_projections: bool = False,
                        vision_tower_dir: str | Path | None = None, conv_mode: str | None = None) -> "VLM":
        """`parts=("llm",)` loads only the decoder (for a server whose image embeddings come from
        a vision encoder elsewhere); image inputs then need precomputed embeddings.
        `fuse_projections=True` joins each layer's q/k/v and gate/up linears for inference (what
        serving does); leave it off to inspect, edit, quantize or save the model's linears.
        `vision_tower_dir` and `conv_mode` are for original-layout LLaVA folders (`LoadOptions`):
        where the tower `mm_vision_tower` names lies, and which LLaVA conversation template to use."""
        family = family_of(model_dir)
        options = LoadOptions(str(vision_tower_dir) if vision_tower_dir is not None else None, conv_mode)
        model = family.load_model(model_dir, dtype=dtype, device=device, parts=parts, options=options)
        vlm = cls(model, family.load_processor(model_dir, model.config, options), engine_config, family)
        if fuse_projections and model.decoder is not None:
            model.decoder.fuse_projections()
        prepare_awq(model)
        return_freed_memory()
        return vlm

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the model back in its folder layout (families that can: VILA / NVILA)."""
        if self.family is None or self.family.save is None:
            raise CheckpointError(f"save_pretrained writes VILA-family folders; "
                                  f"{self.family.name if self.family else 'these'} models are saved with "
                                  f"transformers (full precision) or vlm-quantize (AWQ)")
        if self.model.decoder is not None and self.model.decoder.fused:
            raise ValueError("this model's projections are fused for inference; load it with "
                             "fuse_projections=False to save it")
        return self.family.save(self.model, self.processor, out_dir)

    # ---- requests ---------------------------------------------------------------------------

    def request(self, prompt: Prompt, media: Media | None = None, sampling: SamplingParams | None = None,
                apply_template: bool = True) -> EngineRequest:
        """An engine request: the prompt's token ids with one span per media item, and the items'
        embeddings (the vision tower runs here)."""
        return self._requests([prompt], [media], [sampling], apply_template)[0]

    def _requests(self, prompts: Sequence, media: Sequence[Media | None],
                  sampling: Sequence[SamplingParams | None], apply_template: bool) -> list[EngineRequest]:
        """Requests for many prompts; the vision tower runs once over every media item. A prepared
        `EngineRequest` keeps its own sampling unless one is given for it."""
        for p, m in zip(prompts, media):
            if m is not None and not isinstance(m, dict):
                raise TypeError(f"media must be a dict of lists, {{'image': [...], 'video': [[...]]}}, "
                                f"got {type(m).__name__}")
            if isinstance(p, EngineRequest) and m:
                raise ValueError("an EngineRequest carries its media already; give no media dict with it")
        prepared = [p if isinstance(p, EngineRequest) else self.processor.prepare_media(p, m, apply_template)
                    for p, m in zip(prompts, media)]
        embeds = self.model.embed_media([it for p in prepared if not isinstance(p, EngineRequest) for it in p[1]])
        out, k = [], 0
        for p, sp in zip(prepared, sampling):
            if isinstance(p, EngineRequest):
                out.append(p if sp is None else replace(p, params=sp))
                continue
            sp = sp or SamplingParams()
            mm, items = p
            out.append(EngineRequest(mm, embeds[k:k + len(items)], sp, tuple(it.hash for it in items)))
            k += len(items)
        return out

    # ---- generation (through the continuous-batching engine) ------------------------------------

    def engine(self, config: EngineConfig | None = None) -> LLMEngine:
        """A new continuous-batching `LLMEngine` over this model (see `vlm_core.engine`)."""
        return LLMEngine(self.model, self.tokenizer, sorted(self.eos_token_ids), config or self.engine_config)

    def generate(self, prompts, media: Media | Sequence[Media | None] | None = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 apply_template: bool = True) -> RequestOutput | list[RequestOutput]:
        """One prompt -> its `RequestOutput`; a list of prompts (each with its media dict and
        sampling, or one sampling for all) -> a list, run together on the engine. A prompt whose
        sampling asks for n > 1 gets a list of its n choices instead of one output."""
        one = _is_one(prompts)
        prompts = [prompts] if one else list(prompts)
        media = [media] if one else (list(media) if media is not None else [None] * len(prompts))
        if len(media) != len(prompts):
            raise ValueError(f"{len(media)} media dicts for {len(prompts)} prompts")
        if isinstance(sampling, (list, tuple)):
            if len(sampling) != len(prompts):
                raise ValueError(f"{len(sampling)} sampling params for {len(prompts)} prompts")
        else:
            sampling = [sampling] * len(prompts)
        requests = self._requests(prompts, media, sampling, apply_template)
        final: list[dict[int, RequestOutput]] = [{} for _ in requests]
        for i, out in self._run(requests):
            done = final[i]
            done[out.index] = merge_outputs(done[out.index], out) if out.index in done else out
        # one RequestOutput per prompt; a list of its n choices when it asked for n > 1
        results = [[f[k] for k in sorted(f)] if r.params.n > 1 else f[0] for f, r in zip(final, requests)]
        return results[0] if one else results

    def stream(self, prompt, media: Media | None = None, sampling: SamplingParams | None = None,
               apply_template: bool = True) -> Iterator[str]:
        """Text deltas of one prompt as they are generated."""
        for _, out in self._run([self.request(prompt, media, sampling, apply_template)]):
            if out.text:
                yield out.text

    def _run(self, requests: Sequence[EngineRequest]) -> Iterator[tuple[int, RequestOutput]]:
        """Submit requests to this VLM's engine and yield (index, output delta) as it produces them."""
        if self._engine is None:
            self._engine = self.engine()
        engine = self._engine
        ids, left = {}, {}
        for i, r in enumerate(requests):
            rid = f"vlm-{next(self._ids)}"
            engine.add_request(rid, r)
            ids[rid], left[rid] = i, r.params.n
        open_ids = set(ids)
        try:
            while open_ids:
                for out in engine.step():
                    if out.request_id in ids:
                        yield ids[out.request_id], out
                        if out.finish_reason is not None:
                            left[out.request_id] -= 1
                            if left[out.request_id] == 0:
                                open_ids.discard(out.request_id)
        finally:
            for rid in open_ids:   # the caller stopped early
                engine.abort(rid)
