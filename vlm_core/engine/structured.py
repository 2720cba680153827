"""Structured output: a grammar per request, applied as a token bitmask in the batched sampler.

A request's `SamplingParams.structured` names what its output must be: `json_object` (any JSON
object), `json_schema` (a JSON schema, as a string), `regex`, `grammar` (EBNF) or `choice` (one of
a list of strings). The grammar is compiled once per (kind, spec) for the tokenizer and each
sequence gets its own matcher. Every step, the rows with a matcher get their allowed tokens as a
bitmask over the logits (other rows untouched); the sampled token then advances the matcher.

The library is xgrammar, chosen with `bench/grammar.py` (2-core CPU, one schema along a valid
document, vocabularies of 32k and 152k tokens):
  - xgrammar: median mask 2-3 us per token, compile 0.15 / 0.54 s; bounded-length strings
    (`maxLength`) are its slow case (up to 6 / 27 ms for such a step);
  - outlines-core: the cheapest masks (median 0.5 us, mean 9 / 45 us), but regex only (no JSON of
    unbounded depth for json_object, no EBNF grammars) and 0.2 / 2.2 s to compile a schema;
  - llguidance: milliseconds per mask on these vocabularies.
xgrammar covers every kind above with sub-second compiles, and its slow steps are confined to
one schema feature; outlines-core would need a second library for json_object and grammars.

A tokenizer that cannot spell JSON (a word-level vocabulary without `{`, `"`, `:` ...) is refused
when a JSON request arrives, as is a spec the library cannot compile.
"""

from __future__ import annotations

import json
import threading
import torch

from ..errors import InputError
from .params import StructuredOutput

JSON_CHARS = '{}[]":,-.0123456789truefalsn'


class GrammarBackend:
    """Compiles specs for one tokenizer (cached by spec) and makes per-sequence matchers. Made with
    the engine; the library reads the vocabulary at the first compile (a second or so), so a
    server that never sees a structured request never pays for it."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self._lock = threading.Lock()
        self._xgr = None

    def _load(self) -> None:
        import xgrammar as xgr

        self.info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                       stop_token_ids=self.stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=True)
        spelled = {t for t in self.info.decoded_vocab if len(t) == 1}
        self.missing_json = sorted({c.encode() for c in JSON_CHARS} - spelled)
        # JSON output is compact (no whitespace between tokens) and its strings hold no raw control
        # characters, so tokens with a byte below 0x20 are never part of it
        self.control_tokens = torch.tensor([i for i, t in enumerate(self.info.decoded_vocab)
                                            if any(b < 0x20 for b in t)], dtype=torch.long)
        self._xgr = xgr

    def compile(self, so: StructuredOutput):
        with self._lock:
            if self._xgr is None:
                self._load()
        if so.kind in ("json_object", "json_schema") and self.missing_json:
            raise InputError("this model's tokenizer cannot spell JSON (it has no single-character tokens for "
                             f"{b''.join(self.missing_json).decode(errors='replace')!r}), so JSON output is not "
                             "supported for it")
        try:
            with self._lock:
                compiled = self._compile(so)
            self.check_spellable(compiled, so)
            return compiled
        except InputError:
            raise
        except Exception as e:        # the library's own message names the problem
            raise InputError(f"the {so.kind.replace('_', ' ')} cannot be compiled: {e}") from None

    def _compile(self, so: StructuredOutput):
        if so.kind == "json_object":
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if so.kind == "json_schema":
            return self.compiler.compile_json_schema(so.spec, any_whitespace=False, strict_mode=True)
        if so.kind == "regex":
            return self.compiler.compile_regex(so.spec)
        if so.kind == "grammar":
            return self.compiler.compile_grammar(so.spec)
        choices = json.loads(so.spec)
        return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(str(c)) for c in choices))

    def check_spellable(self, compiled, so: StructuredOutput) -> None:
        """Refuse a grammar whose first step allows no token of this vocabulary (nothing could be
        generated; e.g. a regex of characters the tokenizer has no tokens for)."""
        m = self._xgr.GrammarMatcher(compiled)
        bitmask = self._xgr.allocate_token_bitmask(1, self.vocab_size)
        m.fill_next_token_bitmask(bitmask)
        if not bool(bitmask.any()):
            raise InputError(f"the {so.kind.replace('_', ' ')} allows no token of this model's vocabulary")

    def matcher(self, compiled, so: StructuredOutput) -> "Matcher":
        return Matcher(self._xgr.GrammarMatcher(compiled), so.kind in ("json_object", "json_schema"))

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list["Matcher"]) -> None:
        """Mask, in place, the tokens each of `rows`' matcher does not allow next."""
        bitmask = self._xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        for j, m in enumerate(matchers):
            m.grammar.fill_next_token_bitmask(bitmask, j)
        idx = torch.tensor(rows, device=logits.device)
        sub = logits[idx]
        self._xgr.apply_token_bitmask_inplace(sub, bitmask.to(logits.device), vocab_size=self.vocab_size)
        json_rows = [j for j, m in enumerate(matchers) if m.json]
        if json_rows and len(self.control_tokens):
            sub[torch.tensor(json_rows, device=sub.device)[:, None], self.control_tokens.to(sub.device)[None, :]] = \
                float("-inf")
        logits[idx] = sub


class Matcher:
    """One sequence's grammar state."""

    def __init__(self, grammar, json_output: bool):
        self.grammar, self.json = grammar, json_output

    def accept_token(self, token: int) -> bool:
        return self.grammar.accept_token(token)
