"""Tiny VILA-1.5 and NVILA folders built locally (no download), for tests.

    build_tiny_vila(out, family="vila15")   # LLaMA + SigLIP (70 px, 5x5 patches) + mlp_downsample
    build_tiny_vila(out, family="nvila")    # Qwen2 + SigLIP (56 px tiles) + dynamic S2 (56, 112, 168)
                                            #   + mlp_downsample_3x3_fix
    build_tiny_vila(out, "vila15", s2=True)  # VILA-1.5-S2: static S2 at (70, 140, 210)
    build_tiny_vila(out, "vila15", tower="clip")   # a CLIP tower (shortest-edge resize + center crop)

Each writes the folder layout (`config.json`, `llm/`, `vision_tower/`, `mm_projector/`) with
random weights: transformers' LlamaForCausalLM / Qwen2ForCausalLM and SiglipVisionModel save
their own subfolders; the projector is ours, saved under VILA's `layers.N` names. CLIP towers are saved as
transformers' CLIPVisionModel (keys under `vision_model.`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tiny import build_tokenizer

FAMILIES = ("vila15", "nvila")
MEDIA_TOKENS = ("<image>", "<vila/video>")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def build_tiny_vila(out_dir: str | Path, family: str = "nvila", *, seed: int = 0, image_mode: str | None = None,
                    projector: str | None = None, s2: bool = False, tower: str = "siglip") -> Path:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionModel

    from .config import ProjectorConfig
    from .models.projector import build_projector

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    if s2 and family == "nvila":
        raise ValueError("static S2 (s2=True) is VILA-1.5's; NVILA folders use dynamic S2")
    if tower not in ("siglip", "clip"):
        raise ValueError("tower must be 'siglip' or 'clip'")
    out = Path(out_dir)
    for sub in ("llm", "vision_tower", "mm_projector"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    nvila = family == "nvila"
    tok = build_tokenizer(extra_special=MEDIA_TOKENS + (CHATML_TOKENS if nvila else ()), add_bos=not nvila)
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
                  eos_token_id=tok.eos_token_id, initializer_range=0.1)
    if nvila:
        llm = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True,
                                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
        with torch.no_grad():
            for layer in llm.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.2)
    else:
        llm = LlamaForCausalLM(LlamaConfig(**common, bos_token_id=tok.bos_token_id))
    llm.eval().save_pretrained(str(out / "llm"))
    tok.save_pretrained(str(out / "llm"))

    size = 56 if nvila else 70
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                image_size=size, patch_size=14)
    if tower == "clip":
        CLIPVisionModel(CLIPVisionConfig(**dims)).eval().save_pretrained(str(out / "vision_tower"))
        pre = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
               "crop_size": {"height": size, "width": size}, "do_center_crop": True,
               "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    else:
        SiglipVisionModel(SiglipVisionConfig(**dims)).eval().save_pretrained(str(out / "vision_tower"))
        pre = {"image_processor_type": "SiglipImageProcessor", "size": {"height": size, "width": size},
               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (out / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(
        {**pre, "do_resize": True, "resample": 3}, indent=2))

    scales = (size, 2 * size, 3 * size) if (nvila or s2) else ()
    ptype = projector or ("mlp_downsample_3x3_fix" if nvila else "mlp_downsample")
    proj = build_projector(ProjectorConfig(ptype, 32 * max(1, len(scales)), 64))
    with torch.no_grad():
        for p in proj.parameters():
            p.normal_(0, 0.2)
    state = {("layers." + k.removeprefix("0.")) if ptype == "linear" else "layers." + k: v.contiguous()
             for k, v in proj.state_dict().items()}
    save_file(state, str(out / "mm_projector" / "model.safetensors"), metadata={"format": "pt"})
    (out / "mm_projector" / "config.json").write_text(json.dumps(
        {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector", "mm_projector_type": ptype}))

    top = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch" if tower == "clip" else "cls_patch", "mm_projector_type": ptype,
           "image_aspect_ratio": image_mode or ("dynamic_s2" if nvila else "resize"),
           "image_encoder": json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder"}),
           "video_encoder": json.dumps({"_target_": "llava.model.encoders.BasicVideoEncoder"}),
           "num_video_frames": 8, "max_tiles": 12, "model_dtype": "torch.float16"}
    if nvila:
        top.update(dynamic_s2=True, s2_scales=",".join(map(str, scales)), s2_max_split_size=size,
                   s2_resize_output_to_scale_idx=-1)
    elif s2:
        top.update(s2=True, s2_scales=",".join(map(str, scales)), s2_max_split_size=size)
    (out / "config.json").write_text(json.dumps(top, indent=2))
    return out
