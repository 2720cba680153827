"""`VLM`: a loaded model with its tokenizer and image processor, and the generate/stream API.

    vlm = VLM.from_pretrained("path/to/llava-hf-checkpoint")
    out = vlm.generate("What is in the picture?", images=["cat.png"],
                       sampling=SamplingParams(max_new_tokens=64))
    for delta in vlm.stream("Describe it.", images=["cat.png"]):
        print(delta, end="")

Generation runs on a continuous-batching `LLMEngine` (paged KV cache, chunked prefill, prefix
cache) created on first use from `engine_config`.

`prompt` is either a user question (wrapped in the chat template, images placed before the
text unless the text holds `<image>` itself) or a list of chat messages.

VILA-1.5 / NVILA folders (`llm/`, `vision_tower/`, `mm_projector/`) load the same way; their
media come as a dict of lists through `generate_content` / `stream_content`:

    vlm.generate_content("Describe the video.", {"video": [frame0, frame1, ...]})
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .checkpoint import MODEL_PARTS, is_vila_folder, load_llava_hf, load_vila, save_vila
from .engine.engine import EngineConfig, RequestOutput
from .engine.sampling import SamplingParams
from .generation import GenerationOutput, GenerationRequest, prompt_logits
from .inputs.image import ImageInput
from .inputs.placeholders import MultimodalPrompt
from .inputs.prompt import Prompt, PromptBuilder
from .models.llava import LlavaModel


class VLM:
    def __init__(self, model: LlavaModel, inputs: PromptBuilder, engine_config: EngineConfig | None = None,
                 folder_configs: tuple[dict, dict] | None = None):
        self.model = model
        self.inputs = inputs
        self.tokenizer = inputs.tokenizer
        self.image_processor = inputs.image_processor
        self.spec = getattr(inputs, "spec", None)
        self.eos_token_ids = inputs.eos_token_ids
        self._folder_configs = folder_configs     # VILA: (top-level config, subfolder configs) for saving
        self.engine_config = engine_config or EngineConfig()
        self._engine = None
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str | torch.dtype | None = None,
                        device: str | torch.device = "cpu", engine_config: EngineConfig | None = None,
                        parts: Sequence[str] = MODEL_PARTS, fuse_projections: bool = False) -> "VLM":
        """`parts=("llm",)` loads only the decoder (for a server whose image embeddings come from
        a vision encoder elsewhere); image inputs then need precomputed embeddings.
        `fuse_projections=True` joins each layer's q/k/v and gate/up linears for inference (what
        serving does); leave it off to inspect, edit, quantize or save the model's linears."""
        if is_vila_folder(model_dir):
            from .inputs.vila_prompt import VilaPromptBuilder

            model, top, raw = load_vila(model_dir, dtype=dtype, device=device, parts=parts)
            vlm = cls(model, VilaPromptBuilder.from_pretrained(model_dir, model.config), engine_config, (top, raw))
        else:
            model = load_llava_hf(model_dir, dtype=dtype, device=device, parts=parts)
            vlm = cls(model, PromptBuilder.from_pretrained(model_dir, model.config), engine_config)
        if fuse_projections and model.decoder is not None:
            model.decoder.fuse_projections()
        return vlm

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write a VILA / NVILA model back in its folder layout."""
        if self._folder_configs is None:
            raise NotImplementedError("save_pretrained writes VILA-family folders; llava-hf models save "
                                      "through transformers")
        if self.model.decoder is not None and self.model.decoder.fused:
            raise ValueError("this model's projections are fused for inference; load it with "
                             "fuse_projections=False to save it")
        top, raw = self._folder_configs
        return save_vila(self.model, self.tokenizer, self.image_processor.cfg, out_dir, top, raw)

    # ---- inputs -------------------------------------------------------------------------

    def prepare(self, prompt: Prompt, images: Sequence[ImageInput] = (), apply_template: bool = True
                ) -> tuple[MultimodalPrompt, torch.Tensor]:
        """Token ids with one placeholder span per image, and pixel values [N, 3, S, S]."""
        return self.inputs.prepare(prompt, images, apply_template)

    def request(self, prompt: Prompt, images: Sequence[ImageInput] = (), sampling: SamplingParams | None = None,
                apply_template: bool = True, media: dict | None = None) -> GenerationRequest:
        """A request with its media encoded; `media` ({"image": [...], "video": [[frames]]}) or `images`."""
        if media is None:
            media = {"image": list(images)} if len(images) else {}
        elif len(images):
            raise ValueError("give images either in `images` or in `media`, not both")
        mm, items = self.inputs.prepare_media(prompt, media, apply_template)
        embeds = self.model.embed_media(items)
        return GenerationRequest(mm, embeds, sampling or SamplingParams(), tuple(it.hash for it in items))

    def generate_content(self, prompt: Prompt, media: dict | None = None,
                         sampling: SamplingParams | None = None) -> GenerationOutput:
        """Generation over a dict of media lists (the VILA / NVILA interface; LLaVA takes images)."""
        return self.generate_requests([self.request(prompt, sampling=sampling, media=media or {})])[0]

    def stream_content(self, prompt: Prompt, media: dict | None = None,
                       sampling: SamplingParams | None = None) -> Iterator[str]:
        for _, out in self.run([self.request(prompt, sampling=sampling, media=media or {})]):
            if out.text:
                yield out.text

    # ---- generation (through the continuous-batching engine) ------------------------------------

    def engine(self, config=None):
        """A new continuous-batching `LLMEngine` over this model (see `vlm_core.engine`)."""
        from .engine.engine import LLMEngine

        return LLMEngine(self.model, self.tokenizer, sorted(self.eos_token_ids), config or self.engine_config)

    @property
    def default_engine(self):
        if self._engine is None:
            self._engine = self.engine()
        return self._engine

    def run(self, requests: Sequence[GenerationRequest], engine=None) -> Iterator[tuple[int, "RequestOutput"]]:
        """Submit requests and yield (index, output delta) as the engine produces them."""
        engine = engine or self.default_engine
        ids = {}
        for i, r in enumerate(requests):
            rid = f"vlm-{next(self._ids)}"
            engine.add_request(rid, r.prompt, r.image_embeds, r.params, r.image_hashes)
            ids[rid] = i
        open_ids = set(ids)
        try:
            while open_ids:
                for out in engine.step():
                    if out.request_id in ids:
                        yield ids[out.request_id], out
                        if out.finish_reason is not None:
                            open_ids.discard(out.request_id)
        finally:
            for rid in open_ids:   # the caller stopped early
                engine.abort(rid)

    def generate_requests(self, requests: Sequence[GenerationRequest], engine=None) -> list[GenerationOutput]:
        texts = [""] * len(requests)
        toks: list[list[int]] = [[] for _ in requests]
        last = [None] * len(requests)
        for i, out in self.run(requests, engine):
            texts[i] += out.text
            toks[i] += out.token_ids
            last[i] = out
        return [GenerationOutput(t, ids, o.finish_reason, o.prompt_tokens, o.cached_tokens)
                for t, ids, o in zip(texts, toks, last)]

    def generate(self, prompt: Prompt, images: Sequence[ImageInput] = (), sampling: SamplingParams | None = None,
                 apply_template: bool = True) -> GenerationOutput:
        return self.generate_requests([self.request(prompt, images, sampling, apply_template)])[0]

    def stream(self, prompt: Prompt, images: Sequence[ImageInput] = (), sampling: SamplingParams | None = None,
               apply_template: bool = True) -> Iterator[str]:
        """Text deltas as they are generated."""
        for _, out in self.run([self.request(prompt, images, sampling, apply_template)]):
            if out.text:
                yield out.text

    def generate_batch(self, prompts: Sequence[Prompt], images: Sequence[Sequence[ImageInput]] | None = None,
                       sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                       apply_template: bool = True) -> list[GenerationOutput]:
        """Several prompts of any lengths at once; the vision tower runs once for all images."""
        images = images if images is not None else [()] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError("images must hold one list per prompt")
        params = sampling if isinstance(sampling, (list, tuple)) else [sampling or SamplingParams()] * len(prompts)
        prepared = [self.inputs.prepare_media(p, {"image": list(im)} if len(im) else {}, apply_template)
                    for p, im in zip(prompts, images)]
        embeds = self.model.embed_media([it for _, items in prepared for it in items])
        requests, k = [], 0
        for (mm, items), sp in zip(prepared, params):
            requests.append(GenerationRequest(mm, embeds[k:k + len(items)], sp, tuple(it.hash for it in items)))
            k += len(items)
        return self.generate_requests(requests)

    def prompt_logits(self, requests: Sequence[GenerationRequest], chunk_size: int | None = None) -> list[torch.Tensor]:
        """fp32 logits of every prompt position (scoring)."""
        return prompt_logits(self.model, requests, chunk_size)
