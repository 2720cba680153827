"""The Triton W4A16 kernel against its torch reference (TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch

from kernels import w4a16
from kernels.w4a16 import dequantize_reference, w4a16_matmul, w4a16_reference


def random_awq(k, n, g, dtype=torch.float32, gen=None):
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k, n // 8), dtype=torch.int32, generator=gen)
    scales = (torch.rand(k // g, n, generator=gen) * 0.05 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (k // g, n), generator=gen).float()
    scaled_zeros = (-zeros * scales.float()).to(dtype)
    return qweight, scales, scaled_zeros


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every buffer the launcher allocates starts as NaN, so unwritten outputs cannot pass."""
    real_empty = torch.empty

    def empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.interpreter
@pytest.mark.parametrize("m", [1, 3, 16, 33, 128])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("k,n", [(384, 200), (256, 328), (640, 96)])
def test_kernel_matches_reference_fp32(poisoned_empty, m, g, k, n):
    gen = torch.Generator().manual_seed(hash((m, g, k, n)) % 2 ** 31)
    x = torch.randn(m, k, generator=gen)
    qw, s, z = random_awq(k, n, g, gen=gen)
    out = torch.full((m, n), float("nan"))
    y = w4a16_matmul(x, qw, s, z, g, out=out)
    ref = w4a16_reference(x, qw, s, z, g)
    assert torch.isfinite(y).all()
    assert ((y - ref).norm() / ref.norm()).item() <= 1e-3
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-3


@pytest.mark.interpreter
@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("block_k", [32, 64])
def test_split_k_and_block_k_variants(poisoned_empty, split_k, block_k):
    x = torch.randn(5, 512)
    qw, s, z = random_awq(512, 136, 64)
    y = w4a16_matmul(x, qw, s, z, 64, block_m=16, block_n=32, block_k=block_k, split_k=split_k)
    ref = w4a16_reference(x, qw, s, z, 64)
    assert ((y - ref).norm() / ref.norm()).item() <= 1e-3


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("m", [1, 33])
def test_half_activations_fp32_accumulate(dtype, tol, m):
    x = torch.randn(m, 256).to(dtype)
    qw, s, z = random_awq(256, 96, 64, dtype)
    y = w4a16_matmul(x, qw, s, z, 64)
    assert y.dtype == dtype
    ref = (x.float() @ dequantize_reference(qw, s, z, 64))
    assert ((y.float() - ref).norm() / ref.norm()).item() <= tol


@pytest.mark.interpreter
def test_strided_activation_rows():
    base = torch.randn(7, 384)
    x = base[::2, :256]  # row stride 768, K contiguous
    qw, s, z = random_awq(256, 64, 128)
    assert x.stride() == (768, 1)
    ref = w4a16_reference(x.contiguous(), qw, s, z, 128)
    assert ((w4a16_matmul(x, qw, s, z, 128) - ref).norm() / ref.norm()).item() <= 1e-3


@pytest.mark.parametrize("case,msg", [
    ("x3d", "x must be 2-D"),
    ("qw_dtype", "qweight must be int32"),
    ("k_mismatch", "qweight must be int32 \\[K=256"),
    ("group", "group size 48 is not one of"),
    ("scales_shape", "scales must be \\[4, 64\\]"),
    ("scales_dtype", "scales dtype torch.float16 differs"),
    ("x_stride", "x must be contiguous along K"),
    ("block_k", "block_k 64 must divide the group size 32"),
])
def test_launcher_rejects_bad_arguments(case, msg):
    x = torch.randn(4, 256)
    qw, s, z = random_awq(256, 64, 64)
    g, kw = 64, {}
    if case == "x3d":
        x = x[None]
    elif case == "qw_dtype":
        qw = qw.to(torch.int64)
    elif case == "k_mismatch":
        qw = qw[:128]
    elif case == "group":
        g = 48
    elif case == "scales_shape":
        s = s[:, :32]
    elif case == "scales_dtype":
        s = s.half()
    elif case == "x_stride":
        x = torch.randn(256, 4).t()
    elif case == "block_k":
        qw, s, z = random_awq(256, 64, 32)
        g, kw = 32, {"block_k": 64}
    with pytest.raises(ValueError, match=msg):
        w4a16_matmul(x, qw, s, z, g, **kw)


