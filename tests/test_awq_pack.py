"""AutoAWQ and llm-awq v2 packing: hand-built vectors and round trips."""

import pytest
import torch

from kernels.w4a16 import dequantize_reference
from vlm_core.quant.pack import (awq_to_v2, dequantize_awq, pack_awq, pack_v2, unpack_awq, unpack_v2, v2_to_awq,
                                 v2_zeros_width)


def test_awq_pack_known_words():
    rows = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7],
                         [15, 14, 13, 12, 11, 10, 9, 8],
                         [1, 0, 0, 0, 0, 0, 0, 15]])
    # nibble i (from the low end) holds column [0, 2, 4, 6, 1, 3, 5, 7][i]
    expected = [0x75316420, 0x8ACE9BDF - 2 ** 32, 0xF0000001 - 2 ** 32]
    assert pack_awq(rows).view(-1).tolist() == expected
    assert torch.equal(unpack_awq(pack_awq(rows)), rows.to(torch.int32))


def test_awq_roundtrip_and_two_dequantizers_agree():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 48), generator=gen)
    z = torch.randint(0, 16, (2, 48), generator=gen)
    s = torch.rand(2, 48, generator=gen)
    qw, qz = pack_awq(q), pack_awq(z)
    assert qw.shape == (64, 6) and qw.dtype == torch.int32
    assert torch.equal(unpack_awq(qw), q.to(torch.int32))
    w = dequantize_awq(qw, qz, s, 32)
    assert torch.allclose(w, (q - z.repeat_interleave(32, 0)).float() * s.repeat_interleave(32, 0))
    assert torch.allclose(dequantize_reference(qw, s, -z.float() * s, 32), w, atol=1e-6)


def _v2_expected(intweight):
    """The v2 word layout written out index by index (independent of pack_v2's reshapes).

    Word [r4, 64*b + j] packs 4 nibbles; nibble l is element i = 4j + l of the 4x64 tile made of
    output rows 4*r4..4*r4+3 and k strip b: tile row i // 64, tile column c = i % 64. Inside each
    32-wide half of the strip, stored position p holds k = 2*(p//8) + (p%8 >= 4) + 8*(p%4).
    """
    n, k = intweight.shape
    words = torch.zeros(n // 4, k, dtype=torch.int64)
    for r4 in range(n // 4):
        for b in range(k // 64):
            for j in range(64):
                word = 0
                for l in range(4):
                    i = 4 * j + l
                    row, c = i // 64, i % 64
                    p = c % 32
                    kk = 64 * b + (c // 32) * 32 + 2 * (p // 8) + (1 if p % 8 >= 4 else 0) + 8 * (p % 4)
                    word |= int(intweight[4 * r4 + row, kk]) << (4 * l)
                words[r4, 64 * b + j] = word - 2 ** 16 if word >= 2 ** 15 else word
    return words.to(torch.int16)


def test_v2_pack_known_words():
    n, k = 8, 128
    intweight = (torch.arange(n)[:, None] * 7 + torch.arange(k)[None, :] * 3) % 16
    packed = pack_v2(intweight)
    assert packed.shape == (2, 128) and packed.dtype == torch.int16
    assert torch.equal(packed, _v2_expected(intweight))
    # first word: tile elements 0..3 are row 0, stored positions 0..3 -> k = 0, 8, 16, 24
    assert int(packed[0, 0]) & 0xFFFF == sum(int(intweight[0, kk]) << (4 * l) for l, kk in enumerate([0, 8, 16, 24]))


def test_v2_roundtrip_and_conversion_to_awq():
    gen = torch.Generator().manual_seed(1)
    n, k, g = 24, 256, 64
    q = torch.randint(0, 16, (n, k), generator=gen)
    assert torch.equal(unpack_v2(pack_v2(q)), q.to(torch.int32))
    z = torch.randint(0, 16, (k // g, n), generator=gen)
    s = (torch.rand(k // g, n, generator=gen) * 0.1 + 0.01).half()
    rows = v2_zeros_width(k, g)
    assert rows == 16  # 4 groups -> 1 word of 8 -> x2 for g=64 -> 2 * 8
    s_pad = torch.zeros(rows, n, dtype=torch.float16)
    s_pad[: k // g] = s
    sz_pad = torch.zeros(rows, n, dtype=torch.float16)
    sz_pad[: k // g] = -(s.float() * z.float()).half()
    qw, qz, scales = v2_to_awq(pack_v2(q), s_pad, sz_pad, g)
    assert torch.equal(unpack_awq(qw), q.t().to(torch.int32))
    assert torch.equal(unpack_awq(qz), z.to(torch.int32))
    # v2's definition w = q*s + scaled_zero equals AutoAWQ's (q - z)*s after conversion
    v2_w = q.t().float() * s.float().repeat_interleave(g, 0) + sz_pad[: k // g].float().repeat_interleave(g, 0)
    assert torch.allclose(dequantize_awq(qw, qz, scales, g), v2_w, atol=1e-3)
    # and back: AutoAWQ -> v2 gives the tensors built by hand above
    back = awq_to_v2(qw, qz, scales, g)
    for got, want in zip(back, (pack_v2(q), s_pad, sz_pad)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("k,g,rows", [(4096, 128, 32), (11008, 128, 88), (4096, 64, 64), (4096, 32, 128)])
def test_v2_zero_padding_matches_llm_awq_sizes(k, g, rows):
    assert v2_zeros_width(k, g) == rows
