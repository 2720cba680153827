"""The output processor: every stop condition, and each request's text, in one place.

For each sampled token of a sequence, in this order:
  1. EOS (unless `ignore_eos`) or one of `stop_token_ids`: the sequence stops ("stop"); the token
     is not part of the output.
  2. the token is appended and detokenized; text completing a stop string ends the sequence
     ("stop"), the text cut before the stop string;
  3. `max_new_tokens` reached, or the model's context full: "length".
The scheduler only schedules, advances and frees; the engine finishes what this decides.
"""

from __future__ import annotations

from typing import Collection

from .detokenizer import IncrementalDetokenizer
from .sequence import Sequence


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: Collection[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos = eos_token_ids          # shared with the engine (`LLMEngine.eos`)
        self.max_model_len = max_model_len
        self._detok: dict[Sequence, IncrementalDetokenizer] = {}

    def add(self, seq: Sequence) -> None:
        self._detok[seq] = IncrementalDetokenizer(self.tokenizer, seq.params.stop)

    def drop(self, seq: Sequence) -> None:
        self._detok.pop(seq, None)

    def process(self, seq: Sequence, token: int) -> tuple[str, list[int], str | None]:
        """(new text, new token ids, finish reason or None) for `seq` after sampling `token`."""
        p = seq.params
        detok = self._detok[seq]
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            return detok.flush(), [], "stop"
        seq.output_ids.append(token)
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise RuntimeError(f"token {token} is outside the request's grammar")
        text, hit_stop = detok.push(token)
        if hit_stop:
            return text, [token], "stop"
        if len(seq.output_ids) >= p.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return text + detok.flush(), [token], "length"
        return text, [token], None
