"""Fused RMSNorm(+residual) and rope kernels against their torch references (TRITON_INTERPRET=1 on
CPU), and the decoder with kernels on against kernels off."""

import pytest
import torch

from kernels.norm_rope import rms_norm, rms_norm_reference, rope, rope_reference


@pytest.mark.interpreter
@pytest.mark.parametrize("hidden", [64, 96, 200])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(hidden, with_residual):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden, generator=gen) * 3
    r = torch.randn(7, hidden, generator=gen) if with_residual else None
    w = torch.randn(hidden, generator=gen)
    out, summed = rms_norm(x, w, 1e-6, r)
    ref, ref_sum = rms_norm_reference(x, w, 1e-6, r)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(summed, ref_sum)          # the add is the same single rounding
    if not with_residual:
        assert summed is x


@pytest.mark.interpreter
def test_rms_norm_rows_of_a_wider_tensor():
    """Rows with a stride larger than the hidden size (a slice of a bigger buffer)."""
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(5, 160, generator=gen)
    x, w = big[:, :128], torch.rand(128, generator=gen)
    torch.testing.assert_close(rms_norm(x, w, 1e-5)[0], rms_norm_reference(x, w, 1e-5)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 16), (8, 2, 32), (12, 4, 64)])
def test_rope_matches_reference(hq, hkv, d):
    gen = torch.Generator().manual_seed(hq * d)
    t = 6
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen)
    q, k, _ = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)       # strided views, as the fused qkv gives
    q, k = q.reshape(t, hq, d), k.reshape(t, hkv, d)
    angles = torch.rand(t, d // 2, generator=gen) * 50
    emb = torch.cat((angles, angles), -1)[:, None, :]
    cos, sin = emb.cos(), emb.sin()
    qo, ko = rope(q, k, cos, sin)
    torch.testing.assert_close(qo, rope_reference(q, cos, sin), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko, rope_reference(k, cos, sin), rtol=1e-5, atol=1e-5)


def test_rope_refuses_odd_head_dims():
    q = torch.zeros(2, 2, 24)
    with pytest.raises(ValueError, match="head dim"):
        rope(q, q, torch.zeros(2, 1, 24), torch.zeros(2, 1, 24))


@pytest.mark.interpreter
def test_decoder_kernels_equal_torch_path(vlm):
    """The whole decoder with Triton norms and rope gives the torch path's logits (fp32)."""
    from vlm_core.models.attention import UncachedKV

    dec = vlm.model.decoder
    ids = torch.tensor([1, 5, 9, 3, 7, 2, 11, 4])
    pos = torch.arange(len(ids))

    def logits(mode):
        dec.use_kernels(mode)
        try:
            return dec.compute_logits(dec(ids, pos, UncachedKV([len(ids)])))
        finally:
            dec.use_kernels("torch")

    torch.testing.assert_close(logits("triton"), logits("torch"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernels"):
        dec.use_kernels("fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_real_shapes_on_gpu(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4096, generator=gen).to("cuda", dtype)
    r = torch.randn(300, 4096, generator=gen).to("cuda", dtype)
    w = torch.rand(4096, generator=gen).to("cuda", dtype)
    out, summed = rms_norm(x, w, 1e-6, r)
    ref, ref_sum = rms_norm_reference(x, w, 1e-6, r)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert torch.equal(summed, ref_sum)
    q = torch.randn(300, 32, 128, generator=gen).to("cuda", dtype)
    k = torch.randn(300, 8, 128, generator=gen).to("cuda", dtype)
    angles = torch.arange(300, device="cuda")[:, None] * torch.rand(64, generator=gen).cuda()
    emb = torch.cat((angles, angles), -1)[:, None, :]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    qo, ko = rope(q, k, cos, sin)
    torch.testing.assert_close(qo, rope_reference(q, cos, sin), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ko, rope_reference(k, cos, sin), rtol=2e-2, atol=2e-2)
