"""The continuous-batching engine against single-request generation and HF generate."""

import asyncio

import pytest
import torch

from vlm_core.engine.engine import AsyncLLMEngine, EngineConfig
from vlm_core.engine.sampling import SamplingParams
from vlm_core.errors import ContextLengthError, InputError
from vlm_core.engine.request import EngineRequest

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
QUESTIONS = ["What colour is the circle?", "How many shapes are there?", "Is the square left of the triangle?",
             "Describe the image.", "What is the largest shape in the picture and what colour is it?",
             "Count the red things.", "Name every colour you can see.", "Where is the triangle?",
             "Compare the pictures carefully please.", "Hi", "Is there a circle?", "Which shape is on top?"]


@pytest.fixture(scope="module")
def requests_12(vlm, images):
    reqs = []
    for i, q in enumerate(QUESTIONS):
        n = i % 3  # 0, 1 or 2 images
        ims = [images[(i + j) % len(images)] for j in range(n)]
        reqs.append(vlm.request(q, {"image": ims}, GREEDY))
    return reqs


@pytest.fixture(scope="module")
def alone(vlm, requests_12):
    return [vlm.generate([r])[0].token_ids for r in requests_12]


def run_engine(engine, reqs):
    for i, r in enumerate(reqs):
        engine.add_request(f"r{i}", r)
    got = engine.run_to_completion()
    return [[t for o in got[f"r{i}"] for t in o.token_ids] for i in range(len(reqs))], got


def test_alone_equals_hf_generate(vlm, hf_model, images, requests_12, alone):
    for i, (r, ids) in enumerate(zip(requests_12, alone)):
        ims = [images[(i + j) % len(images)] for j in range(i % 3)]   # as in requests_12
        ids_t = torch.tensor([r.prompt.token_ids])
        extra = {"pixel_values": vlm.image_processor(ims)} if ims else {}
        g = hf_model.generate(input_ids=ids_t, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=vlm.tokenizer.pad_token_id, **extra)
        assert ids == g[0, ids_t.shape[1]:].tolist()


@pytest.mark.parametrize("budget", [16, 64, 2048])
def test_12_concurrent_requests_match_alone(vlm, requests_12, alone, budget):
    engine = vlm.engine(EngineConfig(num_blocks=256, max_num_batched_tokens=budget))
    got, outputs = run_engine(engine, requests_12)
    assert got == alone
    assert all(o[-1].finish_reason == "length" and o[-1].completion_tokens == 12 for o in outputs.values())
    assert engine.blocks.num_free_blocks == 256


def test_text_deltas_concatenate_to_the_decoded_tokens(vlm, requests_12):
    engine = vlm.engine(EngineConfig(num_blocks=256))
    _, outputs = run_engine(engine, requests_12[:4])
    for outs in outputs.values():
        ids = [t for o in outs for t in o.token_ids]
        assert "".join(o.text for o in outs) == vlm.tokenizer.decode(ids, skip_special_tokens=True)


def test_preemption_under_a_small_kv_budget_keeps_tokens(vlm, requests_12, alone):
    # 12 blocks of 16 slots: two or three sequences at a time
    engine = vlm.engine(EngineConfig(num_blocks=12, max_num_batched_tokens=64))
    got, _ = run_engine(engine, requests_12)
    assert engine.scheduler.num_preemptions > 0
    assert got == alone
    assert engine.blocks.num_free_blocks == 12


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_second_turn_reuses_the_first_turns_blocks(vlm, images):
    bs = 4
    engine = vlm.engine(EngineConfig(num_blocks=128, block_size=bs))
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    turn1 = vlm.request("What colour is the circle?", {"image": images[:1]}, sp)
    got, _ = run_engine(engine, [turn1])
    answer = vlm.tokenizer.decode(got[0], skip_special_tokens=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "And the square?"}]
    turn2 = vlm.request(messages, {"image": images[:1]}, sp)
    first_tokens = list(turn1.prompt.token_ids) + got[0]
    computed = len(first_tokens) - 1          # the last sampled token never entered the cache
    expected_blocks = min(_common_prefix(first_tokens, list(turn2.prompt.token_ids)), computed,
                          len(turn2.prompt) - 1) // bs
    assert expected_blocks >= len(turn1.prompt) // bs > 0
    hits_before = engine.blocks.stats.prefix_hits
    engine.add_request("t2", EngineRequest(turn2.prompt, turn2.media_embeds, sp, turn2.media_hashes))
    out = engine.run_to_completion()["t2"]
    assert engine.blocks.stats.prefix_hits - hits_before == expected_blocks
    assert out[-1].cached_tokens == expected_blocks * bs
    fresh = vlm.engine(EngineConfig(num_blocks=128, block_size=bs, enable_prefix_caching=False))
    fresh.add_request("t2", EngineRequest(turn2.prompt, turn2.media_embeds, sp, turn2.media_hashes))
    assert [t for o in fresh.run_to_completion()["t2"] for t in o.token_ids] == [t for o in out for t in o.token_ids]


