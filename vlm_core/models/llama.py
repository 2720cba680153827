"""LLaMA decoder: a plain module over a flat batch of tokens.

forward(input_ids [T], positions [T], kv, inputs_embeds [T, H] | None) -> hidden [T, H]
compute_logits(hidden [N, H]) -> [N, V]

Parameter names mirror the Hugging Face LLaMA layout (`layers.N.self_attn.q_proj`, ...)
so checkpoint mapping is a prefix rename. Linear layers come from a factory chosen at
construction, which is how quantized checkpoints plug in without branches here.

`use_kernels(mode)` picks fused Triton RMSNorm(+residual) and rope ("auto": on CUDA) or the
torch references ("torch", the default). A decoder layer hands the residual stream on separately from its output, so
each residual add happens inside the next norm (one kernel for both).

`fuse_projections()` (after loading, for inference) joins q/k/v into one `qkv_proj` and
gate/up into one `gate_up_proj`, dense and AWQ alike: one launch and one read of x each. The
separate modules are gone afterwards, so code that edits them (the AWQ calibration, tests
swapping modules) works on an unfused model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ..memory import return_freed_memory
from .attention import KVView
from .layers import KERNEL_MODES, LinearFactory, RMSNorm, RotaryEmbedding, apply_rope, concat_linears, dense_linear


class LlamaAttention(nn.Module):
    kernels = "torch"

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
        self.split = (q_out, kv_out, kv_out)
        self.qkv_proj: nn.Module | None = None

    def fuse(self) -> None:
        self.qkv_proj = concat_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVView) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(t, self.num_heads, self.head_dim)     # [T, Hq, D]
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.reshape(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        q, k = apply_rope(q, k, cos, sin, self.kernels)
        out = kv.attend(self.layer_idx, q, k, v, self.scale)           # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig, linear: LinearFactory, prefix: str):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, b, f"{prefix}.gate_proj")
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, b, f"{prefix}.up_proj")
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, b, f"{prefix}.down_proj")
        self.gate_up_proj: nn.Module | None = None

    def fuse(self) -> None:
        self.gate_up_proj = concat_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, linear: LinearFactory):
        super().__init__()
        prefix = f"layers.{layer_idx}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx, linear, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, linear, f"{prefix}.mlp")

    def forward(self, x, cos, sin, kv, residual=None):
        """(output, residual): the block's result is output + residual. `residual` None: x is
        the block's whole input; else the block's input is x + residual."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


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

    @property
    def fused(self) -> bool:
        return self.layers[0].self_attn.qkv_proj is not None if len(self.layers) else False

    def use_kernels(self, mode: str) -> None:
        """"torch" (the default), "auto" (Triton RMSNorm and rope on CUDA) or "triton" (anywhere
        Triton runs)."""
        if mode not in KERNEL_MODES:
            raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {mode!r}")
        for m in self.modules():
            if isinstance(m, (RMSNorm, LlamaAttention)):
                m.kernels = mode

    def fuse_projections(self) -> None:
        """Join q/k/v and gate/up of every layer (idempotent)."""
        if self.fused:
            return
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
            return_freed_memory()          # the parts just freed, before the next layer's copies

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVView,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [T, H]
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, cos, sin, kv, residual)
        return self.norm(x, residual)[0] if residual is not None else self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
