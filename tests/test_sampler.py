"""The batched sampler against its per-row definition: same filtered distributions, greedy rows
identical, seeded rows reproducible whatever shares the batch, draws distributed as asked."""

import pytest
import torch

from vlm_core.engine.sampling import (SamplingParams, filter_logits, filter_logits_batch, sample, sample_async,
                                      sample_reference)

V = 50


def mixed_params():
    return [SamplingParams(), SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=1.3, top_k=5, seed=2),
            SamplingParams(temperature=1.0, top_p=0.6, seed=3), SamplingParams(temperature=0.5, top_k=8, top_p=0.9),
            SamplingParams(temperature=2.0, top_k=1, seed=4), SamplingParams(temperature=1e-6, top_p=0.3),
            SamplingParams(temperature=1.0, top_p=5e-324, seed=5)]


def generators(params):
    return [p.make_generator() for p in params]


def test_batched_filters_equal_the_per_row_filter_with_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, V, generator=g)
    logits[:, 10:20] = 1.5                       # ties across the top-k and top-p boundaries
    params = [p for p in mixed_params() if not p.greedy]
    rows = logits[: len(params)]
    got = filter_logits_batch(rows, torch.tensor([p.temperature for p in params]),
                              torch.tensor([p.top_k or V for p in params]), torch.tensor([p.top_p for p in params]))
    for i, p in enumerate(params):
        want = filter_logits(rows[i], p)
        assert torch.equal(torch.isfinite(got[i]), torch.isfinite(want))
        assert torch.allclose(got[i][torch.isfinite(want)], want[torch.isfinite(want)])
        if p.top_k:
            assert int(torch.isfinite(want).sum()) <= p.top_k


def test_batched_sampling_equals_the_row_by_row_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, V, generator=g) * 3
    params = [p for p in mixed_params()]
    seeded = [p.seed is not None or p.greedy for p in params]
    got = sample(logits, params, generators(params))
    want = sample_reference(logits, params, generators(params))
    assert [a for a, s in zip(got, seeded) if s] == [b for b, s in zip(want, seeded) if s]
    assert got[0] == int(logits[0].argmax()) and got[6] == int(logits[6].argmax())   # greedy; tiny temperature
    assert got[7] == int(logits[7].argmax())                                         # top_p below fp32


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch():
    g = torch.Generator().manual_seed(2)
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    row = torch.randn(1, V, generator=g)
    alone_gen = p.make_generator()
    alone = [sample(row, [p], [alone_gen])[0] for _ in range(20)]
    mates = [SamplingParams(temperature=0.8), SamplingParams(), SamplingParams(temperature=1.0, seed=9)]
    batch_gens = [m.make_generator() for m in mates] + [p.make_generator()]
    in_batch = []
    for _ in range(20):
        batch = torch.cat([torch.randn(3, V, generator=g), row])
        in_batch.append(sample(batch, mates + [p], batch_gens)[3])
    assert in_batch == alone and len(set(alone)) > 1


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    p = SamplingParams(temperature=0.9, top_k=4, top_p=0.95)
    probs = filter_logits(logits, p).softmax(-1)
    n = 40000
    tokens = torch.tensor(sample(logits.expand(n, -1), [p] * n, [None] * n))
    freq = torch.bincount(tokens, minlength=6).float() / n
    assert freq[4:].sum() == 0 and torch.allclose(freq, probs, atol=0.01), (freq, probs)


def test_a_non_finite_row_fails_alone():
    logits = torch.randn(3, V)
    logits[1, 7] = float("nan")
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, seed=3)]
    got = sample(logits, params, generators(params))
    assert isinstance(got[1], FloatingPointError) and got[0] == int(logits[0].argmax())
    assert isinstance(got[2], int) and 0 <= got[2] < V


@pytest.mark.parametrize("seed", [None, 5])
def test_only_seeded_sampling_requests_own_a_generator(seed):
    assert SamplingParams(temperature=0.0, seed=seed).make_generator() is None
    assert (SamplingParams(temperature=1.0, seed=seed).make_generator() is None) == (seed is None)