def test_turns_about_one_picture_arriving_together_compute_the_picture_once(vlm, images):
    """Four questions about one picture added in one step: the first computes the blocks they share,
    the others take them from the prefix cache a step later, and every answer is the one it gets alone."""
    bs = 4
    reqs = [vlm.request(q, {"image": images[:1]}, GREEDY) for q in QUESTIONS[:4]]
    shared = min(_common_prefix(list(reqs[0].prompt.token_ids), list(r.prompt.token_ids)) for r in reqs[1:]) // bs
    assert shared * bs >= reqs[0].prompt.spans[0].end
    engine = vlm.engine(EngineConfig(num_blocks=256, block_size=bs))
    got, outputs = run_engine(engine, reqs)
    assert got == [vlm.generate([r])[0].token_ids for r in reqs]
    cached = [outputs[f"r{i}"][-1].cached_tokens for i in range(4)]
    assert cached[0] == 0 and all(c >= shared * bs for c in cached[1:])
    assert engine.blocks.num_free_blocks == 256


def test_different_images_with_identical_text_share_no_image_blocks(vlm, images):
    bs = 4
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    engine = vlm.engine(EngineConfig(num_blocks=128, block_size=bs))
    a = vlm.request("What colour is the circle?", {"image": images[:1]}, sp)
    b = vlm.request("What colour is the circle?", {"image": images[1:2]}, sp)
    assert a.prompt.token_ids == b.prompt.token_ids and a.media_hashes != b.media_hashes
    run_engine(engine, [a])
    engine.add_request("b", EngineRequest(b.prompt, b.media_embeds, sp, b.media_hashes))
    out = engine.run_to_completion()["b"]
    text_only_blocks = a.prompt.spans[0].offset // bs   # blocks that end before the image starts
    assert out[-1].cached_tokens == text_only_blocks * bs
    # the same image again does reuse the image blocks
    engine.add_request("a2", EngineRequest(a.prompt, a.media_embeds, sp, a.media_hashes))
    assert engine.run_to_completion()["a2"][-1].cached_tokens == (len(a.prompt) - 1) // bs * bs


def test_abort_50_requests_mid_generation_returns_all_blocks(vlm, images):
    engine = vlm.engine(EngineConfig(num_blocks=512, max_num_batched_tokens=256))
    initial = engine.blocks.num_free_blocks
    sp = SamplingParams(max_new_tokens=40, ignore_eos=True)
    base = [vlm.request(q, {"image": images[:i % 2]}, sp) for i, q in enumerate(QUESTIONS[:5])]
    for i in range(50):
        r = base[i % 5]
        engine.add_request(f"x{i}", EngineRequest(r.prompt, r.media_embeds, sp, r.media_hashes))
    for _ in range(6):
        engine.step()
    assert engine.blocks.num_free_blocks < initial
    for i in range(50):
        engine.abort(f"x{i}")
    outs = engine.step()
    assert sorted(o.request_id for o in outs if o.finish_reason == "abort") == sorted(f"x{i}" for i in range(50))
    assert not engine.has_unfinished()
    assert engine.blocks.num_free_blocks == initial


@pytest.mark.interpreter
def test_triton_paged_attention_in_the_engine(vlm, requests_12, alone):
    engine = vlm.engine(EngineConfig(num_blocks=64, max_num_batched_tokens=32, attention="triton"))
    got, _ = run_engine(engine, requests_12[:3])
    assert got == alone[:3]


def test_async_engine_streams_and_cancellation_aborts(vlm, requests_12, alone):
    engine = vlm.engine(EngineConfig(num_blocks=128))
    aengine = AsyncLLMEngine(engine)

    async def collect(i):
        r = requests_12[i]
        ids = []
        async for out in aengine.generate(f"a{i}", r):
            ids += out.token_ids
        return ids

    async def cancelled():
        r = requests_12[0]
        long = SamplingParams(max_new_tokens=200, ignore_eos=True)
        n = 0
        async for out in aengine.generate("gone", EngineRequest(r.prompt, r.media_embeds, long, r.media_hashes)):
            n += len(out.token_ids)
            if n >= 3:
                break   # the client goes away
        return n

    async def slow(i):   # a consumer slower than the engine: fewer, larger deltas, the same tokens
        r = requests_12[i]
        ids, deltas = [], 0
        async for out in aengine.generate(f"s{i}", r):
            ids += out.token_ids
            deltas += 1
            await asyncio.sleep(0.05)
        return ids, deltas

    async def main():
        results = await asyncio.gather(*(collect(i) for i in range(6)), cancelled(), slow(7))
        for _ in range(100):   # let the loop apply the abort
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        return results

    results = asyncio.run(main())
    assert results[:6] == alone[:6] and 3 <= results[6] < 200
    slow_ids, slow_deltas = results[7]
    assert slow_ids == alone[7] and slow_deltas < len(alone[7])
    assert not engine.has_unfinished() and engine.blocks.num_free_blocks == 128


