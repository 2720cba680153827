"""Static-batch generation over a `LlavaModel`: chunked prefill, incremental decoding, streaming.

A batch of requests shares one contiguous KV cache (one slot per request). Prefill runs in
chunks of `prefill_chunk_size` tokens per request (the whole prompt when None); a chunk may
cut through an image's placeholder run. Decoding then advances every unfinished request by
one token per step from its own `start_pos`, and yields text deltas as they become safe to
show (no half UTF-8 characters, nothing that might still turn into a stop string).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .engine.sampling import SamplingParams, sample
from .errors import ContextLengthError
from .inputs.placeholders import MultimodalPrompt, chunk_embeddings
from .models.attention import ContiguousKVCache, SeqChunk
from .models.llava import LlavaModel


@dataclass
class GenerationRequest:
    prompt: MultimodalPrompt
    image_embeds: list[torch.Tensor]          # one [tokens_per_image, H] per prompt span
    params: SamplingParams = field(default_factory=SamplingParams)
    image_hashes: tuple[str, ...] = ()        # content hash per image (prefix / encoder cache keys)


@dataclass
class Delta:
    index: int                 # position of the request in the batch
    text: str                  # new text since the previous delta
    token_ids: list[int]       # new tokens since the previous delta
    finish_reason: str | None  # "stop" | "length" on the last delta of a request


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back what is not final.

    Decodes a short window around the newest tokens (not the whole text every step); holds
    back bytes of an unfinished UTF-8 character and any suffix that could begin a stop string.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""          # decoded text so far (truncated at a stop string)
        self.emitted = 0        # characters of `text` already returned
        self._prefix = 0        # window start (token index)
        self._read = 0          # tokens whose text is already in `self.text`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text now safe to emit, whether a stop string was reached)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        for s in self.stop:
            # only the tail can hold a new occurrence
            idx = self.text.find(s, max(0, len(self.text) - len(after) - len(s)))
            if idx != -1:
                self.text = self.text[:idx]
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self._held()), False

    def flush(self) -> str:
        """All remaining text (the request has finished without a stop string), including a
        trailing partial character as the tokenizer renders it."""
        if self._read < len(self.ids):
            before = self._decode(self.ids[self._prefix:self._read])
            after = self._decode(self.ids[self._prefix:])
            self.text += after[len(before):]
            self._read = len(self.ids)
        return self._take(len(self.text))

    def _held(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out


class _Seq:
    def __init__(self, index: int, req: GenerationRequest, tokenizer, device):
        self.index = index
        self.req = req
        self.params = req.params
        self.generator = req.params.make_generator(device)
        self.detok = IncrementalDetokenizer(tokenizer, req.params.stop)
        self.out_ids: list[int] = []
        self.finish_reason: str | None = None

    @property
    def length(self) -> int:
        return len(self.req.prompt) + len(self.out_ids)


class Generator:
    def __init__(self, model: LlavaModel, tokenizer, eos_token_ids: Sequence[int] = ()):
        self.model = model
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        self.max_len = model.config.text.max_position_embeddings

    def _cache(self, slots: int, max_len: int) -> ContiguousKVCache:
        t = self.model.config.text
        return ContiguousKVCache(t.num_layers, slots, max_len, t.num_kv_heads, t.head_dim,
                                 self.model.dtype, self.model.device)

    @torch.inference_mode()
    def prefill(self, requests: Sequence[GenerationRequest], cache: ContiguousKVCache,
                chunk_size: int | None = None, all_logits: bool = False) -> list[torch.Tensor]:
        """Run every prompt through the model in chunks.

        Returns per request the fp32 logits of the last prompt position [V], or of every
        prompt position [len, V] when `all_logits`.
        """
        if chunk_size is not None and chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        done = [0] * len(requests)
        kept: list[list[torch.Tensor]] = [[] for _ in requests]
        device = self.model.device
        while any(d < len(r.prompt) for d, r in zip(done, requests)):
            chunks, ids, embeds, positions = [], [], [], []
            for i, r in enumerate(requests):
                n = len(r.prompt) - done[i]
                if n <= 0:
                    continue
                n = n if chunk_size is None else min(n, chunk_size)
                chunks.append(SeqChunk(slot=i, start=done[i], length=n))
                ids.append(torch.tensor(r.prompt.token_ids[done[i]:done[i] + n]))
                embeds.append(chunk_embeddings(self.model.embed_tokens, r.prompt, r.image_embeds,
                                               done[i], done[i] + n))
                positions.append(torch.arange(done[i], done[i] + n))
            inputs_embeds = torch.cat(embeds)                               # [T, H]
            pos = torch.cat(positions).to(device)                           # [T]
            hidden = self.model(torch.cat(ids).to(device), pos, cache.view(chunks), inputs_embeds)
            off = 0
            for c in chunks:
                h = hidden[off:off + c.length]
                off += c.length
                done[c.slot] += c.length
                if all_logits:
                    kept[c.slot].append(self.model.compute_logits(h).float())
                elif done[c.slot] == len(requests[c.slot].prompt):
                    kept[c.slot].append(self.model.compute_logits(h[-1:]).float())
        return [torch.cat(k) if all_logits else k[0][0] for k in kept]

    def prompt_logits(self, requests: Sequence[GenerationRequest], chunk_size: int | None = None) -> list[torch.Tensor]:
        """Logits [len, V] for every prompt position (for tests and scoring)."""
        cache = self._cache(len(requests), max(len(r.prompt) for r in requests))
        return self.prefill(requests, cache, chunk_size, all_logits=True)

    @torch.inference_mode()
    def stream(self, requests: Sequence[GenerationRequest], prefill_chunk_size: int | None = None) -> Iterator[Delta]:
        for r in requests:
            if len(r.prompt) >= self.max_len:
                raise ContextLengthError(f"prompt has {len(r.prompt)} tokens; the model's context is {self.max_len}")
        seqs = [_Seq(i, r, self.tokenizer, self.model.device) for i, r in enumerate(requests)]
        max_len = min(self.max_len, max(len(r.prompt) + r.params.max_new_tokens for r in requests))
        cache = self._cache(len(requests), max_len)
        logits = self.prefill(requests, cache, prefill_chunk_size)
        yield from self._advance(seqs, torch.stack(logits))
        while True:
            active = [s for s in seqs if s.finish_reason is None]
            if not active:
                return
            ids = torch.tensor([s.out_ids[-1] for s in active], device=self.model.device)
            pos = torch.tensor([s.length - 1 for s in active], device=self.model.device)
            view = cache.view([SeqChunk(s.index, s.length - 1, 1) for s in active])
            hidden = self.model(ids, pos, view)
            yield from self._advance(active, self.model.compute_logits(hidden).float())

    def _advance(self, seqs: list[_Seq], logits: torch.Tensor) -> Iterator[Delta]:
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        for s, tok in zip(seqs, tokens):
            p = s.params
            if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
                s.finish_reason = "stop"
                yield Delta(s.index, s.detok.flush(), [], "stop")
                continue
            s.out_ids.append(tok)
            text, hit_stop = s.detok.push(tok)
            if hit_stop:
                s.finish_reason = "stop"
            elif len(s.out_ids) >= p.max_new_tokens or s.length >= self.max_len:
                s.finish_reason = "length"
                text += s.detok.flush()
            yield Delta(s.index, text, [tok], s.finish_reason)

    def generate(self, requests: Sequence[GenerationRequest], prefill_chunk_size: int | None = None) -> list[GenerationOutput]:
        texts = [""] * len(requests)
        ids: list[list[int]] = [[] for _ in requests]
        reasons = [""] * len(requests)
        for d in self.stream(requests, prefill_chunk_size):
            texts[d.index] += d.text
            ids[d.index] += d.token_ids
            if d.finish_reason:
                reasons[d.index] = d.finish_reason
        return [GenerationOutput(t, i, f, len(r.prompt)) for t, i, f, r in zip(texts, ids, reasons, requests)]
