"""`AWQLinear`: a drop-in 4-bit linear (same `forward(x)` as nn.Linear).

Buffers are the AutoAWQ gemm tensors, so checkpoints load by name:
    qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales [K/g, N], bias [N] (optional)
`post_load()` derives `scaled_zeros = -zero * scale` [K/g, N], the form the kernel uses
(one FMA per weight). On CUDA (or under TRITON_INTERPRET=1) the Triton kernel runs; on CPU
the torch reference runs and keeps the dequantized weight cached, since CPU serving is for
small models.
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
        self._dense: torch.Tensor | None = None   # CPU reference path cache, fp32 [K, N]

    def post_load(self) -> None:
        """Derive the kernel's scaled zeros from the loaded integer zeros."""
        z = unpack_awq(self.qzeros).float()
        self.scaled_zeros = (-z * self.scales.float()).to(self.scales.dtype)
        self._dense = None

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
            if self._dense is None:
                self._dense = dequantize_reference(self.qweight, self.scales, self.scaled_zeros, self.group_size)
            y = (x2.float() @ self._dense).to(x.dtype)
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
