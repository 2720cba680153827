"""W4A16 matmul: y[M, N] = x[M, K] @ W[K, N] with W stored as 4-bit AWQ (AutoAWQ gemm layout).

    qweight      int32 [K, N/8]  nibble i of word [k, c] holds column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]
    scales       fp    [K/g, N]
    scaled_zeros fp    [K/g, N]  = -zero * scale
    W[k, n] = q[k, n] * scales[k // g, n] + scaled_zeros[k // g, n]

`w4a16_dequantize` writes W itself (fp16/bf16/fp32) into a buffer, for the dequantize + cuBLAS path
of long prefills. The matmul is one Triton kernel, dequantizing in registers, with two launch configurations:
  prefill (M > 16): BLOCK_M 32..128 tiles, one pass over K;
  decode (M <= 16): BLOCK_M 16 and split-K over SPLIT_K programs, partial sums [SPLIT_K, M, N]
  reduced in fp32 afterwards (deterministic, no atomics).
Accumulation is fp32; activations fp16, bf16 or fp32 (fp32 mainly for the CPU interpreter).

`w4a16_reference` is the pure-torch definition; on CPU without `TRITON_INTERPRET=1` callers
use it. Importing this module never needs CUDA.
"""

from __future__ import annotations

import torch

from .utils import dot_in_fp32, triton_available  # noqa: F401  (re-exported for callers)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    triton = None
    tl = None

