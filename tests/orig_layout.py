"""Tiny checkpoints in the original LLaVA repository layout, and references written from the
authors' code (haotian-liu/LLaVA `mm_utils.py`, `conversation.py`, `llava_arch.py`): what the
tests of `vlm_core.families.llava_orig` compare with.

A folder holds a LLaMA config.json with LLaVA's `mm_*` fields, the tokenizer (a SentencePiece-style
one: Metaspace `▁` pieces, BOS added, no chat template, no image tokens) and the weights of a
`LlamaForCausalLM` under LLaVA's names plus `model.mm_projector.*`. The CLIP tower is a separate
folder: a transformers `CLIPVisionModel` folder or a whole `CLIPModel` as openai publishes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TOWER_ID = "openai/clip-vit-tiny-patch8-32"
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CORPUS = ["What colour is the circle? The circle is red.", "How many shapes are there? There are three shapes.",
          "Describe the image. A small blue square above a large green circle.",
          "USER: ASSISTANT: A chat between a curious human and an artificial intelligence assistant.",
          "The assistant gives helpful, detailed, and polite answers to the human's questions."]


def sentencepiece_tokenizer():
    """A BPE over Metaspace pieces (LLaMA's `▁` convention, a `▁` prepended to every text), BOS
    added; `<unk>`, `<s>`, `</s>` only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    alphabet = sorted(set("".join(CORPUS)) | set("\n:<>/") | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tower_config(layers: int = 3):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu")


def write_tower(out: Path, form: str = "vision", seed: int = 1) -> Path:
    """A CLIP tower folder: `form` "vision" (CLIPVisionModel, safetensors, current preprocessor
    config) or "clip" (a whole CLIPModel in pytorch_model.bin with an old-style preprocessor
    config, integer sizes), as openai publishes theirs."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vcfg = tower_config()
    pre = {"crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
           "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 32}
    if form == "vision":
        CLIPVisionModel(vcfg).eval().save_pretrained(str(out))
        pre.update(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                   image_processor_type="CLIPImageProcessor")
        pre.pop("feature_extractor_type")
    else:
        cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, vocab_size=64, max_position_embeddings=16),
                         vision_config=vcfg.to_dict(), projection_dim=16)
        model = CLIPModel(cfg).eval()
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, out / "pytorch_model.bin")
        cfg.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out


def tower_state(folder: Path) -> dict[str, torch.Tensor]:
    """A tower folder's vision tensors, named `vision_model.*` (a CLIPModel's text tower left out)."""
    from vlm_core.checkpoint import iter_weights, weight_files

    out = {}
    for k, v in iter_weights(weight_files(folder)):
        if k.startswith(("text_model.", "visual_projection", "text_projection", "logit_scale")):
            continue
        out[k if k.startswith("vision_model.") else "vision_model." + k] = v
    return out


def write_checkpoint(out: Path, *, seed: int = 0, model_type: str = "llava_llama", kv_heads: int = 2,
                     im_start_end: bool = False, patch_token: bool = False, projector: str = "mlp2x_gelu",
                     aspect: str | None = "pad", tower: str | Path = TOWER_ID, tower_inside: Path | None = None,
                     weights: str = "safetensors", dtype: torch.dtype = torch.float16,
                     select_layer: int = -2, select_feature: str = "patch") -> Path:
    """An original-layout LLaVA folder. `weights`: "safetensors" (one file) or "bin" (two
    `pytorch_model-0000N-of-00002.bin` shards and their index). `tower_inside`: a tower folder whose
    `vision_model.*` tensors are also written as `model.vision_tower.vision_tower.vision_model.*`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = sentencepiece_tokenizer()
    n_added = int(patch_token) + 2 * int(im_start_end)
    vocab = len(tok) + n_added                   # LLaVA's loader resizes the embeddings to the added tokens
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(cfg).eval()
    state = {k: v.detach().to(dtype).contiguous() for k, v in llm.state_dict().items()}
    width = 32
    if projector == "linear":
        state["model.mm_projector.weight"] = (torch.randn(64, width) * 0.2).to(dtype)
        state["model.mm_projector.bias"] = (torch.randn(64) * 0.1).to(dtype)
    elif projector == "mlp2x_gelu":
        for i, (o, n) in enumerate(((64, width), (64, 64))):
            state[f"model.mm_projector.{2 * i}.weight"] = (torch.randn(o, n) * 0.2).to(dtype)
            state[f"model.mm_projector.{2 * i}.bias"] = (torch.randn(o) * 0.1).to(dtype)
    if tower_inside is not None:
        state.update({"model.vision_tower.vision_tower." + k: v.to(dtype) for k, v in tower_state(tower_inside).items()})
    raw = cfg.to_dict()
    raw.update(architectures=["LlavaLlamaForCausalLM"], model_type=model_type, mm_vision_tower=str(tower),
               mm_hidden_size=width, mm_projector_type=projector, mm_vision_select_layer=select_layer,
               mm_vision_select_feature=select_feature, mm_use_im_start_end=im_start_end,
               mm_use_im_patch_token=patch_token, image_aspect_ratio=aspect, use_mm_proj=True,
               freeze_mm_mlp_adapter=False, tune_mm_mlp_adapter=False, tokenizer_padding_side="right",
               torch_dtype="float16")
    if aspect is None:
        raw.pop("image_aspect_ratio")
    for k in ("dtype", "transformers_version"):
        raw.pop(k, None)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys = sorted(state)
        halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
        weight_map = {}
        for i, part in enumerate(halves):
            name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save({k: state[k] for k in part}, out / name)
            weight_map.update({k: name for k in part})
        (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tok.save_pretrained(str(out))
    return out


# ---- references from the authors' code ----------------------------------------------------------

def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = -200) -> list[int]:
    """LLaVA's `mm_utils.tokenizer_image_token`: pieces between `<image>`s tokenized alone, BOS kept
    on the first piece only, one `image_token_index` per image."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    out, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        out.append(chunks[0][0])
    for i, c in enumerate(chunks):
        if i:
            out.append(image_token_index)
        out.extend(c[offset:])
    return out


def expand2square(img, background):
    """LLaVA's `expand2square`: the picture centred on a square of `background`."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, ((side - w) // 2, 0) if h > w else (0, (side - h) // 2))
    return result


def llava_v1(turns) -> str:
    """`conv_llava_v1.get_prompt()` for (role, text) turns, then the generation prompt."""
    out = LLAVA_V1_SYSTEM + " "
    for role, text in turns:
        out += ("USER: " + text + " ") if role == "user" else ("ASSISTANT: " + text + "</s>")
    return out + "ASSISTANT:"


class Reference:
    """transformers' CLIPVisionModel and LlamaForCausalLM on a folder's weights, fed as LLaVA's
    `prepare_inputs_labels_for_multimodal` feeds its decoder; greedy decoding by full recompute."""

    def __init__(self, ckpt: Path, tower: Path, dequantized: dict[str, torch.Tensor] | None = None):
        from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        from vlm_core.checkpoint import iter_weights, weight_files

        raw = json.loads((ckpt / "config.json").read_text())
        self.raw = raw
        state = {k: v.float() for k, v in iter_weights([f for f in weight_files(ckpt) if f.suffix != ".pt"])
                 if not k.endswith((".qweight", ".qzeros", ".scales"))}
        state.update(dequantized or {})         # a 4-bit folder: its linears as dequantized weights
        text = {k: v for k, v in raw.items() if not k.startswith("mm_") and k != "quantization_config"}
        text["model_type"] = "llama"
        self.llm = LlamaForCausalLM(LlamaConfig(**text)).eval()
        llm_state = {k: v for k, v in state.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))}
        self.llm.load_state_dict(llm_state, strict=True)
        self.tower = CLIPVisionModel.from_pretrained(str(tower), dtype=torch.float32).eval()
        inside = {k[len("model.vision_tower.vision_tower."):]: v for k, v in state.items()
                  if k.startswith("model.vision_tower.vision_tower.")}
        if inside:    # this transformers' CLIPVisionModel names its tensors without `vision_model.`
            own = set(self.tower.state_dict())
            renamed = {(k if k in own else k.removeprefix("vision_model.")): v for k, v in inside.items()}
            missing, unexpected = self.tower.load_state_dict(renamed, strict=False)
            assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
        self.proj = {k[len("model.mm_projector."):]: v for k, v in state.items() if k.startswith("model.mm_projector.")}
        self.processor = CLIPImageProcessor.from_pretrained(str(tower))

    def pixels(self, images) -> torch.Tensor:
        """`process_images`: expand2square with the mean colour when image_aspect_ratio is pad."""
        from PIL import Image

        pics = [Image.open(p).convert("RGB") for p in images]
        if self.raw.get("image_aspect_ratio") == "pad":
            fill = tuple(int(x * 255) for x in self.processor.image_mean)
            pics = [expand2square(p, fill) for p in pics]
        return self.processor(pics, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        out = self.tower(self.pixels(images), output_hidden_states=True)
        f = out.hidden_states[self.raw["mm_vision_select_layer"]]
        if self.raw.get("mm_vision_select_feature", "patch") == "patch":
            f = f[:, 1:]
        p = self.proj
        if self.raw["mm_projector_type"] == "linear":
            return torch.nn.functional.linear(f, p["weight"], p["bias"])
        h = torch.nn.functional.linear(f, p["0.weight"], p["0.bias"])
        return torch.nn.functional.linear(torch.nn.functional.gelu(h), p["2.weight"], p["2.bias"])

    @torch.no_grad()
    def generate(self, ids: list[int], images=(), max_new_tokens: int = 8, eos: int = 2) -> list[int]:
        feats = self.features(images) if images else None
        embed = self.llm.get_input_embeddings()
        parts, k = [], 0
        for t in ids:
            if t == -200:
                parts.append(feats[k])
                k += 1
            else:
                parts.append(embed(torch.tensor([t])))
        x = torch.cat(parts)[None]
        out = []
        for _ in range(max_new_tokens):
            nxt = int(self.llm(inputs_embeds=x).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
            x = torch.cat([x, embed(torch.tensor([[nxt]]))], dim=1)
        return out
