"""PyTorch's own int4 matmuls ("int4pack", tinygemm's convention) and the AWQ -> int4pack conversion.

tinygemm's convention, for a linear with K inputs, N outputs and group size g:
    q                [N, K]       4-bit values 0..15
    scales_and_zeros [K/g, N, 2]  [..., 0] = s, [..., 1] = zero
    w[k, n] = (q[n, k] - 8) * s[k // g, n] + zero[k // g, n]
AWQ's w = (q - z) * s is the same weight with zero = (8 - z) * s (exact in fp32: z is an integer).
`awq_to_int4` does that conversion once, at load; the CPU and CUDA packers share it up to the final pack.

CPU: `torch._weight_int4pack_mm_for_cpu(x [M, K], packed uint8 [N, K/2], g, scales_and_zeros)`, N % 16 == 0.
    Only bf16 activations have a vectorised kernel (fp16 and fp32 run a scalar loop, 30-70x slower here), so
    `AWQLinear` calls it for bf16 only. Its byte order depends on the instruction set PyTorch dispatches to:
    blocks of 64 columns (AVX-512) or 32 (AVX2, scalar), see `cpu_layout`. `cpu_unpack_into` reads that
    order back, which the dequantize + GEMM path for long prefills and fp32 activations needs.
CUDA: `torch._weight_int4pack_mm(x bf16 [M, K], packed, g, scales_and_zeros bf16)`, packed by
    `torch.ops.aten._convert_weight_to_int4pack(uint8 [N, K/2] (even k in the high nibble), inner_k_tiles)`
    into int32 [N/8, K/(16 inner_k_tiles), 32, inner_k_tiles/2]; needs N % 8 == 0 and K % (16 inner_k_tiles) == 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .pack import AWQ_ORDER

CPU_N_MULTIPLE = 64          # N is padded to this on CPU so every column block is a full one
CUDA_INNER_K_TILES = 8


def unpack_awq_u8(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ int32 [R, C/8] -> uint8 values 0..15, [R, C] (`pack.unpack_awq` with byte-wide ops).

    Byte j of a word (little-endian) holds nibbles 2j (low) and 2j + 1 (high); nibble i = 4a + r holds
    column AWQ_ORDER[i] = 2r + a, so the nibbles read as [a, r] give the columns read as [r, a]."""
    r, c8 = packed.shape
    b = packed.contiguous().view(torch.uint8).view(r, c8, 4)
    nib = torch.stack([b & 0xF, b >> 4], dim=-1).view(r, c8, 2, 4)        # [.., a, r]: nibble 4a + r
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    return nib.transpose(-1, -2).reshape(r, c8 * 8)