def test_bad_requests_are_rejected_clearly(vlm, requests_12):
    engine = vlm.engine(EngineConfig(num_blocks=4, block_size=4))
    r = requests_12[1]   # has an image
    with pytest.raises(InputError, match="1 image spans but 0 image embeddings"):
        engine.add_request("x", EngineRequest(r.prompt, [], GREEDY))
    with pytest.raises(ContextLengthError, match="does not fit the KV cache"):
        engine.add_request("y", EngineRequest(r.prompt, r.media_embeds, GREEDY))
    with pytest.raises(InputError, match="0 image hashes for 1 images"):
        vlm.engine(EngineConfig(num_blocks=64)).add_request("h", EngineRequest(r.prompt, r.media_embeds, GREEDY, ()))
    big = vlm.engine(EngineConfig(num_blocks=64))
    big.add_request("z", EngineRequest(r.prompt, r.media_embeds, GREEDY))
    with pytest.raises(InputError, match="request id 'z' is already in use"):
        big.add_request("z", EngineRequest(r.prompt, r.media_embeds, GREEDY))


def test_n_choices_share_the_prompt_blocks_and_reproduce_alone(vlm, images):
    bs = 4
    req = vlm.request("Describe the image.", {"image": images[:1]})
    p = len(req.prompt)

    def run(params):
        engine = vlm.engine(EngineConfig(num_blocks=256, block_size=bs))
        engine.add_request("r", EngineRequest(req.prompt, req.media_embeds, params, req.media_hashes))
        got = engine.run_to_completion()["r"]
        by_choice: dict[int, list[int]] = {}
        for o in got:
            by_choice.setdefault(o.index, []).extend(o.token_ids)
        assert engine.blocks.num_free_blocks == 256
        return by_choice, engine.blocks.stats, got

    sampled = dict(max_new_tokens=9, temperature=1.0, seed=7, ignore_eos=True)
    three, stats3, outs = run(SamplingParams(n=3, **sampled))
    assert sorted(three) == [0, 1, 2] and len({tuple(v) for v in three.values()}) > 1
    singles = [run(SamplingParams(**{**sampled, "seed": 7 + i})) for i in range(3)]
    assert [three[i] for i in range(3)] == [s[0][0] for s in singles]
    # choices 1 and 2 take choice 0's full prompt blocks and allocate only what lies beyond them
    shared = (p - 1) // bs
    assert stats3.prefix_hits == 2 * shared
    assert stats3.allocated == singles[0][1].allocated + 2 * (singles[0][1].allocated - shared)
    finals = [o for o in outs if o.finish_reason is not None]
    assert sorted(o.index for o in finals) == [0, 1, 2] and all(o.cached_tokens == shared * bs for o in finals
                                                                  if o.index > 0)


def test_n_choices_through_vlm_and_async_engine_and_abort(vlm, images):
    sp = SamplingParams(max_new_tokens=5, temperature=0.8, seed=3, ignore_eos=True, n=2)
    outs = vlm.generate("What colour is the circle?", {"image": images[:1]}, sp)
    assert [o.index for o in outs] == [0, 1] and all(len(o.token_ids) == 5 for o in outs)
    req = vlm.request("What colour is the circle?", {"image": images[:1]}, sp)

    async def collect():
        aengine = AsyncLLMEngine(vlm.engine(EngineConfig(num_blocks=64)))
        got: dict[int, list[int]] = {}
        async for out in aengine.generate("a", req):
            got.setdefault(out.index, []).extend(out.token_ids)
        return got

    got = asyncio.run(collect())
    assert [got[0], got[1]] == [o.token_ids for o in outs]
    engine = vlm.engine(EngineConfig(num_blocks=64))
    engine.add_request("x", EngineRequest(req.prompt, req.media_embeds,
                                          SamplingParams(max_new_tokens=50, n=3, ignore_eos=True), req.media_hashes))
    engine.step()                      # choice 0 prefills; 1 and 2 wait for it
    engine.abort("x")
    aborted = engine.step()
    assert sorted(o.index for o in aborted if o.finish_reason == "abort") == [0, 1, 2]
    assert not engine.has_unfinished() and engine.blocks.num_free_blocks == 64