def test_reference_dequantizes_known_words():
    # word 0x75316420 holds columns 0..7 = 0..7 in AWQ nibble order
    qw = torch.tensor([[0x75316420]], dtype=torch.int32).repeat(32, 1)
    s = torch.full((1, 8), 0.5)
    z = torch.full((1, 8), -1.0)
    w = dequantize_reference(qw, s, z, 32)
    assert torch.equal(w[0], torch.arange(8) * 0.5 - 1.0)


def test_module_imports_without_cuda():
    assert w4a16.triton_available(torch.device("cpu")) in (True, False)
    assert w4a16.default_config(1, 4096, 4096, 128)["split_k"] == 8
    assert w4a16.default_config(1024, 4096, 4096, 128)["split_k"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 8, 64, 1024])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
def test_kernel_real_shapes_on_gpu(dtype, m, k, n):
    gen = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    qw, s, z = (t.cuda() for t in random_awq(k, n, 128, dtype, gen))
    y = w4a16_matmul(x, qw, s, z, 128)
    ref = x.float() @ dequantize_reference(qw, s, z, 128)
    assert ((y.float() - ref).norm() / ref.norm()).item() <= (5e-3 if dtype == torch.float16 else 2e-2)
    for kernel, fits in ((w4a16.w4a16_gemv, m == 1), (w4a16.w4a16_decode, m <= 16)):
        if fits:
            y1 = kernel(x, qw, s, z, 128)
            assert ((y1.float() - ref).norm() / ref.norm()).item() <= (5e-3 if dtype == torch.float16 else 2e-2)


# ---- the decode kernels: w4a16_gemv (M = 1) and w4a16_decode (2 <= M <= 16) -------------------------

DECODE_CASES = [("w4a16_gemv", 1, 384, 200, s) for s in (None, 1, 2, 3)] + \
    [("w4a16_gemv", 1, 256, 1032, None), ("w4a16_gemv", 1, 640, 96, 2)] + \
    [("w4a16_decode", m, k, n, s) for m, k, n in ((2, 384, 200), (7, 256, 1032), (16, 640, 96))
     for s in (None, 1, 3)]


@pytest.mark.interpreter
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("kernel,m,k,n,split_k", DECODE_CASES)
def test_decode_kernels_match_reference(poisoned_empty, kernel, m, k, n, split_k, g):
    """Every output written (NaN-poisoned buffers), N an odd multiple of 8 where it is, split-K summed by
    the last CTA; twice in a row (the counters are back at zero after each launch)."""
    gen = torch.Generator().manual_seed(hash((kernel, split_k, g, m, k, n)) % 2 ** 31)
    x = torch.randn(m, k, generator=gen)
    qw, s, z = random_awq(k, n, g, gen=gen)
    ref = w4a16_reference(x, qw, s, z, g)
    for _ in range(2):
        y = getattr(w4a16, kernel)(x, qw, s, z, g, split_k=split_k)
        assert torch.isfinite(y).all()
        assert ((y - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.mark.interpreter
@pytest.mark.parametrize("kernel,m", [("w4a16_gemv", 1), ("w4a16_decode", 5)])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_decode_kernels_half_activations(kernel, m, dtype, tol):
    x = torch.randn(m, 512).to(dtype)
    qw, s, z = random_awq(512, 136, 128, dtype)
    y = getattr(w4a16, kernel)(x, qw, s, z, 128)
    assert y.dtype == dtype
    ref = x.float() @ dequantize_reference(qw, s, z, 128)
    assert ((y.float() - ref).norm() / ref.norm()).item() <= tol


def test_gemv_takes_one_row_and_splits_whole_groups():
    qw, s, z = random_awq(256, 64, 64)
    with pytest.raises(ValueError, match="one row"):
        w4a16.w4a16_gemv(torch.randn(2, 256), qw, s, z, 64)
    cfg = w4a16.gemv_config(4096, 11008, 128)
    assert cfg["groups_per_split"] * cfg["split_k"] >= 4096 // 128 > (cfg["split_k"] - 1) * cfg["groups_per_split"]


def test_decode_kernel_takes_up_to_16_rows():
    qw, s, z = random_awq(256, 64, 64)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        w4a16.w4a16_decode(torch.randn(17, 256), qw, s, z, 64)
