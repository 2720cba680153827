"""Fused small ops of the decoder block: RMSNorm with the residual add, and rotary embeddings.

    rms_norm(x [T, H], weight [H], eps, residual [T, H] | None) -> (out [T, H], residual' [T, H])
        residual' = x + residual (x itself when residual is None); out = rmsnorm(residual') * weight
    rope(q [T, Hq, D], k [T, Hkv, D], cos [T, D], sin [T, D]) -> (q', k')
        rotate-half rope with cos/sin laid out as the torch path makes them (halves equal)

Eager PyTorch spends five launches on an RMSNorm and one on the add before it, and six or more
on rope for q and k; each kernel here is one launch (one program per token) that reads its
inputs once. Arithmetic is fp32 with one rounding to the input dtype at the end, so results
can differ from the op-by-op torch references (which round after each op) by an ulp; the
references are the definitions tests compare against. Importing this module never needs CUDA.
"""

from __future__ import annotations

import torch


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    triton = None
    tl = None


# ---- references -------------------------------------------------------------------------------

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As Hugging Face LLaMA computes it: the add in x's dtype, the norm in fp32, the weight
    applied after rounding back."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos/sin [T, 1, D] (or [T, D]), rotate-half convention."""
    if cos.dim() == 2:
        cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ---- kernels ----------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, H, eps,
                         stride_x, stride_r, stride_o, stride_ro,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = x + tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)   # in x's dtype
            tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
        h = x.to(tl.float32)
        var = tl.sum(h * h, axis=0) / H
        h = (h * tl.rsqrt(var + eps)).to(x.dtype)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_o + offs, (w.to(tl.float32) * h.to(tl.float32)).to(out_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _rotate_heads(src, dst, num_heads, stride_h, stride_dh, c, s, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        """Rotate `num_heads` heads of one token: src/dst point at its first head."""
        d = tl.arange(0, HALF)[None, :]
        h = tl.arange(0, BLOCK_H)[:, None]
        for start in range(0, num_heads, BLOCK_H):
            m = (start + h) < num_heads
            x1 = tl.load(src + (start + h) * stride_h + d, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(src + (start + h) * stride_h + HALF + d, mask=m, other=0.0).to(tl.float32)
            out = dst + (start + h) * stride_dh
            tl.store(out + d, (x1 * c - x2 * s).to(dst.dtype.element_ty), mask=m)
            tl.store(out + HALF + d, (x2 * c + x1 * s).to(dst.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
                     HQ, HKV, stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
                     stride_qot, stride_qoh, stride_kot, stride_koh,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        t = tl.program_id(0)
        d = tl.arange(0, HALF)
        c = tl.load(cos_ptr + t * stride_c + d).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + t * stride_c + d).to(tl.float32)[None, :]
        _rotate_heads(q_ptr + t * stride_qt, qo_ptr + t * stride_qot, HQ, stride_qh, stride_qoh, c, s, HALF, BLOCK_H)
        _rotate_heads(k_ptr + t * stride_kt, ko_ptr + t * stride_kot, HKV, stride_kh, stride_koh, c, s, HALF, BLOCK_H)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel; x and residual [T, H] with unit stride along H."""
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rms_norm needs rows with unit stride")
    t, hidden = x.shape
    out = torch.empty(t, hidden, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    if t:
        _rms_norm_kernel[(t,)](x, residual if residual is not None else x, weight, out, res_out, hidden, eps,
                               x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
                               res_out.stride(0), HAS_RESIDUAL=residual is not None,
                               BLOCK=triton.next_power_of_2(hidden), num_warps=4 if hidden <= 4096 else 8)
    return out, res_out


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel for q and k at once; cos/sin [T, D] or [T, 1, D], only their first half read."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    if d % 2 or (d // 2) & (d // 2 - 1):
        raise ValueError(f"rope kernel needs a head dim of twice a power of two, got {d}")
    cos, sin = cos.reshape(t, -1), sin.reshape(t, -1)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(0) != cos.stride(0):
        raise ValueError("rope needs unit stride along the head dim")
    qo = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    ko = torch.empty(t, hkv, d, dtype=k.dtype, device=k.device)
    if t:
        _rope_kernel[(t,)](q, k, cos, sin, qo, ko, hq, hkv, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           cos.stride(0), qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
                           HALF=d // 2, BLOCK_H=min(triton.next_power_of_2(max(hq, hkv)), 8), num_warps=4)
    return qo, ko
