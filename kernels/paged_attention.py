"""Paged attention over a block-table KV cache, for decode and for prefill chunks over cached blocks.

A flat batch holds S sequences; sequence i contributes q_len_i = query_start[i+1] - query_start[i]
new query tokens, which sit at the end of its context of seq_lens[i] tokens (their keys/values are
already written into the cache). Query j of sequence i is at position seq_lens[i] - q_len_i + j and
attends causally to keys 0..that position.

    q            [T, Hq, D]
    k_cache      [num_blocks, block_size, Hkv, D]   (v_cache alike)
    block_tables [S, max_blocks] int32              physical block of each logical block
    seq_lens     [S] int32                          context length including the new tokens
    query_start  [S + 1] int32                      offsets of each sequence's queries in q
    -> out       [T, Hq, D]

`paged_attention_reference` is the torch definition, one SDPA per sequence; `paged_attention_torch`
is the CPU path: every decode row (one query) of the batch in one masked SDPA over block tables
gathered to [B, L] (in groups bounded by `DECODE_GATHER_SLOTS`), prefill rows as the reference
does them; `paged_attention` is a Triton flash-attention kernel that walks the block table with an
online softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import check_attention_shapes, dot_in_fp32

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale: float,
                              skip: torch.Tensor | None = None):
    """The definition: one SDPA per sequence (rows where `skip` [S] bool is set are left unset)."""
    out = torch.empty_like(q)
    bs = k_cache.shape[1]
    for i in range(seq_lens.shape[0]):
        q0, q1 = int(query_start[i]), int(query_start[i + 1])
        n, ctx = q1 - q0, int(seq_lens[i])
        if n == 0 or (skip is not None and bool(skip[i])):
            continue
        blocks = block_tables[i, : -(-ctx // bs)].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx]          # [ctx, Hkv, D]
        v = v_cache[blocks].flatten(0, 1)[:ctx]
        qh, kh, vh = q[q0:q1].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        qpos = torch.arange(ctx - n, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                           enable_gqa=qh.shape[0] != kh.shape[0])
        out[q0:q1] = o.transpose(0, 1)
    return out


# decode rows x context slots gathered at once by `paged_attention_torch` (bounds its memory)
DECODE_GATHER_SLOTS = 1 << 20


def paged_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale: float):
    """`paged_attention_reference`'s contract, with all decode rows batched."""
    q_lens = query_start[1:] - query_start[:-1]
    decode = (q_lens == 1).nonzero().flatten()
    out = paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens,
                                    query_start, scale, skip=q_lens == 1) if len(decode) < len(q_lens) \
        else torch.empty_like(q)
    if len(decode) == 0:
        return out
    ctx = seq_lens[decode].long()
    order = ctx.argsort()                      # similar lengths share a group's padding
    decode, ctx = decode[order], ctx[order]
    bs = k_cache.shape[1]
    lengths = ctx.tolist()
    lo = 0
    while lo < len(lengths):
        hi = lo + 1
        while hi < len(lengths) and (hi + 1 - lo) * lengths[hi] <= DECODE_GATHER_SLOTS:
            hi += 1
        rows, lens, width = decode[lo:hi], ctx[lo:hi], lengths[hi - 1]
        nblk = -(-width // bs)
        # index_select over a contiguous index: several times faster than k_cache[tables]
        blocks = block_tables.index_select(0, rows)[:, :nblk].reshape(-1).long().contiguous()
        # k/v [B, Hkv, L, D], contiguous: the CPU SDPA takes half the time over 16-bit K/V laid out so
        k = k_cache.index_select(0, blocks).view(len(rows), nblk * bs, *k_cache.shape[2:])[:, :width]
        v = v_cache.index_select(0, blocks).view(len(rows), nblk * bs, *v_cache.shape[2:])[:, :width]
        k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        mask = torch.arange(width, device=q.device)[None, :] < lens[:, None]   # [B, L]
        starts = query_start[rows].long()
        qd = q.index_select(0, starts)[:, :, None, :]                     # [B, Hq, 1, D]
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                           enable_gqa=qd.shape[1] != k.shape[1])
        out.index_copy_(0, starts, o[:, :, 0, :])
        lo = hi
    return out


if triton is not None:

    @triton.jit
    def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, seq_lens_ptr, qstart_ptr, scale,
                                stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                                stride_ot, stride_oh, stride_bt,
                                HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr,
                                BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        qb = tl.program_id(2)
        q_start = tl.load(qstart_ptr + seq)
        q_len = tl.load(qstart_ptr + seq + 1) - q_start
        if qb * BLOCK_Q < q_len:
            ctx = tl.load(seq_lens_ptr + seq)
            first_pos = ctx - q_len
            kv_head = head // GROUP
            offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
            offs_d = tl.arange(0, BLOCK_D)
            mask_q = offs_q < q_len
            mask_d = offs_d < HEAD_DIM
            q = tl.load(q_ptr + (q_start + offs_q)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                        mask=mask_q[:, None] & mask_d[None, :], other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
            m_i = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
            q_pos = first_pos + offs_q
            kv_end = tl.minimum(ctx, first_pos + (qb + 1) * BLOCK_Q)   # last key this tile may see, + 1
            offs_s = tl.arange(0, BLOCK_SIZE)
            for blk in range(0, tl.cdiv(kv_end, BLOCK_SIZE)):
                phys = tl.load(bt_ptr + seq * stride_bt + blk).to(tl.int64)
                kpos = blk * BLOCK_SIZE + offs_s
                kmask = kpos < ctx
                base = phys * stride_kb + offs_s[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :]
                k = tl.load(k_ptr + base, mask=kmask[:, None] & mask_d[None, :], other=0.0)
                v = tl.load(v_ptr + base, mask=kmask[:, None] & mask_d[None, :], other=0.0)
                if DOT_FP32:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                else:
                    s = tl.dot(q, tl.trans(k)) * scale                                 # [BQ, BS]
                visible = (kpos[None, :] <= q_pos[:, None]) & kmask[None, :]
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                if DOT_FP32:
                    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + (q_start + offs_q)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_d[None, :])


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale: float,
                    max_query_len: int | None = None, block_q: int = 16):
    """Triton paged attention (same contract as `paged_attention_reference`)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    t, hq, d = q.shape
    nb, bs, hkv, dk = k_cache.shape
    if k_cache.shape != v_cache.shape or dk != d:
        raise ValueError(f"k/v cache shapes {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError("q and the kv cache must share a dtype")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("q and the kv cache must be contiguous in the head dimension (and k/v alike)")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32 or query_start.dtype != torch.int32:
        raise ValueError("block_tables, seq_lens and query_start must be int32")
    s = seq_lens.shape[0]
    if query_start.shape[0] != s + 1 or block_tables.shape[0] != s:
        raise ValueError("query_start must have S + 1 entries and block_tables S rows")
    if q.device.type == "cuda":
        check_attention_shapes(bs, d)
    if max_query_len is None:       # a device read: callers that know it (the engine) pass it
        max_query_len = int((query_start[1:] - query_start[:-1]).max()) if s else 0
    out = torch.empty_like(q)
    if s == 0 or max_query_len == 0:
        return out
    grid = (s, hq, triton.cdiv(max_query_len, block_q))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        HEAD_DIM=d, GROUP=hq // hkv, BLOCK_Q=block_q, BLOCK_SIZE=bs, BLOCK_D=triton.next_power_of_2(d),
        DOT_FP32=dot_in_fp32(q))
    return out