SUPPORTED_GROUP_SIZES = (32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- reference --------------------------------------------------------------------------------

def nibble_shifts(n: torch.Tensor) -> torch.Tensor:
    """Bit offset of column n inside its packed int32 word (inverse of the AWQ order)."""
    r = n % 8
    return ((r // 2) + (r % 2) * 4) * 4


def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
                         group_size: int) -> torch.Tensor:
    """fp32 W [K, N]."""
    k, n8 = qweight.shape
    shifts = nibble_shifts(torch.arange(8, device=qweight.device)).to(torch.int32)
    q = ((qweight.unsqueeze(-1) >> shifts) & 0xF).view(k, n8 * 8)        # [K, N] int32, column 8c + j
    if k % group_size == 0:   # per-group broadcast, no [K, N] copies of the scales
        groups = k // group_size
        w = q.view(groups, group_size, -1).float()
        w = w * scales[:groups, None].float() + scaled_zeros[:groups, None].float()
        return w.view(k, -1)
    s = scales.float().repeat_interleave(group_size, dim=0)[:k]
    z = scaled_zeros.float().repeat_interleave(group_size, dim=0)[:k]
    return q.float() * s + z


def w4a16_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """y [M, N] in x.dtype, computed in fp32."""
    return (x.float() @ dequantize_reference(qweight, scales, scaled_zeros, group_size)).to(x.dtype)


# ---- kernel -----------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
                      M, N, K, group_size,
                      stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn,
                      stride_os, stride_om, stride_on,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_kb = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        r = offs_n % 8
        shifts = ((r // 2) + (r % 2) * 4) * 4                          # [BN] bit offset in the word
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # BLOCK_K divides the group size, so one K tile shares one row of scales/zeros
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            offs_k = k0 + offs_kb
            mask_k = offs_k < K
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)                # [BM, BK]
            words = tl.load(qw_ptr + offs_k[:, None] * stride_qk + (offs_n // 8)[None, :] * stride_qn,
                            mask=mask_k[:, None] & mask_n[None, :], other=0)              # [BK, BN] int32
            q = (words >> shifts[None, :]) & 0xF
            g = k0 // group_size
            s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
            w = (q.to(tl.float32) * s[None, :] + z[None, :]).to(a.dtype)                 # [BK, BN]
            if DOT_FP32:
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


if triton is not None:

    @triton.jit
    def _dequantize_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, K, N, group_size,
                           stride_qk, stride_sg, stride_ok,
                           BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
        r = offs_n % 8
        shifts = ((r // 2) + (r % 2) * 4) * 4
        words = tl.load(qw_ptr + offs_k[:, None] * stride_qk + (offs_n // 8)[None, :], mask=mask, other=0)
        q = ((words >> shifts[None, :]) & 0xF).to(tl.float32)
        g = offs_k // group_size
        s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :], (q * s + z).to(out_ptr.dtype.element_ty),
                 mask=mask)


def w4a16_dequantize(qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor, group_size: int,
                     out: torch.Tensor, block_k: int = 32, block_n: int = 128) -> torch.Tensor:
    """W [K, N] into `out` (its dtype: fp16, bf16 or fp32), as `dequantize_reference` computes it."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if qweight.dtype != torch.int32 or qweight.stride(1) != 1:
        raise ValueError(f"qweight must be int32 [K, N/8] contiguous along N/8, got {qweight.dtype} {tuple(qweight.stride())}")
    if tuple(out.shape) != (k, n) or out.stride(1) != 1 or out.dtype not in _DTYPES:
        raise ValueError(f"out must be [{k}, {n}] fp16/bf16/fp32 contiguous along N, got {out.dtype} {tuple(out.shape)}")
    for name, t in (("scales", scales), ("scaled_zeros", scaled_zeros)):
        if tuple(t.shape) != (k // group_size, n) or t.stride(1) != 1:
            raise ValueError(f"{name} must be [{k // group_size}, {n}] contiguous along N, got {tuple(t.shape)}")
    if scales.stride() != scaled_zeros.stride():
        raise ValueError("scales and scaled_zeros must share strides")
    if not triton_available(qweight.device):
        raise RuntimeError("the Triton kernel needs a CUDA device or TRITON_INTERPRET=1; use dequantize_reference")
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _dequantize_kernel[grid](qweight, scales, scaled_zeros, out, k, n, group_size,
                             qweight.stride(0), scales.stride(0), out.stride(0), BLOCK_K=block_k, BLOCK_N=block_n)
    return out


if triton is not None:

    @triton.jit
    def _plane(words, I: tl.constexpr):
        """1 + q_I / 16 as fp32: nibble I of each word moved under the exponent of 1.0 (bits 19..22)."""
        if I * 4 <= 19:
            moved = words << (19 - 4 * I)
        else:
            moved = words >> (4 * I - 19)
        return ((moved & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


    @triton.jit
    def _scaled(acc, c, xs, s_row, z_row, offs_w, mask_w, I: tl.constexpr):
        """acc + s * sum x q + z * sum x for plane I, whose column is 8w + AWQ_ORDER[I]."""
        col = offs_w * 8 + (I % 4) * 2 + I // 4
        s = tl.load(s_row + col, mask=mask_w, other=0.0).to(tl.float32)
        z = tl.load(z_row + col, mask=mask_w, other=0.0).to(tl.float32)
        p = tl.sum(c, axis=0)
        return acc + s * (16.0 * (p - xs)) + z * xs


    @triton.jit
    def _w4a16_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, lock_ptr,
                           N, K, groups_per_split, stride_qk, stride_sg,
                           GROUP: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        pid_w = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
        mask_w = offs_w < N // 8
        offs_kb = tl.arange(0, BLOCK_K)
        a0 = tl.zeros((BLOCK_W,), dtype=tl.float32)
        a1 = tl.zeros((BLOCK_W,), dtype=tl.float32)
        a2 = tl.zeros((BLOCK_W,), dtype=tl.float32)
        a3 = tl.zeros((BLOCK_W,), dtype=tl.float32)
        a4 = tl.zeros((BLOCK_W,), dtype=tl.float32)
        a5 = tl.zeros((BLOCK_W,), dtype=tl.float32)
        a6 = tl.zeros((BLOCK_W,), dtype=tl.float32)
        a7 = tl.zeros((BLOCK_W,), dtype=tl.float32)
        g_start = pid_k * groups_per_split
        g_end = tl.minimum(g_start + groups_per_split, K // GROUP)
        qw = qw_ptr + (g_start * GROUP + offs_kb)[:, None] * stride_qk + offs_w[None, :]
        xp = x_ptr + g_start * GROUP + offs_kb
        for g in range(g_start, g_end):
            c0 = tl.zeros((BLOCK_K, BLOCK_W), dtype=tl.float32)
            c1 = tl.zeros((BLOCK_K, BLOCK_W), dtype=tl.float32)
            c2 = tl.zeros((BLOCK_K, BLOCK_W), dtype=tl.float32)
            c3 = tl.zeros((BLOCK_K, BLOCK_W), dtype=tl.float32)
            c4 = tl.zeros((BLOCK_K, BLOCK_W), dtype=tl.float32)
            c5 = tl.zeros((BLOCK_K, BLOCK_W), dtype=tl.float32)
            c6 = tl.zeros((BLOCK_K, BLOCK_W), dtype=tl.float32)
            c7 = tl.zeros((BLOCK_K, BLOCK_W), dtype=tl.float32)
            xacc = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for _ in tl.static_range(GROUP // BLOCK_K):
                x = tl.load(xp).to(tl.float32)
                words = tl.load(qw, mask=mask_w[None, :], other=0)
                xb = x[:, None]
                c0 += xb * _plane(words, 0)
                c1 += xb * _plane(words, 1)
                c2 += xb * _plane(words, 2)
                c3 += xb * _plane(words, 3)
                c4 += xb * _plane(words, 4)
                c5 += xb * _plane(words, 5)
                c6 += xb * _plane(words, 6)
                c7 += xb * _plane(words, 7)
                xacc += x
                qw += BLOCK_K * stride_qk
                xp += BLOCK_K
            xs = tl.sum(xacc, axis=0)
            s_row = s_ptr + g * stride_sg
            z_row = z_ptr + g * stride_sg
            a0 = _scaled(a0, c0, xs, s_row, z_row, offs_w, mask_w, 0)
            a1 = _scaled(a1, c1, xs, s_row, z_row, offs_w, mask_w, 1)
            a2 = _scaled(a2, c2, xs, s_row, z_row, offs_w, mask_w, 2)
            a3 = _scaled(a3, c3, xs, s_row, z_row, offs_w, mask_w, 3)
            a4 = _scaled(a4, c4, xs, s_row, z_row, offs_w, mask_w, 4)
            a5 = _scaled(a5, c5, xs, s_row, z_row, offs_w, mask_w, 5)
            a6 = _scaled(a6, c6, xs, s_row, z_row, offs_w, mask_w, 6)
            a7 = _scaled(a7, c7, xs, s_row, z_row, offs_w, mask_w, 7)
        if SPLIT_K == 1:
            _store8(out_ptr, offs_w, mask_w, a0, a1, a2, a3, a4, a5, a6, a7)
        else:
            _store8(part_ptr + pid_k * N, offs_w, mask_w, a0, a1, a2, a3, a4, a5, a6, a7)
            tl.debug_barrier()
            count = tl.atomic_add(lock_ptr + pid_w, 1, sem="acq_rel")
            if count == SPLIT_K - 1:          # the last CTA of this column block sums the partials
                cols = offs_w[:, None] * 8 + tl.arange(0, 8)[None, :]
                m2 = mask_w[:, None] & (cols >= 0)
                total = tl.zeros((BLOCK_W, 8), dtype=tl.float32)
                for j in range(SPLIT_K):
                    total += tl.load(part_ptr + j * N + cols, mask=m2, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=m2)
                tl.atomic_xchg(lock_ptr + pid_w, 0)


    @triton.jit
    def _store8(ptr, offs_w, mask_w, a0, a1, a2, a3, a4, a5, a6, a7):
        base = ptr + offs_w * 8
        ty = ptr.dtype.element_ty
        tl.store(base + 0, a0.to(ty), mask=mask_w)
        tl.store(base + 2, a1.to(ty), mask=mask_w)
        tl.store(base + 4, a2.to(ty), mask=mask_w)
        tl.store(base + 6, a3.to(ty), mask=mask_w)
        tl.store(base + 1, a4.to(ty), mask=mask_w)
        tl.store(base + 3, a5.to(ty), mask=mask_w)
        tl.store(base + 5, a6.to(ty), mask=mask_w)
        tl.store(base + 7, a7.to(ty), mask=mask_w)


GEMV_BLOCK_W = 128         # word columns (8 outputs each) per CTA
GEMV_BLOCK_K = 8           # rows of packed words per load (sm_90: 255 registers, no spill)
_WORKSPACE: dict = {}       # device -> (partials fp32, counters int32, retired buffers); the counters return to
                            # zero at the end of every launch; a buffer outgrown is kept, since a CUDA graph
                            # captured earlier may still point at it


def gemv_config(k: int, n: int, group_size: int, sms: int = 132) -> dict:
    """Split K so that about 4 CTAs per SM stream the weight; each split is a whole number of groups."""
    grid_w = -(-(n // 8) // GEMV_BLOCK_W)
    groups = k // group_size
    split = max(1, min(groups, -(-4 * sms // grid_w)))
    per_split = -(-groups // split)
    return dict(block_w=GEMV_BLOCK_W, block_k=min(GEMV_BLOCK_K, group_size), groups_per_split=per_split,
                split_k=-(-groups // per_split))


def _workspace(device: torch.device, n_partials: int, n_counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K partials and per-column-block counters for the decode kernels (shared: launches on a stream
    run one after another)."""
    part, lock, retired = _WORKSPACE.get(device, (None, None, []))
    if part is None or part.numel() < n_partials or lock.numel() < n_counters:
        retired += [t for t in (part, lock) if t is not None]
        part = torch.empty(max(n_partials, 0 if part is None else part.numel()), dtype=torch.float32, device=device)
        lock = torch.zeros(max(n_counters, 0 if lock is None else lock.numel()), dtype=torch.int32, device=device)
        _WORKSPACE[device] = (part, lock, retired)
    return part, lock


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
               group_size: int, *, split_k: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [1, N] = x [1, K] @ W: the M = 1 decode kernel. Each packed word is loaded once; nibble i is moved
    under the exponent of an fp32 1.0 (one shift and one and-or: the float 1 + q / 16), multiplied into
    per-row accumulators, and a group's sums are scaled once (s * sum x q + z * sum x). Split-K partials
    are summed by the last CTA of each column block: one launch."""
    _check(x, qweight, scales, scaled_zeros, group_size)
    if x.shape[0] != 1:
        raise ValueError(f"w4a16_gemv takes one row, got M={x.shape[0]}")
    k, n = x.shape[1], qweight.shape[1] * 8
    if out is not None and (tuple(out.shape) != (1, n) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous [1, {n}] {x.dtype}")
    if scales.stride(0) != scaled_zeros.stride(0) or qweight.stride(0) != n // 8:
        raise ValueError("qweight must be contiguous, and scales / scaled_zeros share a row stride")
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else 132
    cfg = gemv_config(k, n, group_size, sms)
    groups = k // group_size
    if split_k is not None:
        per_split = -(-groups // split_k)
        cfg.update(groups_per_split=per_split, split_k=-(-groups // per_split))
    sk, bw = cfg["split_k"], cfg["block_w"]
    grid_w = -(-(n // 8) // bw)
    y = out if out is not None else torch.empty((1, n), dtype=x.dtype, device=x.device)
    part, lock = _workspace(x.device, sk * n if sk > 1 else 1, grid_w)
    _w4a16_gemv_kernel[(grid_w, sk)](
        x, qweight, scales, scaled_zeros, y, part, lock, n, k, cfg["groups_per_split"],
        qweight.stride(0), scales.stride(0),
        GROUP=group_size, BLOCK_W=bw, BLOCK_K=cfg["block_k"], SPLIT_K=sk)
    return y


if triton is not None:

    @triton.jit
    def _eight(a0, a1, a2, a3, a4, a5, a6, a7):
        """[R, C * 8] from eight [R, C] tensors, interleaved in the order the joins give (callers join
        the column indices the same way, so each lane knows its output column)."""
        j = tl.join(tl.join(tl.join(a0, a1), tl.join(a2, a3)), tl.join(tl.join(a4, a5), tl.join(a6, a7)))
        return tl.reshape(j, (a0.shape[0], a0.shape[1] * 8))

    @triton.jit
    def _w4a16_decode_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, group_size,
                             stride_xm, stride_qk, stride_sg, stride_om,
                             BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
                             SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr):
        pid_w = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_kb = tl.arange(0, BLOCK_K)
        c8 = (offs_w * 8)[None, :]
        cols = _eight(c8, c8 + 2, c8 + 4, c8 + 6, c8 + 1, c8 + 3, c8 + 5, c8 + 7)      # [1, BW * 8], AWQ order
        mask_c = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_W * 8), dtype=tl.float32)
        # BLOCK_K divides the group size, so one K tile shares one row of scales/zeros
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            offs_k = k0 + offs_kb
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
            words = tl.load(qw_ptr + offs_k[:, None] * stride_qk + offs_w[None, :],
                            mask=(offs_w < N // 8)[None, :], other=0)                   # [BK, BW], each once
            f = _eight(_plane(words, 0), _plane(words, 1), _plane(words, 2), _plane(words, 3),
                       _plane(words, 4), _plane(words, 5), _plane(words, 6), _plane(words, 7))   # 1 + q / 16
            g = k0 // group_size
            s = 16.0 * tl.load(s_ptr + g * stride_sg + cols, mask=mask_c, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_sg + cols, mask=mask_c, other=0.0).to(tl.float32)
            w = f * s + (z - s)                                                        # q s + z, one FMA
            if DOT_FP32:
                acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(a, w.to(a.dtype))
        mask = mask_m[:, None] & mask_c
        if SPLIT_K == 1:
            tl.store(out_ptr + offs_m[:, None] * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(part_ptr + pid_k * M * N + offs_m[:, None] * N + cols, acc, mask=mask)
            tl.debug_barrier()
            count = tl.atomic_add(lock_ptr + pid_w, 1, sem="acq_rel")
            if count == SPLIT_K - 1:          # the last CTA of this column block sums the partials
                total = tl.zeros((BLOCK_M, BLOCK_W * 8), dtype=tl.float32)
                for j in range(SPLIT_K):
                    total += tl.load(part_ptr + j * M * N + offs_m[:, None] * N + cols, mask=mask, other=0.0,
                                     cache_modifier=".cg")
                tl.store(out_ptr + offs_m[:, None] * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(lock_ptr + pid_w, 0)


DECODE_BLOCK_W = 16        # word columns (128 outputs) per CTA
DECODE_BLOCK_K = 64


def decode_config(k: int, n: int, group_size: int, sms: int = 132) -> dict:
    grid_w = -(-(n // 8) // DECODE_BLOCK_W)
    block_k = min(DECODE_BLOCK_K, group_size)
    return dict(block_w=DECODE_BLOCK_W, block_k=block_k,
                split_k=max(1, min(k // block_k, -(-4 * sms // grid_w), 16)))


def w4a16_decode(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
                 group_size: int, *, split_k: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] for 2 <= M <= 16 (batched decode): each packed word loaded once, its eight nibbles
    dequantized with one shift, one and-or and one FMA each (the fp32 1.0 trick of `w4a16_gemv`), one
    `tl.dot` per K tile, split-K summed by the last CTA of each column block (one launch)."""
    _check(x, qweight, scales, scaled_zeros, group_size)
    m, k = x.shape
    n = qweight.shape[1] * 8
    if not 1 <= m <= 16:
        raise ValueError(f"w4a16_decode takes 1 to 16 rows, got M={m}")
    if out is not None and (tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.stride(1) != 1):
        raise ValueError(f"out must be [{m}, {n}] {x.dtype}, contiguous along N")
    if scales.stride(0) != scaled_zeros.stride(0) or qweight.stride(0) != n // 8:
        raise ValueError("qweight must be contiguous, and scales / scaled_zeros share a row stride")
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else 132
    cfg = decode_config(k, n, group_size, sms)
    sk = split_k or cfg["split_k"]
    grid_w = -(-(n // 8) // cfg["block_w"])
    y = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    part, lock = _workspace(x.device, sk * m * n if sk > 1 else 1, grid_w)
    _w4a16_decode_kernel[(grid_w, sk)](
        x, qweight, scales, scaled_zeros, y, part, lock, m, n, k, group_size,
        x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        BLOCK_M=16, BLOCK_W=cfg["block_w"], BLOCK_K=cfg["block_k"], SPLIT_K=sk, DOT_FP32=dot_in_fp32(x))
    return y


def default_config(m: int, k: int, n: int, group_size: int) -> dict:
    if m <= 16:
        # decode: few rows, spread K over programs so the weight stream fills the GPU
        split = max(1, min(8, k // (group_size * 4)))
        return dict(block_m=16, block_n=64, block_k=min(128, group_size), split_k=split)
    # (BLOCK_M 128 spills on sm_90 with 4 warps: bench/kernels_sass.py)
    block_m = 32 if m <= 32 else 64
    return dict(block_m=block_m, block_n=128, block_k=min(64, group_size), split_k=1)


def _check(x, qweight, scales, scaled_zeros, group_size: int) -> None:
    """Shapes, dtypes, strides and devices the W4A16 kernels take; raises ValueError naming the problem."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of fp16, bf16, fp32")
    k = x.shape[1]
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] != k:
        raise ValueError(f"qweight must be int32 [K={k}, N/8], got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[1] * 8
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not one of {SUPPORTED_GROUP_SIZES}")
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    for name, t in (("scales", scales), ("scaled_zeros", scaled_zeros)):
        if tuple(t.shape) != (k // group_size, n):
            raise ValueError(f"{name} must be [{k // group_size}, {n}], got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")
        if t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous along N")
    if scales.stride() != scaled_zeros.stride():
        raise ValueError("scales and scaled_zeros must share strides")
    if qweight.stride(1) != 1:
        raise ValueError("qweight must be contiguous along N/8")
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous along K")
    devices = {t.device for t in (x, qweight, scales, scaled_zeros)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    if not triton_available(x.device):
        raise RuntimeError("the Triton kernel needs a CUDA device or TRITON_INTERPRET=1; use w4a16_reference")


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
                 group_size: int, *, block_m: int | None = None, block_n: int | None = None,
                 block_k: int | None = None, split_k: int | None = None, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Triton W4A16 matmul; x [M, K] -> [M, N] in x.dtype. Checks shapes, dtypes and strides."""
    _check(x, qweight, scales, scaled_zeros, group_size)
    m, k = x.shape
    n = qweight.shape[1] * 8
    cfg = default_config(m, k, n, group_size)
    bm, bn = block_m or cfg["block_m"], block_n or cfg["block_n"]
    bk, sk = block_k or cfg["block_k"], split_k or cfg["split_k"]
    if group_size % bk:
        raise ValueError(f"block_k {bk} must divide the group size {group_size}")
    if out is not None and (tuple(out.shape) != (m, n) or out.dtype != x.dtype):
        raise ValueError(f"out must be [{m}, {n}] {x.dtype}")
    if sk == 1:
        y = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
        target, stride_os = y, 0
    else:
        target = torch.empty((sk, m, n), dtype=torch.float32, device=x.device)
        stride_os = target.stride(0)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), sk)
    _w4a16_kernel[grid](
        x, qweight, scales, scaled_zeros, target, m, n, k, group_size,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        stride_os, target.stride(-2), target.stride(-1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, DOT_FP32=dot_in_fp32(x))
    if sk == 1:
        return target
    y = target.sum(0).to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y
