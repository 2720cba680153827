"""Train the embedded default model from scratch, then quantize it with our own AWQ.

    python -m vlm_core.default_model.train --out vlm_core/default_model/weights

writes `fp16/` (llava-hf checkpoint + tokenizer + preprocessor config) and `awq/` (AutoAWQ
4-bit, calibrated on image+question samples of the train split). Deterministic for a given
`--seed` and thread count; about 15 minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from ..inputs.image import ImageProcessor, ImageProcessorConfig
from ..inputs.template import LLAVA_15_TEMPLATE, render_chat, user_turn
from .data import IMAGE_SIZE, TRAIN_IDS, make_scene, sample_qa, split_ids, vocabulary

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
PATCH = 8
GROUP_SIZE = 64


def build_tokenizer():
    """Word-level tokenizer over the data set's vocabulary, with BOS and the LLaVA-1.5 template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=["<image>"])
    fast.chat_template = LLAVA_15_TEMPLATE
    return fast


def build_config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=128)
    text = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-1, vision_feature_select_strategy="default")


def tokens_per_image() -> int:
    return (IMAGE_SIZE // PATCH) ** 2


class Batcher:
    """Training batches: one random question per picture, loss on the answer and EOS only."""

    def __init__(self, tokenizer, seed: int):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.proc = ImageProcessor(ImageProcessorConfig(IMAGE_SIZE, IMAGE_SIZE))
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self._prompts: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompts:
            text = render_chat(self.tok, user_turn(question, 1))
            ids = self.tok(text)["input_ids"]
            i = ids.index(self.image_id)
            self._prompts[question] = ids[:i] + [self.image_id] * tokens_per_image() + ids[i + 1:]
        return self._prompts[question]

    def batch(self, size: int):
        ids, labels, pixels = [], [], []
        for _ in range(size):
            scene = make_scene(self.rng.randrange(TRAIN_IDS))
            q, a = sample_qa(scene, self.rng)
            p = self.prompt_ids(q)
            ans = self.tok(a, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            ids.append(p + ans)
            labels.append([-100] * len(p) + ans)
            pixels.append(self.proc.one(scene.image()))
        width = max(len(x) for x in ids)
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        return input_ids, mask, lab, torch.stack(pixels)


def train(out_dir: Path, steps: int, batch_size: int, lr: float, seed: int, log_every: int = 100) -> Path:
    from transformers import LlavaForConditionalGeneration

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = LlavaForConditionalGeneration(build_config(tokenizer))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    batcher = Batcher(tokenizer, seed)
    t0, running = time.time(), None
    for step in range(steps):
        input_ids, mask, labels, pixels = batcher.batch(batch_size)
        loss = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % log_every == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    model.eval()
    fp16 = out_dir / "fp16"
    model.half().save_pretrained(str(fp16))
    tokenizer.save_pretrained(str(fp16))
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(str(fp16))
    return fp16


def calibration_samples(vlm, count: int, seed: int):
    """Image + question prompts (with their answers) from the train split, as input embeddings."""
    from ..inputs.placeholders import chunk_embeddings

    rng = random.Random(seed + 1)
    out = []
    for sid in split_ids("train", count, offset=12345):
        scene = make_scene(sid)
        q, a = sample_qa(scene, rng)
        req = vlm.request(q, {"image": [scene.image()]})
        with torch.no_grad():
            emb = chunk_embeddings(vlm.model.embed_tokens, req.prompt, req.image_embeds, 0, len(req.prompt))
            ans = vlm.model.embed_tokens(torch.tensor(vlm.tokenizer(a, add_special_tokens=False)["input_ids"]))
        out.append(torch.cat([emb, ans]))
    return out


def quantize(fp16_dir: Path, out_dir: Path, method: str, seed: int, samples: int = 64) -> Path:
    from ..quant.awq import QuantizeOptions
    from ..quantize import quantize_checkpoint

    if out_dir.exists():
        shutil.rmtree(out_dir)
    return quantize_checkpoint(fp16_dir, out_dir, lambda vlm: calibration_samples(vlm, samples, seed),
                               QuantizeOptions(method=method, group_size=GROUP_SIZE))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    fp16 = train(out, args.steps, args.batch_size, args.lr, args.seed)
    awq = quantize(fp16, out / "awq", "awq", args.seed)
    recorded = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "train_args.json").write_text(json.dumps(recorded, indent=2) + "\n")
    print(f"wrote {fp16} and {awq}")


if __name__ == "__main__":
    main()
