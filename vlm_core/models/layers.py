"""Building blocks shared by decoder families: RMSNorm, rotary embeddings, linear factory.

RMSNorm (with the residual add folded in) and rope run as fused Triton kernels
(`kernels/norm_rope.py`) or as their op-by-op torch references, per module: `kernels` is "torch"
(the default until the GPU benchmark shows the kernels winning), "auto" (Triton on CUDA
tensors, torch elsewhere) or "triton" (`LlamaDecoder.use_kernels`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from kernels import norm_rope
from kernels.utils import HAVE_TRITON

from ..config import RopeConfig

KERNEL_MODES = ("auto", "triton", "torch")


def use_triton(mode: str, x: torch.Tensor) -> bool:
    """Whether a module in kernel mode `mode` runs its Triton kernel on x."""
    return mode == "triton" or (mode == "auto" and x.is_cuda and HAVE_TRITON)

# (in_features, out_features, bias, qualified name) -> module with forward(x [.., in]) -> [.., out].
# Quantized checkpoints pass a factory that returns a quantized linear for the names it covers.
LinearFactory = Callable[[int, int, bool, str], nn.Module]


def dense_linear(in_features: int, out_features: int, bias: bool, name: str) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


@torch.no_grad()
def concat_linears(parts: list[nn.Module]) -> nn.Module:
    """One linear computing `torch.cat([p(x) for p in parts], -1)`: the parts' weights joined along
    the output dimension (one launch and one read of x instead of len(parts)). nn.Linear here; a
    quantized linear class provides `concat(parts)` for its own layout."""
    first = parts[0]
    if not all(type(p) is type(first) for p in parts):
        raise TypeError(f"cannot fuse linears of different types {[type(p).__name__ for p in parts]}")
    if hasattr(type(first), "concat"):
        return type(first).concat(parts)
    if not isinstance(first, nn.Linear):
        raise TypeError(f"no fusion for {type(first).__name__}")
    w = torch.cat([p.weight for p in parts])                                  # [sum N, K]
    fused = nn.Linear(w.shape[1], w.shape[0], bias=first.bias is not None, device=w.device, dtype=w.dtype)
    fused.weight.copy_(w)
    if first.bias is not None:
        fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused


class RMSNorm(nn.Module):
    """forward(x) -> norm(x); forward(x, residual) -> (norm(x + residual), x + residual)."""

    kernels = "torch"

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        fn = norm_rope.rms_norm if use_triton(self.kernels, x) else norm_rope.rms_norm_reference
        out, summed = fn(x, self.weight, self.eps, residual)
        return out if residual is None else (out, summed)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] (fp32) for default, linear and llama3 rope."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotate-half rope applied to q/k of shape [T, H, D] at explicit positions [T]."""

    def __init__(self, head_dim: int, rope: RopeConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, rope), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]          # [T, 1, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               kernels: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D] and k [T, Hkv, D] rotated by cos/sin [T, 1, D]."""
    if use_triton(kernels, q):
        return norm_rope.rope(q, k, cos, sin)
    return norm_rope.rope_reference(q, cos, sin), norm_rope.rope_reference(k, cos, sin)
