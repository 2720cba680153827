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


TL_DOT_MIN_K = 16     # the smallest K of `tl.dot` on NVIDIA GPUs


def check_attention_shapes(block_size: int, head_dim: int) -> None:
    """The Triton paged attention multiplies q @ k^T over head_dim and p @ v over a KV block's tokens:
    both are `tl.dot` K dimensions, which NVIDIA GPUs need to be at least 16."""
    if block_size < TL_DOT_MIN_K or head_dim < TL_DOT_MIN_K:
        raise ValueError(f"the Triton paged attention needs block_size >= {TL_DOT_MIN_K} and head_dim >= "
                         f"{TL_DOT_MIN_K} (tl.dot's smallest K on NVIDIA GPUs), got block_size={block_size}, "
                         f"head_dim={head_dim}; use attention='torch' or a larger block_size")
