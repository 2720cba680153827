"""A LLaVA-1.5-7B-shaped AWQ checkpoint on this machine: load time, peak memory, one generation, and the
floor that reading the 4-bit weights once per token sets.

    python bench/real_shape.py [--dir /tmp/llava7b-awq] [--keep] [--dtype bfloat16]
                               [--out bench/results/real-shape-cpu.json]

Writes (into a temporary folder, never the repository) a llava-hf checkpoint with the real
LLaVA-1.5-7B shapes and random weights: CLIP ViT-L/14 at 336 px (fp16), an mlp2x_gelu
projector, and a 32-layer LLaMA-7B decoder (4096 hidden, 11008 MLP, 32 heads, 32,064 vocab)
whose linears are AutoAWQ gemm int4 with group size 128. Then it loads that folder with
`VLM.from_pretrained` and generates 16 greedy tokens for a prompt with one picture (576 image
tokens + the template's text), reporting the load time, the process's peak RSS after loading and after
generating against the checkpoint's size, the time to the first token (prefill of the whole prompt, in
chunks) and the time per decoded token. Beside the decode time it prints its floor: the bytes every
decode step reads (the packed int4 weights with their scales, and the dense lm_head, norms) over the read
bandwidth of this machine measured in the same run with the same threads. On CPU the AWQ linears hold
PyTorch's int4 layout only: bf16 decode runs its int4 matmul, the prefill dequantizes into one scratch
buffer per call and runs a bf16 GEMM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
GROUP = 128


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def read_bandwidth_gbs(gib: float = 1.0, reps: int = 9) -> float:
    """GB/s of reading a buffer much larger than the caches (a sum over fp32, the median of `reps`: this
    virtual machine's bandwidth moves from run to run)."""
    x = torch.ones(int(gib * 2 ** 30) // 4)
    x.sum()
    times = sorted(_timed(x.sum) for _ in range(reps))
    return x.numel() * 4 / times[reps // 2] / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_bytes(model) -> dict[str, int]:
    """Bytes one decode step reads from the decoder's weights: the 4-bit linears' packed bytes and
    per-group numbers, and every dense tensor of the decoder (lm_head, norms); the embedding reads one row."""
    from vlm_core.quant.awq_linear import AWQLinear

    int4 = dense = 0
    for m in model.decoder.modules():
        if isinstance(m, AWQLinear):
            c = m._cpu
            int4 += c.packed.numel() + sum(t.numel() * t.element_size() for t in
                                           ((c.scales_and_zeros,) if c.scales_and_zeros is not None else (c.scales, c.szeros)))
        else:
            dense += sum(p.numel() * p.element_size() for name, p in m.named_parameters(recurse=False)
                         if not name.startswith("embed"))
    embed = model.decoder.embed_tokens.weight
    dense -= embed.numel() * embed.element_size() if embed is not model.decoder.lm_head.weight else 0
    return {"int4": int4, "dense": max(dense, 0)}


def config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    d = cfg.to_dict()
    d["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
                                "version": "gemm"}
    d["dtype"] = "float16"
    return d


def awq_tensors(prefix: str, k: int, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """AutoAWQ gemm tensors of a random k -> n linear (weights of about +-0.02)."""
    return {f"{prefix}.qweight": torch.randint(-2 ** 31, 2 ** 31 - 1, (k, n // 8), dtype=torch.int32, generator=g),
            f"{prefix}.qzeros": torch.full((k // GROUP, n // 8), 0x88888888 - 2 ** 32, dtype=torch.int32),
            f"{prefix}.scales": torch.full((k // GROUP, n), 0.003, dtype=torch.float16)}


def write_checkpoint(out: Path) -> float:
    """The folder described above; returns its size in GiB."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    from vlm_core.tiny import LLAVA_HF_CHAT_TEMPLATE, build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(chat_template=LLAVA_HF_CHAT_TEMPLATE)
    tok.save_pretrained(str(out))
    raw = config(tok)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    from transformers import CLIPVisionConfig

    tower = CLIPVisionModel(CLIPVisionConfig(**raw["vision_config"])).half()
    shard("vision.safetensors", {f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()})
    del tower
    h, inter, vocab = 4096, 11008, 32064
    small = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).half()  # noqa: E731
    shard("embed.safetensors", {
        "model.multi_modal_projector.linear_1.weight": small(h, 1024), "model.multi_modal_projector.linear_1.bias": small(h),
        "model.multi_modal_projector.linear_2.weight": small(h, h), "model.multi_modal_projector.linear_2.bias": small(h),
        "model.language_model.embed_tokens.weight": small(vocab, h),
        "model.language_model.norm.weight": torch.ones(h, dtype=torch.float16),
        "lm_head.weight": small(vocab, h)})
    for i in range(32):
        p = f"model.language_model.layers.{i}"
        t = {f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.float16),
             f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16)}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t.update(awq_tensors(f"{p}.self_attn.{name}", h, h, g))
        t.update(awq_tensors(f"{p}.mlp.gate_proj", h, inter, g))
        t.update(awq_tensors(f"{p}.mlp.up_proj", h, inter, g))
        t.update(awq_tensors(f"{p}.mlp.down_proj", inter, h, g))
        shard(f"layers-{i:02d}.safetensors", t)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in out.iterdir()) / 2 ** 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint folder afterwards")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "bench/results/real-shape-cpu.json"))
    a = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    folder = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="llava7b-awq-"))
    bw = read_bandwidth_gbs()        # first: its 1 GiB buffer must not count in the peak memory below
    try:
        t = time.perf_counter()
        size = write_checkpoint(folder)
        write_s = time.perf_counter() - t
        rss_before = peak_rss_gib()
        from PIL import Image

        from vlm_core.engine.sampling import SamplingParams
        from vlm_core.vlm import VLM

        t = time.perf_counter()
        vlm = VLM.from_pretrained(folder, dtype=a.dtype, fuse_projections=True)
        load_s = time.perf_counter() - t
        rss_loaded = peak_rss_gib()
        image = Image.new("RGB", (640, 480), (120, 160, 200))
        req = vlm.request("Describe the image.", {"image": [image]}, SamplingParams(max_new_tokens=a.tokens, ignore_eos=True))
        engine = vlm.engine()
        engine.add_request("r", req)
        t = time.perf_counter()
        first = None
        while engine.has_unfinished():
            outs = engine.step()
            if first is None and any(o.token_ids for o in outs):
                first = time.perf_counter() - t
        gen_s = time.perf_counter() - t
        per_token = (gen_s - first) / max(1, a.tokens - 1)
        weights = decode_bytes(vlm.model)
        floor_int4 = weights["int4"] / (bw * 1e9)
        floor_all = (weights["int4"] + weights["dense"]) / (bw * 1e9)
        rss = peak_rss_gib()
        result = {"device": "cpu", "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                  "dtype": a.dtype, "checkpoint_gib": round(size, 2), "write_s": round(write_s, 1),
                  "load_s": round(load_s, 1), "peak_rss_gib_before_load": round(rss_before, 2),
                  "peak_rss_gib_after_load": round(rss_loaded, 2), "prompt_tokens": len(req.prompt),
                  "image_tokens": sum(s.length for s in req.prompt.spans), "generated_tokens": a.tokens,
                  "prefill_s": round(first, 2), "per_token_s": round(per_token, 3),
                  "generation_s": round(gen_s, 1), "peak_rss_gib_after_generation": round(rss, 2),
                  "peak_rss_over_files": round(rss / size, 2),
                  "read_bandwidth_gb_s": round(bw, 1), "int4_bytes_per_token_gb": round(weights["int4"] / 1e9, 3),
                  "dense_bytes_per_token_gb": round(weights["dense"] / 1e9, 3),
                  "int4_floor_s": round(floor_int4, 3), "weights_floor_s": round(floor_all, 3),
                  "decode_over_int4_floor": round(per_token / floor_int4, 2),
                  "decode_over_weights_floor": round(per_token / floor_all, 2)}
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    for k, v in result.items():
        print(f"{k:>32}: {v}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
