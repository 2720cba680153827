"""Train the embedded default model from scratch, then quantize it with our own AWQ.

    python -m vlm_core.default_model.train --out vlm_core/default_model/weights

writes `fp16/` (llava-hf checkpoint + tokenizer + preprocessor config) and `awq/` (AutoAWQ
4-bit, calibrated on image+question samples of the train split). Deterministic for a given
`--seed` and thread count; 38 minutes of training on 2 CPU cores with the defaults.

Besides the answers' loss, training-only probes (`PatchHeads`, not saved) read the tower's patch
features and are taught, per patch, the kind, colour and place from the left of the shape that
covers it: a dense signal that binds what a shape is to where it is, which the answers alone
teach too slowly.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..inputs.image import ImageProcessor, ImageProcessorConfig
from ..inputs.template import LLAVA_15_TEMPLATE, render_chat, user_turn
from .data import COLOURS, SHAPES, TRAIN_IDS, make_scene, patch_labels, sample_qa, split_ids, vocabulary

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_SIZE = 64      # pictures are resized (squashed, whatever their aspect ratio) to this square
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


def build_config(tokenizer, vision_layers: int = 4, text_layers: int = 3, width: int = 128):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=width)
    text = LlamaConfig(hidden_size=width, intermediate_size=3 * width, num_hidden_layers=text_layers,
                       num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-1, vision_feature_select_strategy="default")


def tokens_per_image() -> int:
    return (IMAGE_SIZE // PATCH) ** 2


def grid_positions(side: int, dim: int) -> torch.Tensor:
    """[side * side, dim] 2-D sine-cosine codes of a side x side patch grid, row-major: the first
    half of the channels encode the column (x), the second half the row (y)."""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")

    def code(pos):
        angles = pos.reshape(-1, 1) * freq
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([code(cols), code(rows)], dim=1).float()


def init_grid_positions(model) -> None:
    """Start the tower's learned position embeddings from 2-D sine-cosine codes (the class
    position stays random): where a patch sits is then readable from the first step, which
    "left of" and left-to-right descriptions need. They stay trainable."""
    emb = model.model.vision_tower.embeddings.position_embedding.weight
    side = IMAGE_SIZE // PATCH
    with torch.no_grad():
        emb[1:] = grid_positions(side, emb.shape[1])


class Batcher:
    """Training batches. Each picture is a conversation of `turns` questions about it (the first
    turn exactly the single-question prompt the model answers at inference, later turns as the
    chat template continues it); the loss covers the answers and their EOS only."""

    def __init__(self, tokenizer, seed: int, turns: int = 1):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.turns = turns
        self.proc = ImageProcessor(ImageProcessorConfig(IMAGE_SIZE, IMAGE_SIZE, square_resize=True))
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self._prompts: dict[str, list[int]] = {}
        self._later: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompts:
            text = render_chat(self.tok, user_turn(question, 1))
            ids = self.tok(text)["input_ids"]
            i = ids.index(self.image_id)
            self._prompts[question] = ids[:i] + [self.image_id] * tokens_per_image() + ids[i + 1:]
        return self._prompts[question]

    def later_turn_ids(self, question: str) -> list[int]:
        """A follow-up question as the template renders it after an answer's EOS."""
        if question not in self._later:
            self._later[question] = self.tok(f"USER: {question} ASSISTANT:", add_special_tokens=False)["input_ids"]
        return self._later[question]

    def batch(self, size: int):
        ids, labels, pixels, dense = [], [], [], []
        for _ in range(size):
            scene = make_scene(self.rng.randrange(TRAIN_IDS))
            dense.append(patch_labels(scene, IMAGE_SIZE // PATCH))
            seq, lab, asked = [], [], set()
            for turn in range(self.turns):
                q, a = sample_qa(scene, self.rng)
                if q in asked:
                    continue
                asked.add(q)
                p = self.prompt_ids(q) if turn == 0 else self.later_turn_ids(q)
                ans = self.tok(a, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
                seq += p + ans
                lab += [-100] * len(p) + ans
            ids.append(seq)
            labels.append(lab)
            pixels.append(self.proc.one(scene.image()))
        width = max(len(x) for x in ids)
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        patches = torch.from_numpy(np.stack([np.stack(d) for d in dense])).long()     # [batch, 3, patches]
        return input_ids, mask, lab, torch.stack(pixels), patches


class PatchHeads(torch.nn.Module):
    """Training-only probes on the patch features the projector reads: per patch, which kind,
    which colour and which place from the left the shape covering it has (or background). Their
    loss teaches the tower to bind a shape's kind, colour and order to its patches; they are not
    part of the saved checkpoint."""

    def __init__(self, width: int):
        super().__init__()
        self.kind = torch.nn.Linear(width, 1 + len(SHAPES))
        self.colour = torch.nn.Linear(width, 1 + len(COLOURS))
        self.place = torch.nn.Linear(width, 4)
        self.features = None

    def capture(self, tower) -> None:
        def hook(_module, _inputs, output):
            self.features = output[0] if isinstance(output, tuple) else output
        tower.encoder.layers[-1].register_forward_hook(hook)

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        feats = self.features[:, 1:]          # patch tokens, as vision_feature_select_strategy "default"
        ce = torch.nn.functional.cross_entropy
        return sum(ce(head(feats).flatten(0, 1), targets[:, i].flatten())
                   for i, head in enumerate((self.kind, self.colour, self.place))) / 3


def train(out_dir: Path, steps: int, batch_size: int, lr: float, seed: int, log_every: int = 100,
          vision_layers: int = 4, text_layers: int = 3, width: int = 128, turns: int = 1,
          patch_loss: float = 1.0) -> Path:
    from transformers import LlavaForConditionalGeneration

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = LlavaForConditionalGeneration(build_config(tokenizer, vision_layers, text_layers, width))
    init_grid_positions(model)
    heads = PatchHeads(width)
    heads.capture(model.model.vision_tower)
    model.train()
    opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    batcher = Batcher(tokenizer, seed, turns)
    t0, running, running_aux = time.time(), None, None
    for step in range(steps):
        input_ids, mask, labels, pixels, patches = batcher.batch(batch_size)
        lm = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        aux = heads.loss(patches)
        loss = lm + patch_loss * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = lm.item() if running is None else 0.98 * running + 0.02 * lm.item()
        running_aux = aux.item() if running_aux is None else 0.98 * running_aux + 0.02 * aux.item()
        if (step + 1) % log_every == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}  loss {running:.4f}  patch loss {running_aux:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    model.eval()
    fp16 = out_dir / "fp16"
    model.half().save_pretrained(str(fp16))
    tokenizer.save_pretrained(str(fp16))
    # resized straight to the square (no centre crop: a wide picture keeps its edges)
    CLIPImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
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
            emb = chunk_embeddings(vlm.model.embed_tokens, req.prompt, req.media_embeds, 0, len(req.prompt))
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
    ap.add_argument("--steps", type=int, default=5500)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-layers", type=int, default=3)
    ap.add_argument("--width", type=int, default=128, help="hidden size of the tower, projector and LLM")
    ap.add_argument("--turns", type=int, default=3, help="questions per picture in one training conversation")
    ap.add_argument("--patch-loss", type=float, default=1.0, help="weight of the training-only patch probes' loss")
    ap.add_argument("--no-quantize", action="store_true", help="write fp16/ only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    fp16 = train(out, args.steps, args.batch_size, args.lr, args.seed, vision_layers=args.vision_layers,
                 text_layers=args.text_layers, width=args.width, turns=args.turns, patch_loss=args.patch_loss)
    if args.no_quantize:
        return
    awq = quantize(fp16, out / "awq", "awq", args.seed)
    recorded = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "train_args.json").write_text(json.dumps(recorded, indent=2) + "\n")
    print(f"wrote {fp16} and {awq}")


if __name__ == "__main__":
    main()
