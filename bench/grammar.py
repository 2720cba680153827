"""Structured-output libraries side by side: the cost of one token mask, and of compiling a schema.

    python bench/grammar.py [--steps 64] [--out bench/results/grammar-cpu-2cores.json]

For xgrammar, llguidance and outlines-core, at byte-level vocabularies of 32,000 and 152,000
tokens (synthetic but shaped like real ones: the 256 bytes, then word pieces with and without a
leading space, digits and JSON punctuation runs), with a JSON schema of nested objects, arrays,
enums and numbers: the time to compile the schema for the vocabulary, and the median, mean and
worst time to compute the allowed-token mask of one decoding step along a valid JSON document (each step
advanced with the token that spells the document greedily). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "kind": {"enum": ["circle", "square", "triangle"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 100},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
        "box": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"], "additionalProperties": False},
    },
    "required": ["name", "kind", "count", "score", "tags", "box"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps({"name": "blue shape", "kind": "square", "count": 3, "score": 0.75,
                       "tags": ["left", "large"], "box": {"x": 10, "y": 20}}, separators=(",", ":"))


def synthetic_vocab(size: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    seen = set(vocab)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    punct = ['{"', '":', '",', '"}', '},', '":"', '["', '"]', ', ', ': ', '0.', '.5', '\n', '  ', '"', '{', '}']
    for p in punct:
        vocab.append(p.encode())
        seen.add(vocab[-1])
    while len(vocab) < size - 1:
        r = rng.random()
        if r < 0.08:
            tok = str(rng.randrange(0, 1000))
        else:
            n = min(12, max(2, int(rng.expovariate(0.3)) + 2))
            tok = "".join(rng.choice(letters) for _ in range(n))
            if r < 0.55:
                tok = " " + tok
            elif r < 0.6:
                tok = tok.capitalize()
        b = tok.encode()
        if b not in seen:
            seen.add(b)
            vocab.append(b)
    vocab.append(b"</s>")   # EOS, last
    return vocab


def greedy_spelling(vocab: list[bytes], text: bytes) -> list[int]:
    """Token ids spelling `text`, longest match first (a stand-in for the model's choices)."""
    index = {t: i for i, t in enumerate(vocab[:-1])}
    longest = max(len(t) for t in index)
    ids, i = [], 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            tid = index.get(text[i:i + n])
            if tid is not None:
                ids.append(tid)
                i += n
                break
    return ids


def run_xgrammar(vocab, ids, schema) -> tuple[float, float]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[len(vocab) - 1])
    t = time.perf_counter()
    compiled = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(schema))
    compile_s = time.perf_counter() - t
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, len(vocab))
    spent = []
    for tid in ids:
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        spent.append(time.perf_counter() - t)
        assert matcher.accept_token(tid), "xgrammar refused a token of a valid document"
    return compile_s, spent


class _Tok:
    def __init__(self, vocab):
        self.tokens, self.eos_token_id, self.bos_token_id, self.special_token_ids = vocab, len(vocab) - 1, None, []
        self.vocab = vocab

    def __call__(self, s):
        return greedy_spelling(self.vocab, s if isinstance(s, bytes) else s.encode())


def run_llguidance(vocab, ids, schema) -> tuple[float, float]:
    import llguidance
    import llguidance.torch as lt

    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Tok(vocab)))
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(tok, grammar)
    compile_s = time.perf_counter() - t
    mask = lt.allocate_token_bitmask(1, len(vocab))
    spent = []
    for tid in ids:
        t = time.perf_counter()
        lt.fill_next_token_bitmask(matcher, mask, 0)
        spent.append(time.perf_counter() - t)
        assert matcher.consume_token(tid), f"llguidance refused a token: {matcher.get_error()}"
    return compile_s, spent


def run_outlines(vocab, ids, schema) -> tuple[float, float]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    eos = len(vocab) - 1
    mapping: dict[bytes, list[int]] = {}
    for i, tok in enumerate(vocab[:-1]):
        mapping.setdefault(tok, []).append(i)
    t = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(schema)), Vocabulary(eos, mapping))
    compile_s = time.perf_counter() - t
    guide = Guide(index)
    mask = torch.zeros((len(vocab) + 31) // 32, dtype=torch.int32)
    spent = []
    for tid in ids:
        t = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        spent.append(time.perf_counter() - t)
        guide.advance(tid)
    return compile_s, spent


LIBS = {"xgrammar": run_xgrammar, "llguidance": run_llguidance, "outlines-core": run_outlines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "grammar-cpu-2cores.json"))
    ap.add_argument("--sizes", default="32000,152000")
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    print(f"{'library':>14} {'vocab':>7} {'compile ms':>11} {'median us':>10} {'mean us':>9} {'worst us':>9}")
    for size in (int(s) for s in a.sizes.split(",")):
        vocab = synthetic_vocab(size)
        ids = greedy_spelling(vocab, DOCUMENT.encode())
        for name, fn in LIBS.items():
            try:
                compile_s, steps = fn(vocab, ids, SCHEMA)
                us = sorted(x * 1e6 for x in steps)
                row = {"library": name, "vocab": size, "steps": len(ids), "compile_ms": compile_s * 1e3,
                       "mask_us_median": us[len(us) // 2], "mask_us_mean": sum(us) / len(us), "mask_us_worst": us[-1]}
                print(f"{name:>14} {size:>7} {row['compile_ms']:>11.1f} {row['mask_us_median']:>10.1f} "
                      f"{row['mask_us_mean']:>9.1f} {row['mask_us_worst']:>9.1f}")
            except Exception as e:       # a library that cannot do this is a result too
                row = {"library": name, "vocab": size, "error": f"{type(e).__name__}: {e}"[:300]}
                print(f"{name:>14} {size:>7} failed: {row['error']}")
            rows.append(row)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.machine(), "threads": 2, "python": sys.version.split()[0],
                               "document_chars": len(DOCUMENT), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