def awq_to_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                n_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ tensors (qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales [K/g, N]) ->
    (q uint8 [K, N_pad], values 0..15; scales_and_zeros fp32 [K/g, N_pad, 2]) in tinygemm's convention.
    N is padded to a multiple of `n_multiple` with zero columns (s = zero = 0)."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    n_pad = -(-n // n_multiple) * n_multiple
    q = unpack_awq_u8(qweight)
    if n_pad != n:
        q = torch.cat([q, q.new_zeros(k, n_pad - n)], dim=1)
    s = scales.float()
    z = unpack_awq_u8(qzeros).float()
    sz = torch.zeros(k // group_size, n_pad, 2, dtype=torch.float32, device=qweight.device)
    sz[:, :n, 0] = s
    sz[:, :n, 1] = (8 - z) * s
    return q, sz


def int4_reference(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 W [K, N] of tinygemm-convention tensors (q [K, N] values 0..15)."""
    k, n = q.shape
    s, zero = scales_and_zeros[..., 0].float(), scales_and_zeros[..., 1].float()          # [K/g, N]
    w = (q.float().view(k // group_size, group_size, n) - 8) * s[:, None] + zero[:, None]
    return w.reshape(k, n)


# ---- CPU -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CPULayout:
    """Where `_convert_weight_to_int4pack_for_cpu` puts column c of a block of `block` columns:
    packed viewed as [N / block, K, block / 2] bytes; byte d holds column lo[d] (low nibble) and hi[d]."""
    block: int
    lo: tuple[int, ...]
    hi: tuple[int, ...]


def _layouts() -> list[CPULayout]:
    half = lambda b: tuple(range(b // 2))  # noqa: E731
    return [CPULayout(64, half(64), tuple(32 + d for d in half(64))),          # AVX-512
            CPULayout(32, half(32), tuple(16 + d for d in half(32))),          # AVX2
            CPULayout(32, tuple(range(0, 32, 2)), tuple(range(1, 32, 2)))]    # scalar


@functools.cache
def cpu_layout() -> CPULayout:
    """The byte order this PyTorch build's CPU packer writes: the known layout that reads back two probes
    (values n % 16, and (n // 16 + k) % 16) as they were packed. Raises if none does."""
    n, k = 2 * CPU_N_MULTIPLE, 8
    cols = (torch.arange(n) % 16).to(torch.int32)[:, None].expand(n, k).contiguous()
    blocks = (torch.arange(n) // 16 + torch.arange(k)[:, None]).t().remainder(16).to(torch.int32).contiguous()
    for layout in _layouts():
        if all(torch.equal(cpu_unpack_into(torch.ops.aten._convert_weight_to_int4pack_for_cpu(p, 2), k, n, layout),
                           p.t().to(torch.uint8)) for p in (cols, blocks)):
            return layout                                      # (the unpack of each candidate is its own)
    raise RuntimeError(f"PyTorch {torch.__version__}'s CPU int4 packing ({torch.backends.cpu.get_cpu_capability()}) "
                       f"is in a byte order this version does not read")


def cpu_pack(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [K, N] (values 0..15, N % 64 == 0) -> uint8 [N, K/2], the bytes
    `torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().int(), 2)` writes, without its int32 [N, K]
    input: block c of `cpu_layout().block` columns becomes [K, block / 2] bytes, low nibble column lo[d]."""
    k, n = q.shape
    if n % CPU_N_MULTIPLE:
        raise ValueError(f"N={n} must be a multiple of {CPU_N_MULTIPLE} (pad it in awq_to_int4)")
    layout = cpu_layout()
    b = layout.block
    blocks = q.view(k, n // b, b)
    lo, hi = blocks[..., list(layout.lo)], blocks[..., list(layout.hi)]                 # [K, NB, B/2]
    return (lo | (hi << 4)).permute(1, 0, 2).contiguous().view(n, k // 2)


def cpu_unpack_into(packed: torch.Tensor, k: int, n: int, layout: CPULayout | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """CPU-packed uint8 [N, K/2] (or a [N / block, K, block / 2] view of some of its K rows) -> uint8 values
    0..15 in [K, N] order (written into `out` if given)."""
    layout = layout or cpu_layout()
    b = layout.block
    out = torch.empty(k, n, dtype=torch.uint8) if out is None else out
    src = packed if packed.dim() == 3 else packed.view(n // b, k, b // 2)           # [NB, K, B/2]
    dst = out.view(k, n // b, b).permute(1, 0, 2)                                  # [NB, K, B]
    if layout.lo == tuple(range(b // 2)) and layout.hi == tuple(range(b // 2, b)):
        torch.bitwise_and(src, 0xF, out=dst[..., : b // 2])
        torch.bitwise_right_shift(src, 4, out=dst[..., b // 2:])
    else:
        dst[..., list(layout.lo)] = src & 0xF
        dst[..., list(layout.hi)] = src >> 4
    return out


class DequantScratch:
    """Buffers one model's AWQ linears share for dequantize + GEMM: the unpacked nibbles (uint8, CPU) and the
    weight in the compute dtype, each grown to the largest linear that asked. Used by one thread at a time
    (the engine's step)."""

    def __init__(self):
        self._u8 = torch.empty(0, dtype=torch.uint8)
        self._w: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def nibbles(self, k: int, n: int) -> torch.Tensor:
        if self._u8.numel() < k * n:
            self._u8 = torch.empty(k * n, dtype=torch.uint8)
        return self._u8[: k * n].view(k, n)

    def weight(self, k: int, n: int, dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        key = (dtype, torch.device(device))
        buf = self._w.get(key)
        if buf is None or buf.numel() < k * n:
            self._w.pop(key, None)
            buf = self._w[key] = torch.empty(k * n, dtype=dtype, device=device)
        return buf[: k * n].view(k, n)

    def nbytes(self) -> int:
        return self._u8.numel() + sum(b.numel() * b.element_size() for b in self._w.values())


def cpu_dequantize(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                   scratch: DequantScratch, k0: int = 0, k1: int | None = None) -> torch.Tensor:
    """Rows k0:k1 (whole groups) of W [K, N] in scales_and_zeros' dtype, written into the scratch:
    (q - 8) s + zero per group, computed as q s + (zero - 8 s)."""
    g_all, n = scales_and_zeros.shape[:2]
    k = g_all * group_size
    k1 = k if k1 is None else k1
    g0, g1 = k0 // group_size, k1 // group_size
    layout = cpu_layout()
    rows = k1 - k0
    src = packed.view(n // layout.block, k, layout.block // 2)[:, k0:k1]
    q = cpu_unpack_into(src, rows, n, layout, out=scratch.nibbles(rows, n))
    w = scratch.weight(rows, n, scales_and_zeros.dtype)
    w.copy_(q)
    s = scales_and_zeros[g0:g1, :, 0]
    szeros = scales_and_zeros[g0:g1, :, 1] - 8 * s
    wg = w.view(g1 - g0, group_size, n)
    torch.addcmul(szeros[:, None], wg, s[:, None], out=wg)
    return w


# ---- CUDA ------------------------------------------------------------------------------------

def cuda_pack(q: torch.Tensor, inner_k_tiles: int = CUDA_INNER_K_TILES) -> torch.Tensor:
    """q uint8 [K, N] on a CUDA device -> tinygemm's int32 tiles for `torch._weight_int4pack_mm`."""
    k, n = q.shape
    if n % 8 or k % (16 * inner_k_tiles):
        raise ValueError(f"tinygemm needs N % 8 == 0 and K % {16 * inner_k_tiles} == 0, got N={n} K={k}")
    qt = q.t()
    u8 = ((qt[:, ::2] << 4) | qt[:, 1::2]).contiguous()                           # [N, K/2], even k high
    return torch.ops.aten._convert_weight_to_int4pack(u8, inner_k_tiles)
