"""`AWQLinear`: a drop-in 4-bit linear (same `forward(x)` as nn.Linear).

Buffers are the AutoAWQ gemm tensors, so checkpoints load by name:
    qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales [K/g, N], bias [N] (optional)
`post_load()` derives `scaled_zeros = -zero * scale` [K/g, N], the form the kernel uses
(one FMA per weight). On CUDA (or under TRITON_INTERPRET=1) the Triton kernel runs; on CPU
the dequantized weight is cached and multiplied with torch: in fp32 for fp32 activations, in
bf16 for 16-bit ones (a 7B model's cache is then 13 GB instead of 27 GB, and a bf16 GEMV is
faster than fp32 on CPUs with AVX-512 BF16; fp16 matmuls are slow on CPUs, so fp16
activations are computed in bf16 too).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.w4a16 import dequantize_reference, triton_available, w4a16_matmul

from ..config import AWQConfig
from ..models.layers import LinearFactory, dense_linear
from .pack import unpack_awq


class AWQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int):
        super().__init__()
        if in_features % group_size or out_features % 8:
            raise ValueError(f"AWQ linear {in_features}->{out_features} needs in % {group_size} == 0 and out % 8 == 0")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features, out_features // 8, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("scaled_zeros", None, persistent=False)
        self._dense: torch.Tensor | None = None   # CPU path cache [K, N], fp32 or bf16

    def post_load(self) -> None:
        """Derive the kernel's scaled zeros from the loaded integer zeros."""
        z = unpack_awq(self.qzeros).float()
        self.scaled_zeros = (-z * self.scales.float()).to(self.scales.dtype)
        self._dense = None

    @classmethod
    @torch.no_grad()
    def concat(cls, parts: list["AWQLinear"]) -> "AWQLinear":
        """The parts as one AWQLinear over the same input: packed weights, zeros and scales joined
        along the output columns (packing is within groups of 8 columns, so they concatenate)."""
        first = parts[0]
        if any(p.in_features != first.in_features or p.group_size != first.group_size for p in parts):
            raise ValueError("AWQ linears fuse only with the same input size and group size")
        has_bias = first.bias is not None
        fused = cls(first.in_features, sum(p.out_features for p in parts), has_bias, first.group_size)
        for name in ("qweight", "qzeros", "scales"):
            setattr(fused, name, torch.cat([getattr(p, name) for p in parts], dim=1))
        if has_bias:
            fused.bias = torch.cat([p.bias for p in parts])
        fused.post_load()
        return fused

    def _apply(self, fn, recurse=True):
        self._dense = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaled_zeros is None:
            raise RuntimeError("AWQLinear.post_load() was not called after loading weights")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if triton_available(x.device):
            y = w4a16_matmul(x2.contiguous(), self.qweight, self.scales, self.scaled_zeros, self.group_size)
        else:
            compute = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
            if self._dense is None or self._dense.dtype != compute:
                self._dense = dequantize_reference(self.qweight, self.scales, self.scaled_zeros,
                                                   self.group_size).to(compute)
            y = (x2.to(compute) @ self._dense).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


_CHECKPOINT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")


def awq_linear_factory(cfg: AWQConfig) -> LinearFactory:
    """AWQLinear for every decoder linear except those `modules_to_not_convert` names."""
    skip = tuple(_strip_prefix(s) for s in cfg.modules_to_not_convert)

    def make(in_features: int, out_features: int, bias: bool, name: str) -> nn.Module:
        if any(s and s in name for s in skip):
            return dense_linear(in_features, out_features, bias, name)
        return AWQLinear(in_features, out_features, bias, cfg.group_size)

    return make


def _strip_prefix(name: str) -> str:
    for p in _CHECKPOINT_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name
