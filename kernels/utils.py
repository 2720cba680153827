"""Shared launch policy for the Triton kernels."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    HAVE_TRITON = False


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA devices, or anywhere under TRITON_INTERPRET=1."""
    return HAVE_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def dot_in_fp32(x: torch.Tensor) -> bool:
    """Whether `tl.dot` should take fp32 operands (full fp32, no TF32).

    fp32 activations always; bf16 ones under the CPU interpreter too, whose bf16 `tl.dot`
    returns garbage (triton 3.9). Operands keep their 16-bit rounding either way.
    """
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and x.device.type != "cuda")
