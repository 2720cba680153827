"""LLaMA decoder: a plain module over a flat batch of tokens.

forward(input_ids [T], positions [T], kv, inputs_embeds [T, H] | None) -> hidden [T, H]
compute_logits(hidden [N, H]) -> [N, V]

Parameter names mirror the Hugging Face LLaMA layout (`layers.N.self_attn.q_proj`, ...)
so checkpoint mapping is a prefix rename. Linear layers come from a factory chosen at
construction, which is how quantized checkpoints plug in without branches here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .attention import KVView
from .layers import LinearFactory, RMSNorm, RotaryEmbedding, apply_rope, dense_linear


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, linear: LinearFactory, prefix: str):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        b = cfg.qkv_bias
        self.q_proj = linear(cfg.hidden_size, q_out, b, f"{prefix}.q_proj")
        self.k_proj = linear(cfg.hidden_size, kv_out, b, f"{prefix}.k_proj")
        self.v_proj = linear(cfg.hidden_size, kv_out, b, f"{prefix}.v_proj")
        self.o_proj = linear(q_out, cfg.hidden_size, cfg.o_bias, f"{prefix}.o_proj")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVView) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)     # [T, Hq, D]
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = kv.attend(self.layer_idx, q, k, v, self.scale)           # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig, linear: LinearFactory, prefix: str):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, b, f"{prefix}.gate_proj")
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, b, f"{prefix}.up_proj")
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, b, f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, linear: LinearFactory):
        super().__init__()
        prefix = f"layers.{layer_idx}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx, linear, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, linear, f"{prefix}.mlp")

    def forward(self, x, cos, sin, kv):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    def __init__(self, cfg: TextConfig, linear: LinearFactory = dense_linear):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, linear) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # The output head stays dense: it is small next to the layers and sensitive to rounding.
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVView,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [T, H]
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, kv)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
