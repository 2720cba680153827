"""Accuracy of the default model (exact-match answers) on two picture generators.

    python -m vlm_core.default_model.evaluate --count 1000 [--hf] [--rtn]

"heldout" is the training generator's held-out split (`data.py`, ids the training never draws);
"independent" is `shapes_eval.py`, written separately with other drawing code, canvases and
placement rules. fp16 and AWQ run through vlm_core's engine; `--rtn` also quantizes the fp16
checkpoint with round-to-nearest for comparison, `--hf` answers with transformers'
LlavaForConditionalGeneration on the fp16 checkpoint and counts where its answers differ from
ours. Prints a table (overall and per question kind) and writes
bench/results/default_model_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ..engine.params import SamplingParams
from .data import heldout_set, question_kind
from .shapes_eval import eval_set

ANSWER_PARAMS = SamplingParams(max_new_tokens=12)


def answer_all(vlm, items, batch: int = 64) -> list[str]:
    answers = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        outs = vlm.generate([q for _, q, _ in chunk], [{"image": [s.image()]} for s, _, _ in chunk], ANSWER_PARAMS)
        answers += [o.text.strip() for o in outs]
    return answers


def hf_answers(model_dir: Path, vlm, items) -> list[str]:
    """Greedy answers from transformers on the same token ids and pixels."""
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    for scene, q, _ in items:
        mm, pixels = vlm.processor.prepare(q, [scene.image()])
        ids = torch.tensor([mm.token_ids])
        g = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=12, do_sample=False,
                        pad_token_id=vlm.tokenizer.pad_token_id, eos_token_id=vlm.tokenizer.eos_token_id)
        out.append(vlm.tokenizer.decode(g[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def accuracy(answers, items) -> float:
    return sum(a == gold for a, (_, _, gold) in zip(answers, items)) / len(items)


def by_kind(answers, items) -> dict[str, float]:
    """Accuracy per question kind (colour, count, left-of, describe)."""
    groups: dict[str, list[bool]] = {}
    for a, (_, q, gold) in zip(answers, items):
        groups.setdefault(question_kind(q), []).append(a == gold)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def main(argv=None) -> None:
    from ..vlm import VLM
    from . import default_model_dir
    from .train import quantize

    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1000, help="pictures per generator, one question each")
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--rtn", action="store_true")
    ap.add_argument("--fp16", default=None, help="an fp16 checkpoint to evaluate instead of the shipped one")
    ap.add_argument("--awq", default=None, help="an AWQ checkpoint to evaluate instead of the shipped one")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "bench" / "results" /
                                         "default_model_accuracy.json"))
    args = ap.parse_args(argv)
    sets = {"heldout": heldout_set(args.count), "independent": eval_set(args.count)}
    dirs = {"fp16": Path(args.fp16) if args.fp16 else default_model_dir("fp16"),
            "awq": Path(args.awq) if args.awq else default_model_dir("awq")}
    tmp = None
    if args.rtn:
        tmp = tempfile.TemporaryDirectory()
        dirs["rtn"] = quantize(dirs["fp16"], Path(tmp.name) / "rtn", "rtn", seed=0)
    rows: dict[str, dict] = {}
    fp16_answers: dict[str, list[str]] = {}
    for name, d in dirs.items():
        vlm = VLM.from_pretrained(d)
        rows[name] = {}
        for set_name, items in sets.items():
            t0 = time.time()
            answers = answer_all(vlm, items)
            rows[name][set_name] = {"accuracy": accuracy(answers, items), "by_kind": by_kind(answers, items),
                                    "seconds": round(time.time() - t0, 1)}
            if name == "fp16":
                fp16_vlm, fp16_answers[set_name] = vlm, answers
    if args.hf:
        rows["fp16 (transformers)"] = {}
        for set_name, items in sets.items():
            hf = hf_answers(dirs["fp16"], fp16_vlm, items)
            rows["fp16 (transformers)"][set_name] = {
                "accuracy": accuracy(hf, items), "by_kind": by_kind(hf, items),
                "differs_from_vlm_core": sum(a != b for a, b in zip(hf, fp16_answers[set_name]))}
    kinds = sorted({k for r in rows.values() for v in r.values() for k in v["by_kind"]})
    print(f"pictures per generator: {args.count}")
    print(f"{'model':>20} {'generator':>12} {'all':>7} " + " ".join(f"{k:>9}" for k in kinds))
    for name, r in rows.items():
        for set_name, v in r.items():
            extra = f"  ({v['differs_from_vlm_core']} answers differ from vlm_core fp16)" \
                if "differs_from_vlm_core" in v else ""
            print(f"{name:>20} {set_name:>12} {100 * v['accuracy']:6.1f}% "
                  + " ".join(f"{100 * v['by_kind'].get(k, float('nan')):8.1f}%" for k in kinds) + extra)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"pictures_per_generator": args.count, "results": rows}, indent=2) + "\n")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
