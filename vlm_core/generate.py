"""Command line: answer a question about an image.

    python -m vlm_core.generate [--model DIR] --image PATH --prompt TEXT [--stream]

Errors a user can cause (bad checkpoint, unreadable image, placeholder mismatch, bad
sampling values) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from .engine.params import SamplingParams
from .errors import VLMError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vlm_core.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="checkpoint folder (llava-hf, original LLaVA or VILA layout); default: the embedded 4-bit "
                         "default model")
    ap.add_argument("--vision-tower-dir", default=None,
                    help="original LLaVA layout: the folder of the tower mm_vision_tower names, or one holding it")
    ap.add_argument("--conv-mode", default=None, help="original LLaVA layout: LLaVA's conversation template "
                                                      "(default: the tokenizer's chat template, else llava_v1)")
    ap.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    ap.add_argument("--prompt", required=True, help="the question (add <image> to place images yourself)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    ap.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float32 on CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="token budget per engine step (prefill chunk size)")
    ap.add_argument("--stream", action="store_true", help="print text as it is generated")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .default_model import default_model_dir
    from .engine.engine import EngineConfig
    from .vlm import VLM

    try:
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
        engine_config = EngineConfig(max_num_batched_tokens=args.prefill_chunk) if args.prefill_chunk else None
        model = args.model or default_model_dir("awq")
        vlm = VLM.from_pretrained(model, dtype=args.dtype, device=args.device, engine_config=engine_config,
                                  fuse_projections=True, vision_tower_dir=args.vision_tower_dir,
                                  conv_mode=args.conv_mode)
        if args.stream:
            for delta in vlm.stream(args.prompt, {"image": args.image}, sampling):
                print(delta, end="", flush=True)
            print()
        else:
            print(vlm.generate(args.prompt, {"image": args.image}, sampling).text)
    except VLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