def test_each_row_gets_the_number_of_top_logprobs_it_asked_for():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(logprobs=1), SamplingParams(), SamplingParams(logprobs=4)]
    got = sample_async(logits, params, [None] * 3)
    tokens = got.wait()
    ref = torch.log_softmax(logits, -1)
    assert got.logprobs[1] is None
    for row, k in ((0, 1), (2, 4)):
        lp = got.logprobs[row]
        assert lp.token_id == tokens[row] == int(logits[row].argmax())
        assert [t for t, _ in lp.top] == ref[row].topk(k).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(ref[row].topk(k).values.tolist(), abs=1e-6)


def test_sampler_makes_no_blocking_copy_to_the_device(monkeypatch):
    """Per-row numbers reach the device in one copy from a host array (pinned, non-blocking on CUDA):
    no `torch.tensor(..., device=...)`, which blocks on a GPU before the sampler can launch."""
    params = mixed_params() + [SamplingParams(temperature=0.9, logprobs=2)]
    logits = torch.randn(len(params), V, generator=torch.Generator().manual_seed(1))
    want = sample_async(logits, params, generators(params)).wait()
    real = torch.tensor

    def guarded(*a, device=None, **kw):
        if device is not None:
            raise AssertionError("torch.tensor(..., device=...) in the sampler")
        return real(*a, **kw)

    monkeypatch.setattr(torch, "tensor", guarded)
    got = sample_async(logits, params, generators(params)).wait()
    monkeypatch.undo()
    seeded = [i for i, p in enumerate(params) if p.greedy or p.seed is not None]
    assert [got[i] for i in seeded] == [want[i] for i in seeded]


def test_huge_top_k_means_the_whole_vocabulary():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(2)).expand(2, V)
    params = [SamplingParams(temperature=1.0, top_k=2 ** 63 - 1, seed=9), SamplingParams(temperature=1.0, seed=9)]
    a, b = sample_async(logits, params, generators(params)).wait()
    assert a == b


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_equals_transformers_min_p_warper(min_p):
    """min_p removes what transformers' MinPLogitsWarper removes (same probability threshold), per
    row and batched, after temperature."""
    from transformers.generation.logits_process import MinPLogitsWarper

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g) * 2
    temps = [1.0, 0.7, 1.5, 1.0]
    params = [SamplingParams(temperature=t, min_p=min_p, seed=i) for i, t in enumerate(temps)]
    got = filter_logits_batch(logits, torch.tensor(temps), torch.full((4,), V), torch.ones(4),
                              torch.full((4,), min_p))
    for i, p in enumerate(params):
        hf = MinPLogitsWarper(min_p)(None, logits[i:i + 1] / temps[i])[0]
        assert torch.equal(torch.isfinite(hf), torch.isfinite(filter_logits(logits[i], p)))
        assert torch.equal(torch.isfinite(hf), torch.isfinite(got[i]))
    assert sample(logits, params, generators(params)) == sample_reference(logits, params, generators(params))


def test_allowed_token_ids_confine_greedy_and_sampled_tokens():
    from vlm_core.engine.sampling import SamplingHistory

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, V, generator=g)
    allowed = (3, 17, 41)
    params = [SamplingParams(allowed_token_ids=allowed), SamplingParams(temperature=1.0, seed=7,
                                                                         allowed_token_ids=allowed),
              SamplingParams()]
    history = SamplingHistory([[], [], []], [[], [], []])
    want_greedy = allowed[int(logits[0, list(allowed)].argmax())]
    for _ in range(20):
        tokens = sample_async(logits, params, generators(params), history).wait()
        assert tokens[0] == want_greedy and tokens[1] in allowed and tokens[2] == int(logits[2].argmax())
    with pytest.raises(Exception, match="allowed_token_ids must name at least one token"):
        SamplingParams(allowed_token_ids=())
