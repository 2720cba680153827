"""One request's failure stays its own: sampling values at the edge of fp32, a sampler fault and a
forward-pass fault in one sequence leave every other sequence's tokens exactly as when alone."""

import asyncio

import pytest
import torch

import vlm_core.engine.runner as runner
from vlm_core.engine.engine import AsyncLLMEngine, EngineConfig, RequestFailedError
from vlm_core.engine.sampling import SamplingParams, filter_logits
from vlm_core.errors import PlaceholderMismatchError, SamplingParamsError
from vlm_core.engine.request import EngineRequest

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def three(vlm, images):
    """Three requests (0, 1, 2 images) and their greedy tokens when run alone."""
    reqs = [vlm.request(q, {"image": images[:n]}, GREEDY) for n, q in enumerate(["Hi", "What colour?", "Compare them."])]
    return reqs, [vlm.generate([r])[0].token_ids for r in reqs]


def add(engine, rid, r, params=None):
    engine.add_request(rid, EngineRequest(r.prompt, r.media_embeds, params or r.params, r.media_hashes))


def tokens(outputs):
    return [t for o in outputs for t in o.token_ids]


@pytest.mark.parametrize("params", [dict(temperature=1e-300), dict(temperature=1e-40), dict(temperature=5e-6),
                                    dict(temperature=1.0, top_p=1e-46), dict(temperature=1.0, top_p=5e-324)])
def test_temperature_and_top_p_below_fp32_sample_the_argmax(vlm, three, params):
    reqs, alone = three
    engine = vlm.engine(EngineConfig(num_blocks=64))
    for i, r in enumerate(reqs):
        add(engine, f"r{i}", r, SamplingParams(max_new_tokens=8, ignore_eos=True, seed=1, **params))
    got = engine.run_to_completion()
    assert [tokens(got[f"r{i}"]) for i in range(3)] == alone


def test_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([0.0, 3.0, 1.0, -2.0])
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=5e-324))
    assert torch.isfinite(kept).tolist() == [False, True, False, False]


def test_seed_outside_the_generator_range_is_refused():
    SamplingParams(temperature=1.0, seed=2 ** 64 - 1).make_generator()
    SamplingParams(temperature=1.0, seed=-(2 ** 63)).make_generator()
    for seed in (2 ** 64, -(2 ** 63) - 1):
        with pytest.raises(SamplingParamsError, match="seed must be in"):
            SamplingParams(seed=seed)


def poison_rows_with_seed_13(monkeypatch):
    """The runner's sampler sees NaN logits for requests seeded 13 (a fault upstream of it)."""
    real = runner.sample_async

    def sample(logits, params, generators, history=None):
        bad = torch.tensor([p.seed == 13 for p in params])
        return real(logits.masked_fill(bad[:, None], float("nan")), params, generators, history)

    monkeypatch.setattr(runner, "sample_async", sample)


def test_a_row_with_non_finite_logits_fails_that_request_alone(vlm, three, monkeypatch):
    reqs, alone = three
    poison_rows_with_seed_13(monkeypatch)
    engine = vlm.engine(EngineConfig(num_blocks=64))
    for i, r in enumerate(reqs):
        add(engine, f"r{i}", r)
    add(engine, "poison", reqs[1], SamplingParams(max_new_tokens=8, temperature=0.7, seed=13))
    got = engine.run_to_completion()
    assert [tokens(got[f"r{i}"]) for i in range(3)] == alone
    assert all(got[f"r{i}"][-1].finish_reason == "length" and got[f"r{i}"][-1].error is None for i in range(3))
    last = got["poison"][-1]
    assert (last.finish_reason, last.completion_tokens) == ("error", 0)
    assert "non-finite logits" in last.error
    assert engine.blocks.num_free_blocks == 64


