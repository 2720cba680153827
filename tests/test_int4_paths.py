"""The W4A16 paths of `AWQLinear` against the reference dequantized matmul: PyTorch's int4 layout and the
shared AWQ -> int4pack conversion, the CPU int4 matmul and dequantize + GEMM paths, the path table, and (on
a GPU) tinygemm and Triton dequantize + cuBLAS."""

import pytest
import torch

from kernels.w4a16 import dequantize_reference, w4a16_dequantize
from vlm_core.quant import int4pack
from vlm_core.quant.awq_linear import AWQLinear, awq_linear_factory
from vlm_core.quant.pack import awq_to_v2, pack_awq, unpack_awq, v2_to_awq
from vlm_core.quant.paths import DEFAULT, PathTable, Rule
from vlm_core.config import AWQConfig

CPU = torch.device("cpu")
MS = (1, 2, 7, 16, 33, 64, 128, 129, 300)


def awq_tensors(k, n, g, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), dtype=torch.int32, generator=gen)
    z = torch.randint(0, 16, (k // g, n), dtype=torch.int32, generator=gen)
    s = (torch.rand(k // g, n, generator=gen) * 0.05 + 0.005).to(dtype)
    return pack_awq(q), pack_awq(z), s


def make_linear(k, n, g, seed, dtype=torch.float32, bias=True, table=None):
    qw, qz, s = awq_tensors(k, n, g, seed, dtype)
    lin = AWQLinear(k, n, bias, g, table=table)
    lin.qweight, lin.qzeros, lin.scales = qw, qz, s
    if bias:
        lin.bias = (torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)) * 0.1).to(dtype)
    lin.post_load()
    return lin


def reference(lin, x):
    """fp64 x @ W + b with W dequantized from the AutoAWQ tensors (scales as the module holds them)."""
    w = dequantize_reference(lin.qweight, lin.scales.float(), lin.scaled_zeros.float(), lin.group_size).double()
    y = x.double() @ w
    return y + lin.bias.double() if lin.bias is not None else y


def rel(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


# ---- the layout and the conversion --------------------------------------------------------------

@pytest.mark.parametrize("k,n", [(128, 64), (256, 200), (64, 136)])
def test_byte_wide_awq_unpack_equals_unpack_awq(k, n):
    qw, _, _ = awq_tensors(k, n, 32, k + n)
    assert torch.equal(int4pack.unpack_awq_u8(qw).to(torch.int32), unpack_awq(qw))


@pytest.mark.parametrize("n", [64, 128, 320])
@pytest.mark.parametrize("k", [32, 96, 256])
def test_cpu_pack_is_pytorchs_packing_and_reads_back(k, n):
    q = torch.randint(0, 16, (k, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(n * k))
    packed = int4pack.cpu_pack(q)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (n, k // 2)
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().to(torch.int32).contiguous(), 2))
    assert torch.equal(int4pack.cpu_unpack_into(packed, k, n), q)


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("n", [200, 136, 64])
def test_conversion_is_the_same_weight(g, n):
    """Integers bit-exact (q, and zero = (8 - z) s with an exact 8 - z); W within fp32 rounding of
    `dequantize_reference` ((q - 8) s + (8 - z) s against q s - z s: a few ulp)."""
    k = 256
    qw, qz, s = awq_tensors(k, n, g, g + n)
    q, sz = int4pack.awq_to_int4(qw, qz, s, g, int4pack.CPU_N_MULTIPLE)
    assert q.shape == (k, -(-n // 64) * 64) and sz.shape == (k // g, q.shape[1], 2)
    assert torch.equal(q[:, :n].to(torch.int32), unpack_awq(qw)) and (q[:, n:] == 0).all() and (sz[:, n:] == 0).all()
    z = unpack_awq(qz).float()
    assert torch.equal(sz[:, :n, 0], s) and torch.equal(sz[:, :n, 1], (8 - z) * s)
    w = int4pack.int4_reference(q, sz, g)[:, :n]
    ref = dequantize_reference(qw, s, -z * s, g)
    assert (w - ref).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * ref.abs().max().item()


def test_cpu_layout_is_a_known_one():
    layout = int4pack.cpu_layout()
    assert layout.block in (32, 64) and sorted(layout.lo + layout.hi) == list(range(layout.block))


# ---- AWQLinear on CPU -----------------------------------------------------------------------------

@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("k,n", [(256, 200), (512, 136)])
def test_fp32_load_is_precise_on_every_m(g, k, n):
    lin = make_linear(k, n, g, seed=k + n + g)
    for m in MS:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        assert lin.path(m, torch.float32, CPU) == "cpu-dequant"
        y = lin(x)
        assert y.dtype == torch.float32 and rel(y, reference(lin, x)) <= 2e-6


@pytest.mark.parametrize("g", [64, 128])
def test_fp16_load_within_2e3_of_the_fp32_reference(g):
    k, n = 512, 200
    lin = make_linear(k, n, g, seed=g, dtype=torch.float16)
    for m in MS:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
        y = lin(x)
        assert y.dtype == torch.float16 and rel(y, reference(lin, x)) <= 2e-3


@pytest.mark.parametrize("path", ["cpu-int4mm", "cpu-dequant"])
@pytest.mark.parametrize("g", [64, 128])
def test_bf16_paths_on_every_m(path, g):
    """bf16 loads: each path forced for every M, within bf16's rounding of x, the weight and y."""
    k, n = 256, 136
    lin = make_linear(k, n, g, seed=g, dtype=torch.bfloat16, table=PathTable((Rule("cpu", path, dtype="bfloat16"
                                                                                     if path == "cpu-int4mm" else None),)))
    for m in MS:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
        assert lin.path(m, torch.bfloat16, CPU) == path
        y = lin(x)
        assert y.dtype == torch.bfloat16 and rel(y, reference(lin, x)) <= 1.5e-2


def test_default_table_splits_bf16_at_the_measured_crossover():
    lin = make_linear(256, 64, 64, seed=3, dtype=torch.bfloat16)
    lin.prepare()
    assert [lin.path(m, torch.bfloat16, CPU) for m in (1, 128, 129, 600)] == ["cpu-int4mm"] * 2 + ["cpu-dequant"] * 2


@pytest.mark.parametrize("g", [64, 128])
def test_llm_awq_v2_tensors_take_the_same_paths(g):
    k, n = 256, 136
    lin = make_linear(k, n, g, seed=11)
    qw, s, sz = awq_to_v2(lin.qweight, lin.qzeros, lin.scales, g)
    twin = AWQLinear(k, n, True, g)
    twin.qweight, twin.qzeros, twin.scales = v2_to_awq(qw, s.float(), sz.float(), g)
    twin.bias = lin.bias
    twin.post_load()
    x = torch.randn(5, k)
    assert rel(twin(x), reference(lin, x)) <= 2e-3       # v2 keeps fp16 scales


def test_no_dense_copy_and_qweight_stays_readable():
    k, n, g = 512, 256, 128
    lin = make_linear(k, n, g, seed=5)
    qweight, qzeros, scales, scaled_zeros = (t.clone() for t in (lin.qweight, lin.qzeros, lin.scales, lin.scaled_zeros))
    lin(torch.randn(3, k))
    held = [t for t in list(lin._buffers.values()) + list(vars(lin._cpu).values()) if isinstance(t, torch.Tensor)]
    assert not {"qweight", "scales", "scaled_zeros"} & set(lin._buffers)
    assert max(t.numel() for t in held) < k * n            # nothing of the weight's full size beside the 4-bit bytes
    assert lin._cpu.packed.numel() == k * n // 2
    assert torch.equal(lin.qweight, qweight) and torch.equal(lin.state_dict()["qweight"], qweight)
    assert torch.equal(lin.state_dict()["qzeros"], qzeros) and torch.equal(lin.state_dict()["scales"], scales)
    assert torch.equal(lin.scaled_zeros, scaled_zeros)
    moved = lin.to(torch.float64)                          # casting returns to the AutoAWQ form first
    assert "qweight" in moved._buffers and torch.equal(moved.qweight, qweight)


def test_one_scratch_per_model_grown_to_its_largest_linear():
    make = awq_linear_factory(AWQConfig(group_size=64))
    a, b = make(128, 64, False, "mlp.up_proj"), make(256, 128, False, "mlp.down_proj")
    assert a.scratch is b.scratch
    for lin, seed in ((a, 1), (b, 2)):
        src = make_linear(lin.in_features, lin.out_features, 64, seed, bias=False)
        lin.qweight, lin.qzeros, lin.scales = src.qweight, src.qzeros, src.scales
        lin.post_load()
        x = torch.randn(2, lin.in_features)
        assert rel(lin(x), reference(src, x)) <= 2e-6
    assert a.scratch.nbytes() == 256 * 128 * (1 + 4)      # nibbles + one fp32 weight, of the largest linear
    fused = AWQLinear.concat([a, a])
    assert fused.scratch is a.scratch


def test_long_linears_dequantize_in_chunks_of_whole_groups(monkeypatch):
    """A weight larger than the chunk is dequantized a few groups of rows at a time (bounded scratch),
    the partial products summed in fp32: the same result."""
    import vlm_core.quant.awq_linear as al

    k, n, g = 512, 128, 64
    whole = make_linear(k, n, g, seed=21)
    chunked = make_linear(k, n, g, seed=21)
    monkeypatch.setattr(al, "DEQUANT_CHUNK", 3 * g * n)          # 3 groups of rows (not a divisor of 8)
    x = torch.randn(20, k, generator=torch.Generator().manual_seed(4))
    y = chunked(x)
    assert chunked.scratch.nbytes() == 3 * g * n * (1 + 4)
    assert rel(y, reference(whole, x)) <= 2e-6


# ---- the path table -----------------------------------------------------------------------------

def test_path_rules_refuse_what_a_path_cannot_do():
    with pytest.raises(ValueError, match="bf16 activations only"):
        Rule("cuda", "tinygemm", dtype="float16")
    with pytest.raises(ValueError, match="does not run on cuda"):
        Rule("cuda", "cpu-int4mm", dtype="bfloat16")
    with pytest.raises(ValueError, match="unknown W4A16 path"):
        Rule("cpu", "fast")


def test_shape_rules_come_before_general_ones_and_default_fills_in():
    t = PathTable.from_json([{"device": "cuda", "max_m": 16, "path": "triton"},
                             {"device": "cuda", "max_m": 16, "path": "tinygemm", "dtype": "bfloat16",
                              "k": 4096, "n": 11008}])
    assert t.choose("cuda", torch.bfloat16, 8, 4096, 11008) == "tinygemm"
    assert t.choose("cuda", torch.float16, 8, 4096, 11008) == "triton"
    assert t.choose("cuda", torch.bfloat16, 8, 4096, 4096) == "triton"
    assert t.choose("cuda", torch.float16, 4096, 4096, 4096) == "cuda-dequant"      # from DEFAULT
    assert DEFAULT.choose("cpu", torch.float32, 1, 64, 64) == "cpu-dequant"


# ---- kernels: Triton dequantize (interpreter on CPU), tinygemm and cuBLAS on a GPU -----------------

@pytest.mark.interpreter
@pytest.mark.parametrize("g", [32, 128])
def test_triton_dequantize_equals_reference(g):
    k, n = 256, 200
    qw, qz, s = awq_tensors(k, n, g, seed=g)
    z = -unpack_awq(qz).float() * s
    out = torch.full((k, n), float("nan"))
    w4a16_dequantize(qw, s, z, g, out=out)
    assert torch.equal(out, dequantize_reference(qw, s, z, g))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["triton", "tinygemm", "cuda-dequant"])
@pytest.mark.parametrize("m", [1, 8, 16, 64, 256, 300])
@pytest.mark.parametrize("k,n,g", [(4096, 11008, 128), (11008, 4096, 128), (1024, 1032, 64)])
def test_cuda_paths_equal_reference(path, m, k, n, g):
    dtype = torch.bfloat16                     # every K here is a multiple of 128, which tinygemm needs
    lin = make_linear(k, n, g, seed=m + k, dtype=dtype,
                      table=PathTable((Rule("cuda", path, dtype="bfloat16" if path == "tinygemm" else None),))).cuda()
    lin.post_load()
    lin.prepare()
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    assert lin.path(m, dtype, x.device) == path
    y = lin(x)
    ref = reference(lin, x)
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.parametrize("ns", [(128, 64, 64), (64, 200)])
def test_fusing_prepared_linears_equals_fusing_the_autoawq_tensors(ns):
    """Column blocks of the CPU form concatenate (N % 64 == 0 each); other widths go back through the
    AutoAWQ tensors. Either way the fused linear computes the parts side by side."""
    k, g = 256, 64
    parts = [make_linear(k, n, g, seed=30 + i) for i, n in enumerate(ns)]
    twins = [make_linear(k, n, g, seed=30 + i) for i, n in enumerate(ns)]
    for p in parts:
        p.prepare()
    fused, ref = AWQLinear.concat(parts), AWQLinear.concat(twins)
    assert (fused._cpu is not None) == all(n % 64 == 0 for n in ns)
    x = torch.randn(3, k)
    assert torch.equal(fused(x), ref(x))
    assert torch.equal(fused.qweight, ref.qweight) and torch.equal(fused.scales, ref.scales)
