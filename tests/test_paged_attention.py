"""Triton paged attention against the torch reference (TRITON_INTERPRET=1 on CPU), and the
reference against plain causal attention over contiguous keys."""

import pytest
import torch

import kernels.paged_attention as pa
from kernels.paged_attention import paged_attention, paged_attention_reference, paged_attention_torch
from vlm_core.models.attention import causal_attention


def make_case(q_lens, ctx_lens, hq=4, hkv=2, d=16, bs=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // bs) for c in ctx_lens) + 3
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)  # blocks scattered through the cache
    tables, used = [], 0
    for c in ctx_lens:
        nb = -(-c // bs)
        tables.append(perm[used:used + nb].tolist())
        used += nb
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(dtype)
    qs = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    return q, k_cache, v_cache, block_tables, torch.tensor(ctx_lens, dtype=torch.int32), qs


@pytest.mark.parametrize("q_lens,ctx_lens", [
    ([1, 1, 1], [1, 17, 40]),            # decode
    ([5, 16, 33], [5, 30, 33]),          # prefill chunks over cached blocks, and a fresh prompt
    ([1, 7, 20, 1], [64, 7, 50, 16]),    # mixed decode + prefill
])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_batched_torch_path_matches_reference(q_lens, ctx_lens, hq, hkv, monkeypatch):
    args = make_case(q_lens, ctx_lens, hq, hkv)
    ref = paged_attention_reference(*args, scale=0.25)
    assert (paged_attention_torch(*args, scale=0.25) - ref).abs().max().item() <= 1e-5
    monkeypatch.setattr(pa, "DECODE_GATHER_SLOTS", 40)     # decode rows split into several gathers
    assert (paged_attention_torch(*args, scale=0.25) - ref).abs().max().item() <= 1e-5


def test_batched_torch_path_with_many_decode_rows_of_mixed_lengths():
    ctx = [1 + (i * 37) % 300 for i in range(64)]
    args = make_case([1] * 64, ctx, 8, 2, d=32)
    ref = paged_attention_reference(*args, scale=0.2)
    assert (paged_attention_torch(*args, scale=0.2) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("q_lens,ctx_lens", [
    ([1, 1, 1], [1, 17, 40]),            # decode
    ([5, 16, 33], [5, 30, 33]),          # prefill chunks over cached blocks, and a fresh prompt
    ([1, 7, 20, 1], [64, 7, 50, 16]),    # mixed decode + prefill
])
@pytest.mark.interpreter
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_triton_matches_reference(q_lens, ctx_lens, hq, hkv):
    args = make_case(q_lens, ctx_lens, hq, hkv)
    out = paged_attention(*args, scale=0.25)
    ref = paged_attention_reference(*args, scale=0.25)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_triton_half_precision(dtype, tol):
    args = make_case([1, 9], [23, 40], dtype=dtype, seed=3)
    out = paged_attention(*args, scale=0.25).float()
    ref = paged_attention_reference(*(a.float() if a.is_floating_point() else a for a in args), scale=0.25)
    assert (out - ref).abs().max().item() <= tol


@pytest.mark.interpreter
def test_head_dim_not_power_of_two():
    args = make_case([3, 1], [20, 33], d=24)
    assert (paged_attention(*args, scale=0.2) - paged_attention_reference(*args, scale=0.2)).abs().max() <= 1e-5


def test_reference_equals_contiguous_causal_attention():
    q, kc, vc, bt, lens, qs = make_case([6], [22])
    k = kc[bt[0, :2].long()].flatten(0, 1)[:22]
    v = vc[bt[0, :2].long()].flatten(0, 1)[:22]
    expected = causal_attention(q, k, v, 0.25, q_offset=16)
    assert torch.allclose(paged_attention_reference(q, kc, vc, bt, lens, qs, 0.25), expected, atol=1e-6)


def test_rejects_bad_index_dtypes():
    q, kc, vc, bt, lens, qs = make_case([1], [5])
    with pytest.raises(ValueError, match="must be int32"):
        paged_attention(q, kc, vc, bt.long(), lens, qs, 0.25)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8)])
def test_triton_matches_reference_on_gpu(dtype, tol, hq, hkv):
    """Real head sizes on the device: decode rows at VLM-request contexts, and prefill chunks over cached blocks."""
    args = make_case([1, 1, 1, 64, 300], [700, 4096, 1, 700, 300], hq, hkv, d=128, bs=16,
                     dtype=dtype, seed=7)
    args = tuple(a.cuda() for a in args)
    qs = args[-1].cpu()
    out = paged_attention(*args, scale=128 ** -0.5, max_query_len=int((qs[1:] - qs[:-1]).max()))
    ref = paged_attention_reference(*(a.float() if a.is_floating_point() else a for a in args), scale=128 ** -0.5)
    assert (out.float() - ref).abs().max().item() <= tol