def test_a_forward_fault_in_one_chunk_fails_that_request_alone(vlm, three):
    reqs, alone = three
    engine = vlm.engine(EngineConfig(num_blocks=64))
    for i, r in enumerate(reqs):
        add(engine, f"r{i}", r)
    add(engine, "poison", reqs[2])
    # corrupt the admitted sequence's embedding behind the engine's checks: its splice fails
    engine._pending[-1][1][0].media_embeds[1] = torch.zeros(3, 3)
    got = engine.run_to_completion()
    assert [tokens(got[f"r{i}"]) for i in range(3)] == alone
    assert got["poison"][-1].finish_reason == "error" and got["poison"][-1].completion_tokens == 0
    assert engine.blocks.num_free_blocks == 64


def test_embeddings_that_do_not_fit_their_spans_are_refused_at_admission(vlm, three):
    reqs, _ = three
    r = reqs[1]
    engine = vlm.engine(EngineConfig(num_blocks=64))
    bad = [r.media_embeds[0][:-1]]
    with pytest.raises(PlaceholderMismatchError, match=r"image 0: embedding of shape"):
        engine.add_request("x", EngineRequest(r.prompt, bad, r.params, r.media_hashes))
    assert not engine.has_unfinished()


def test_async_streams_beside_a_failing_request_finish_normally(vlm, three, monkeypatch):
    reqs, alone = three
    poison_rows_with_seed_13(monkeypatch)

    async def main():
        eng = AsyncLLMEngine(vlm.engine(EngineConfig(num_blocks=64)))

        async def collect(rid, r, params=None):
            return [t async for o in eng.generate(rid, EngineRequest(r.prompt, r.media_embeds, params or r.params, r.media_hashes))
                    for t in o.token_ids]

        tasks = [collect(f"r{i}", r) for i, r in enumerate(reqs)]
        tasks.append(collect("poison", reqs[0], SamplingParams(max_new_tokens=8, temperature=1.0, seed=13)))
        return await asyncio.gather(*tasks, return_exceptions=True)

    *ok, failed = asyncio.run(main())
    assert ok == alone
    assert isinstance(failed, RequestFailedError) and "non-finite logits" in str(failed)


def test_engine_stats_and_health_for_operators(vlm, three):
    reqs, _ = three
    engine = vlm.engine(EngineConfig(num_blocks=64, max_num_batched_tokens=8))
    for i, r in enumerate(reqs):
        add(engine, f"r{i}", r)
    engine.step()
    mid = engine.stats()
    assert mid["running"] + mid["waiting"] == 3 and 0 < mid["kv_usage"] <= 1
    assert mid["free_blocks"] == 64 - round(mid["kv_usage"] * 64)
    engine.run_to_completion()
    after = engine.stats()
    assert after.pop("prefix_hit_blocks") == engine.blocks.stats.prefix_hits   # the shared template prefix
    assert after == {"running": 0, "waiting": 0, "kv_usage": 0.0, "free_blocks": 64, "num_blocks": 64,
                     "preemptions": 0}
    AsyncLLMEngine(engine).check_health()     # no loop yet: healthy


def test_requests_and_aborts_that_arrive_while_the_device_works(vlm, three, monkeypatch):
    """Between queuing a step and waiting for its tokens the engine applies what arrived: an abort
    of a sequence in that very step drops its token and frees its blocks; a new request is admitted
    at the next step. Every other sequence's tokens are those it gets alone."""
    reqs, alone = three
    engine = vlm.engine(EngineConfig(num_blocks=64))
    for i, r in enumerate(reqs):
        add(engine, f"r{i}", r)
    real_launch, launches = engine.runner.launch, []

    def launch(out):
        launched = real_launch(out)
        launches.append(len(out.chunks))
        if len(launches) == 3:          # r1 has sampled two tokens; its third is being computed
            engine.abort("r1")
            add(engine, "late", reqs[2])
        return launched

    monkeypatch.setattr(engine.runner, "launch", launch)
    got = engine.run_to_completion()
    assert tokens(got["r0"]) == alone[0] and tokens(got["r2"]) == alone[2]
    assert tokens(got["late"]) == alone[2]
    assert tokens(got["r1"]) == alone[1][:2]
    assert got["r1"][-1].finish_reason == "abort" and got["r1"][-1].completion_tokens == 2
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not any(engine.blocks.ref)
