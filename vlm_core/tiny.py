"""Tiny llava-hf checkpoints built locally (no download): for tests and a first try of the CLI.

    python -m vlm_core.tiny --out /tmp/tiny-llava

writes a randomly initialised `LlavaForConditionalGeneration` (CLIP tower, mlp2x_gelu
projector, LLaMA decoder) with a byte-level BPE tokenizer and an example image
(`example.png`). Its answers are noise: it exists to exercise loading and generation.
Options select the checkpoint key layout, sharding, projector and feature selection so the
loader can be tested against every variant.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<im_patch>", "<im_start>", "<im_end>"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle"]
CORPUS = [
    "USER: What colour is the circle? ASSISTANT: The circle is red.",
    "USER: How many shapes are there? ASSISTANT: There are three shapes.",
    "USER: Is the square left of the triangle? ASSISTANT: Yes, the square is left of the triangle.",
    "USER: Describe the image. ASSISTANT: A small blue square above a large green circle.",
    "A chat between a curious human and an artificial intelligence assistant.",
] + [f"The {s} is {c}. A {c} {s}." for s in SHAPES for c in COLOURS]

LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tokenizer(vocab_size: int = 384, chat_template: str | None = None, extra_special: tuple[str, ...] = (),
                    add_bos: bool = True):
    """Byte-level BPE trained on a small corpus, wrapped in `PreTrainedTokenizerFast`; adds BOS
    unless `add_bos` is False (Qwen2-style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + [t for t in extra_special if t not in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    bos = specials.index("<s>")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if add_bos else None, eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", extra_special_tokens=specials[4:])
    if chat_template:
        fast.chat_template = chat_template
    return fast


def tiny_llava_config(tokenizer, *, feature_layer=-2, strategy="default", tie=False, rope_parameters=None,
                      image_size=32, patch_size=8, text_init=0.05, vision_layers=3, text_layers=2,
                      max_positions=512, text_hidden=64):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size, projection_dim=32)
    text_kw = dict(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=max_positions,
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie, initializer_range=text_init)
    if rope_parameters:
        text_kw["rope_parameters"] = rope_parameters
    text = LlamaConfig(**text_kw)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                       tie_word_embeddings=tie)


def _relayout(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename in-memory transformers-5 keys to a checkpoint key layout ('old' or 'new')."""
    out = {}
    for k, v in state.items():
        if k.startswith("model.vision_tower.") and "vision_model." not in k:
            k = k.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)
        if layout == "old":
            if k.startswith("lm_head."):
                k = "language_model." + k
            elif k.startswith("model.language_model."):
                k = "language_model.model." + k[len("model.language_model."):]
            elif k.startswith("model."):
                k = k[len("model."):]
        out[k] = v.contiguous()
    return out


def save_safetensors(state: dict[str, torch.Tensor], out: Path, shards: int = 1) -> None:
    from safetensors.torch import save_file

    keys = sorted(state)
    if shards <= 1:
        save_file({k: state[k] for k in keys}, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: state[k] for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def build_tiny_llava(out_dir: str | Path, *, seed: int = 0, layout: str = "hf", shards: int = 1,
                     projector: str = "mlp2x_gelu", chat_template: str | None = None,
                     extra_config: dict | None = None, **config_kw) -> Path:
    """Write a tiny llava-hf checkpoint folder and return its path.

    layout: "hf" (what this transformers' `save_pretrained` writes), "old"
    (`language_model.model.*`, `vision_tower.vision_model.*`) or "new" (`model.language_model.*`).
    projector "linear" keeps only `linear_1` and records `mm_projector_type: linear`.
    """
    from transformers import LlavaForConditionalGeneration

    try:  # transformers >= 5.2 names the pillow implementation explicitly
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(chat_template=chat_template)
    config = tiny_llava_config(tokenizer, **config_kw)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    if layout == "hf" and projector == "mlp2x_gelu" and shards == 1:
        model.save_pretrained(str(out))
    else:
        state = model.state_dict()
        if projector == "linear":
            state = {k: v for k, v in state.items() if "multi_modal_projector.linear_2" not in k}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_safetensors(_relayout(state, "new" if layout == "hf" else layout), out, shards)
        config.save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    if projector != "mlp2x_gelu":
        cfg["mm_projector_type"] = projector
    cfg.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer.save_pretrained(str(out))
    size = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(str(out))
    return out


def draw_example_image(path: str | Path, seed: int = 0, size: tuple[int, int] = (96, 64)) -> Path:
    """A picture of a few coloured shapes (pillow)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    fills = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 210, 40)}
    for _ in range(rng.randint(1, 3)):
        r = rng.randint(max(2, min(size) // 8), max(3, min(size) // 3))
        x, y = rng.randint(0, max(0, size[0] - r)), rng.randint(0, max(0, size[1] - r))
        fill = fills[rng.choice(sorted(fills))]
        shape = rng.choice(SHAPES)
        if shape == "circle":
            draw.ellipse((x, y, x + r, y + r), fill=fill)
        elif shape == "square":
            draw.rectangle((x, y, x + r, y + r), fill=fill)
        else:
            draw.polygon([(x, y + r), (x + r, y + r), (x + r // 2, y)], fill=fill)
    img.save(path)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a tiny random llava-hf checkpoint and an example image.")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = build_tiny_llava(args.out, seed=args.seed)
    draw_example_image(out / "example.png", args.seed)
    print(f"wrote {out} (and {out / 'example.png'})")


if __name__ == "__main__":
    main()
