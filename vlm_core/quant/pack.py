"""4-bit weight formats: AutoAWQ "gemm" (our internal layout) and llm-awq v2 (TinyChat).

AutoAWQ gemm, for a linear with K inputs, N outputs and group size g:
    qweight int32 [K, N/8]  nibble i (bits 4i..4i+3) of word [k, c] holds column 8c + AWQ_ORDER[i]
    qzeros  int32 [K/g, N/8] same packing, the integer zero point per group and column
    scales  fp    [K/g, N]
    w[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]

llm-awq v2 ("-v2.pt"):
    qweight      int16 [N/4, K]   4 output rows interleaved per word, k permuted in 32-blocks,
                                  laid out in 64-wide k strips (see `pack_v2`)
    scales       fp16  [G_pad, N] G_pad = K/g rounded up to a multiple of 8 (x2 for g=64, x4 for g=32)
    scaled_zeros fp16  [G_pad, N] = -z * s
    w[k, n] = q[k, n] * s[k // g, n] + scaled_zeros[k // g, n]
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # column offset held by nibble i
V2_INTERLEAVE = 4
V2_KSTRIDE = 64


def pack_awq(intweight: torch.Tensor) -> torch.Tensor:
    """int values in [0, 15], [R, C] (C % 8 == 0) -> int32 [R, C/8] in AutoAWQ nibble order.

    Byte-wide: nibble i = 4a + r of a word holds column AWQ_ORDER[i] = 2r + a, and byte j (little-endian)
    holds nibbles 2j (low) and 2j + 1 (high)."""
    r, c = intweight.shape
    if c % 8:
        raise ValueError(f"packed dimension {c} is not a multiple of 8")
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    q = (intweight & 0xF).to(torch.uint8).view(r, c // 8, 4, 2).transpose(-1, -2)   # [.., a, r] = column 2r + a
    nib = q.reshape(r, c // 8, 4, 2)                                                 # nibble pairs (2j, 2j + 1)
    return (nib[..., 0] | (nib[..., 1] << 4)).contiguous().view(torch.int32).view(r, c // 8)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] -> int32 values in [0, 15], [R, C]."""
    r, c8 = packed.shape
    words = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(r, c8, 8, dtype=torch.int32, device=packed.device)
    for i, col in enumerate(AWQ_ORDER):
        out[:, :, col] = ((words >> (4 * i)) & 0xF).to(torch.int32)
    return out.view(r, c8 * 8)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint32 values held in int64 as int32 (two's complement)."""
    return torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 weight [K, N] (input-major, i.e. the transpose of nn.Linear.weight)."""
    q = unpack_awq(qweight).float()
    z = unpack_awq(qzeros).float().repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return (q - z) * s


# ---- llm-awq v2 ---------------------------------------------------------------------------

def _v2_k_perm(device=None) -> torch.Tensor:
    """Storage order inside each 32-wide k block: position p holds k = perm[p] (0, 8, 16, 24, 1, 9, ...)."""
    idx = torch.arange(32, device=device).view(4, 4, 2).transpose(0, 1).reshape(4, 8)   # 0,1,8,9,16,17,24,25,...
    idx = idx.view(4, 4, 2).transpose(1, 2).reshape(32)                                    # each 8: 0,2,4,6,1,3,5,7
    return idx


def v2_zeros_width(in_features: int, group_size: int) -> int:
    """Rows of v2 scales/scaled_zeros, padded as llm-awq pads them."""
    groups = -(-in_features // group_size)
    width = -(-groups // 8)
    mult = {32: 4, 64: 2}.get(group_size, 1)
    return -(-width // mult) * mult * 8


def pack_v2(intweight: torch.Tensor) -> torch.Tensor:
    """int values in [0, 15], [N, K] (output-major) -> int16 [N/4, K] in the v2 layout."""
    n, k = intweight.shape
    if n % V2_INTERLEAVE or k % V2_KSTRIDE:
        raise ValueError(f"v2 packing needs N % 4 == 0 and K % 64 == 0, got N={n} K={k}")
    q = intweight.to(torch.int32).view(n, k // 32, 32)[:, :, _v2_k_perm(intweight.device)].reshape(n, k)
    # [N/4, 4, K/64, 64] -> [N/4, K/64, 4, 64] -> read as [N/4, K/64, 64, 4]: 4 consecutive values per word
    q = q.view(n // 4, 4, k // 64, 64).transpose(1, 2).reshape(n // 4, k // 64, 64, 4)
    words = q[..., 0] | (q[..., 1] << 4) | (q[..., 2] << 8) | (q[..., 3] << 12)
    words = torch.where(words >= 2 ** 15, words - 2 ** 16, words)
    return words.reshape(n // 4, k).to(torch.int16)


def unpack_v2(qweight: torch.Tensor) -> torch.Tensor:
    """int16 [N/4, K] -> int32 values [N, K] (inverse of `pack_v2`)."""
    n4, k = qweight.shape
    words = qweight.to(torch.int32) & 0xFFFF
    q = torch.stack([(words >> (4 * i)) & 0xF for i in range(4)], dim=-1)            # [N/4, K, 4]
    q = q.view(n4, k // 64, 4, 64).transpose(1, 2).reshape(n4 * 4, k // 32, 32)       # undo the strip layout
    out = torch.empty_like(q)
    out[:, :, _v2_k_perm(qweight.device)] = q
    return out.reshape(n4 * 4, k)


def v2_to_awq(qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor, group_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llm-awq v2 tensors -> AutoAWQ (qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales [K/g, N])."""
    if qweight.dtype != torch.int16:
        raise CheckpointError(f"v2 qweight must be int16, got {qweight.dtype}")
    n, k = qweight.shape[0] * 4, qweight.shape[1]
    groups = k // group_size
    if k % group_size or scales.shape[1] != n or scales.shape[0] < groups or scaled_zeros.shape != scales.shape:
        raise CheckpointError(f"v2 tensors do not fit: qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}, "
                              f"scaled_zeros {tuple(scaled_zeros.shape)}, group size {group_size}")
    s = scales[:groups]
    z = torch.round(-scaled_zeros[:groups].float() / torch.where(s == 0, torch.ones_like(s), s).float())
    if (z < 0).any() or (z > 15).any():
        raise CheckpointError("v2 scaled_zeros do not correspond to 4-bit zero points")
    intweight = unpack_v2(qweight).t().contiguous()                                   # [K, N]
    return pack_awq(intweight), pack_awq(z.to(torch.int32)), s.contiguous()


def awq_to_v2(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ tensors -> llm-awq v2 (qweight int16 [N/4, K], scales and scaled_zeros fp16 padded
    to `v2_zeros_width` rows); the inverse of `v2_to_awq`."""
    q = unpack_awq(qweight)                                   # [K, N]
    k, n = q.shape
    z = unpack_awq(qzeros).float()                            # [K/g, N]
    rows = v2_zeros_width(k, group_size)
    s_pad = torch.zeros(rows, n, dtype=torch.float16)
    sz_pad = torch.zeros(rows, n, dtype=torch.float16)
    s_pad[: scales.shape[0]] = scales.to(torch.float16)
    sz_pad[: scales.shape[0]] = -(scales.float() * z).half()
    return pack_v2(q.t().contiguous()), s_pad, sz_pad
