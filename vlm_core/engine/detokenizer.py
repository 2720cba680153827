"""Incremental detokenization: token ids -> text deltas that are safe to show (no half UTF-8
characters, nothing that might still turn into a stop string)."""

from __future__ import annotations

from typing import Sequence


def fast_decode(tokenizer):
    """`tokenizer.decode(ids, skip_special_tokens=True)` as a function; for a fast tokenizer that
    does no clean-up of spaces it is the Rust tokenizer's own decode (what transformers' decode
    returns then, without its Python wrapping: about 1 us instead of 8 a call)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back what is not final.

    Decodes a short window around the newest tokens (not the whole text every step); holds
    back bytes of an unfinished UTF-8 character and any suffix that could begin a stop string.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self._decode = fast_decode(tokenizer)
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""          # decoded text so far (truncated at a stop string)
        self.emitted = 0        # characters of `text` already returned
        self._prefix = 0        # window start (token index)
        self._read = 0          # tokens whose text is already in `self.text`

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
