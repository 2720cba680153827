"""`vlm-quantize MODEL_DIR OUT_DIR`: AWQ (or RTN) 4-bit quantization of a llava-hf or original-layout
LLaVA checkpoint.

    vlm-quantize ckpt/ ckpt-awq/ --calib-text corpus.txt --samples 128 --seq-len 512 --group-size 128
    vlm-quantize ckpt/ ckpt-awq/ --calib-jsonl calib.jsonl      # {"prompt": ..., "images": [...]} per line

The output is an AutoAWQ gemm checkpoint (safetensors + `quantization_config`) in the source's
key layout, loadable by `VLM.from_pretrained`. The vision tower and projector stay 16-bit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .errors import InputError, VLMError
from .inputs.placeholders import chunk_embeddings
from .families import family_of
from .quant.awq import QuantizeOptions, calibrate_decoder, quantize_linears


def text_samples(vlm, path: str | Path, n_samples: int, seq_len: int) -> list[torch.Tensor]:
    """Token blocks of `seq_len` from a text file (lines joined), as input embeddings [L, H]."""
    text = Path(path).read_text()
    ids = vlm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"calibration text {path} is empty")
    blocks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)][:n_samples]
    with torch.no_grad():
        return [vlm.model.embed_tokens(torch.tensor(b, device=vlm.model.device)) for b in blocks]


def multimodal_samples(vlm, path: str | Path, n_samples: int, seq_len: int) -> list[torch.Tensor]:
    """Chat-templated prompts with their images (one JSON object per line), as input embeddings."""
    path = Path(path)
    out = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt, images = item["prompt"], [path.parent / p for p in item.get("images", [])]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{line_no}: expected {{\"prompt\": ..., \"images\": [...]}}: {e}") from None
        req = vlm.request(prompt, {"image": images})
        with torch.no_grad():
            emb = chunk_embeddings(vlm.model.embed_tokens, req.prompt, req.media_embeds, 0, len(req.prompt))
        out.append(emb[:seq_len])
        if len(out) == n_samples:
            break
    return out


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, samples_fn, opts: QuantizeOptions,
                        progress: bool = True, vision_tower_dir: str | None = None) -> Path:
    """Load (fp32), calibrate, quantize and write. `samples_fn(vlm) -> list[[L, H]]`."""
    from .vlm import VLM

    family = family_of(model_dir)
    if family.save_awq is None:
        raise InputError(f"vlm-quantize writes llava-hf and original-LLaVA folders; {model_dir} is in the "
                         f"{family.name} layout")
    vlm = VLM.from_pretrained(model_dir, dtype=torch.float32, vision_tower_dir=vision_tower_dir)
    samples = samples_fn(vlm) if opts.method == "awq" else []
    calibrate_decoder(vlm.model.decoder, samples, opts, progress)
    packed = quantize_linears(vlm.model.decoder, opts)
    return family.save_awq(model_dir, out_dir, vlm.model, packed, opts.group_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vlm-quantize", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--method", choices=["awq", "rtn"], default="awq")
    ap.add_argument("--calib-text", help="text file for calibration")
    ap.add_argument("--calib-jsonl", help='JSON lines {"prompt": str, "images": [paths relative to the file]}')
    ap.add_argument("--samples", type=int, default=128, help="calibration samples")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample")
    ap.add_argument("--w-bit", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--no-zero-point", action="store_true", help="symmetric quantization (not supported yet)")
    ap.add_argument("--vision-tower-dir", default=None,
                    help="original LLaVA layout: the folder of the tower mm_vision_tower names, or one holding it")
    args = ap.parse_args(argv)
    try:
        opts = QuantizeOptions(method=args.method, group_size=args.group_size, w_bit=args.w_bit,
                               zero_point=not args.no_zero_point)
        if args.method == "awq" and not (args.calib_text or args.calib_jsonl):
            raise InputError("AWQ needs calibration data: --calib-text FILE or --calib-jsonl FILE")
        if args.calib_jsonl:
            samples_fn = lambda vlm: multimodal_samples(vlm, args.calib_jsonl, args.samples, args.seq_len)  # noqa: E731
        else:
            samples_fn = lambda vlm: text_samples(vlm, args.calib_text, args.samples, args.seq_len)  # noqa: E731
        out = quantize_checkpoint(args.model_dir, args.out_dir, samples_fn, opts,
                                  vision_tower_dir=args.vision_tower_dir)
    except VLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