@pytest.fixture(scope="module")
def long_context_vlm(tmp_path_factory):
    from vlm_core.tiny import build_tiny_llava
    from vlm_core.vlm import VLM

    return VLM.from_pretrained(build_tiny_llava(tmp_path_factory.mktemp("tiny-8k"), seed=3, max_positions=8192),
                               dtype="float32")


def test_a_short_request_is_not_stuck_behind_a_long_prefill(long_context_vlm):
    """A 10-token request arriving after the first chunk of a 4,006-token prefill (budget 512)
    gets its first token in the next step, and both requests produce what they produce alone."""
    from vlm_core.inputs.placeholders import MultimodalPrompt

    vlm = long_context_vlm
    vocab = vlm.model.config.text.vocab_size
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    long = EngineRequest(MultimodalPrompt(tuple(5 + (7 * i) % (vocab - 50) for i in range(4006)), ()), params=sp)
    short = EngineRequest(MultimodalPrompt(tuple(range(20, 30)), ()), params=sp)
    config = EngineConfig(num_blocks=300, max_num_batched_tokens=512)
    expected = {}
    for name, r in (("long", long), ("short", short)):
        e = vlm.engine(config)
        e.add_request(name, r)
        expected[name] = [t for o in e.run_to_completion()[name] for t in o.token_ids]
    engine = vlm.engine(config)
    engine.add_request("long", long)
    assert not engine.step()                               # the long prompt's first chunk: nothing sampled
    engine.add_request("short", short)
    got = {"long": [], "short": []}
    steps_to_first = None
    step = 0
    while engine.has_unfinished():
        step += 1
        for o in engine.step():
            got[o.request_id] += o.token_ids
            if o.request_id == "short" and o.token_ids and steps_to_first is None:
                steps_to_first = step
    assert steps_to_first == 1 and got == expected
    # queue time: from add_request to the first scheduled chunk, on every output of the request
    engine.add_request("again", short)
    outs = engine.run_to_completion()["again"]
    assert {o.queue_time_s for o in outs} == {outs[0].queue_time_s} and 0 <= outs[0].queue_time_s < 5


def test_request_priority_orders_admission_in_the_engine(vlm):
    from vlm_core.inputs.placeholders import MultimodalPrompt

    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    engine = vlm.engine(EngineConfig(num_blocks=64, max_num_seqs=1))
    for name, first_token, priority in (("a", 20, 0), ("b", 40, 0), ("urgent", 60, -1)):
        engine.add_request(name, EngineRequest(MultimodalPrompt(tuple(range(first_token, first_token + 8)), ()),
                                               params=sp, priority=priority))
    finished = []
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finish_reason is not None]
    assert finished == ["urgent", "a", "b"]


# ---- what a GPU would show, checked here -----------------------------------------------------------

@pytest.mark.interpreter
def test_runner_gives_attention_the_longest_query_from_the_host(vlm, requests_12, monkeypatch):
    """The runner passes max_query_len (known on the host), so the Triton attention never reads it off
    the device (a sync in every layer on a GPU)."""
    import kernels.paged_attention as pa

    seen = []
    real = pa.paged_attention

    def spy(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale, max_query_len=None, **kw):
        seen.append((max_query_len, int((query_start[1:] - query_start[:-1]).max())))
        return real(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale, max_query_len=max_query_len, **kw)

    monkeypatch.setattr("vlm_core.engine.kv_cache.paged_attention", spy)
    engine = vlm.engine(EngineConfig(num_blocks=64, max_num_batched_tokens=32, attention="triton"))
    for i, r in enumerate(requests_12[:3]):
        engine.add_request(str(i), r)
    while engine.has_unfinished():
        engine.step()
    assert seen and all(given == actual for given, actual in seen)
    assert {actual for _, actual in seen} > {1}          # prefill chunks and decode steps both seen


@pytest.mark.parametrize("kw,msg", [
    (dict(attention="triton", block_size=8), "block_size >= 16"),
    (dict(attention="torch", cuda_graphs=True), "cuda_graphs needs attention 'triton' or 'auto'"),
])
def test_configs_a_gpu_cannot_run_are_refused(vlm, kw, msg):
    with pytest.raises(ValueError, match=msg):
        vlm.engine(EngineConfig(num_blocks=64, **kw))


def test_triton_attention_shape_limits():
    from kernels.utils import check_attention_shapes

    check_attention_shapes(16, 16)
    for bs, d in ((8, 64), (16, 8)):
        with pytest.raises(ValueError, match="tl.dot's smallest K"):
            check_attention_shapes(bs, d)
