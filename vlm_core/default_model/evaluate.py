"""Held-out accuracy of the default model (exact-match answers).

    python -m vlm_core.default_model.evaluate --count 500 [--hf] [--rtn]

fp16 and AWQ run through vlm_core's engine; `--rtn` also quantizes the fp16 checkpoint with
round-to-nearest for comparison, `--hf` answers with transformers' LlavaForConditionalGeneration
on the fp16 checkpoint and counts where its answers differ from ours. Prints a table and
writes bench/results/default_model_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ..engine.sampling import SamplingParams
from .data import heldout_set

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
        mm, pixels = vlm.inputs.prepare(q, [scene.image()])
        ids = torch.tensor([mm.token_ids])
        g = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=12, do_sample=False,
                        pad_token_id=vlm.tokenizer.pad_token_id, eos_token_id=vlm.tokenizer.eos_token_id)
        out.append(vlm.tokenizer.decode(g[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def accuracy(answers, items) -> float:
    return sum(a == gold for a, (_, _, gold) in zip(answers, items)) / len(items)


def main(argv=None) -> None:
    from ..vlm import VLM
    from . import default_model_dir
    from .train import quantize

    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--rtn", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "bench" / "results" /
                                         "default_model_accuracy.json"))
    args = ap.parse_args(argv)
    items = heldout_set(args.count)
    rows = {}
    dirs = {"fp16": default_model_dir("fp16"), "awq": default_model_dir("awq")}
    tmp = None
    if args.rtn:
        tmp = tempfile.TemporaryDirectory()
        dirs["rtn"] = quantize(dirs["fp16"], Path(tmp.name) / "rtn", "rtn", seed=0)
    fp16_vlm = None
    for name, d in dirs.items():
        vlm = VLM.from_pretrained(d)
        t0 = time.time()
        answers = answer_all(vlm, items)
        rows[name] = {"accuracy": accuracy(answers, items), "seconds": time.time() - t0}
        if name == "fp16":
            fp16_vlm, fp16_answers = vlm, answers
    if args.hf:
        hf = hf_answers(dirs["fp16"], fp16_vlm, items)
        rows["fp16 (transformers)"] = {"accuracy": accuracy(hf, items),
                                       "differs_from_vlm_core": sum(a != b for a, b in zip(hf, fp16_answers))}
    print(f"held-out pictures: {len(items)}")
    for name, r in rows.items():
        print(f"{name:>20}: {100 * r['accuracy']:.1f}%" + (f"  ({r['differs_from_vlm_core']} answers differ from "
                                                           f"vlm_core fp16)" if "differs_from_vlm_core" in r else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"heldout_pictures": len(items), "results": rows}, indent=2))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
