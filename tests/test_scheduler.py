"""Scheduler and block manager on hand-built sequences (no model)."""

import pytest

from vlm_core.engine.blocks import BlockManager
from vlm_core.engine.output import OutputProcessor
from vlm_core.engine.sampling import SamplingParams
from vlm_core.engine.scheduler import Scheduler, SchedulerConfig
from vlm_core.engine.sequence import Sequence
from vlm_core.inputs.placeholders import ImageSpan, MultimodalPrompt

_arrival = iter(range(10 ** 6))


def seq(rid, n_prompt, max_new=4, tokens=None, spans=(), hashes=()):
    """A sequence of `n_prompt` tokens no other sequence shares, unless `tokens` are given."""
    arrival = next(_arrival)
    first = 10 ** 7 * (arrival + 1)
    ids = tuple(tokens) if tokens is not None else tuple(range(first, first + n_prompt))
    return Sequence(rid, MultimodalPrompt(ids, tuple(spans)), [None] * len(spans), tuple(hashes),
                    SamplingParams(max_new_tokens=max_new, ignore_eos=True), arrival)


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8, caching=True):
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(budget, max_seqs), bm), bm


class NoText:
    """A tokenizer whose every token decodes to nothing (the scheduler tests need no text)."""

    def decode(self, ids, skip_special_tokens=True):
        return ""


def run_step(sched, token=7):
    """schedule + a fake runner that samples `token` for every sampling chunk, then the engine's
    output processor (appends the token, decides stops) and finishing."""
    out = sched.schedule()
    sampled = {c.seq: token for c in out.chunks if c.samples}
    processor = OutputProcessor(NoText(), (), 10 ** 6)
    for s, t in sched.update(out, sampled):
        processor.add(s)
        _, _, finish = processor.process(s, t)
        if finish is not None:
            sched.finish(s, finish)
    return out


def test_long_prompt_is_chunked_by_token_budget():
    sched, _ = make(budget=16)
    s = seq("a", 40)
    sched.add(s)
    sizes = [[(c.seq.request_id, c.start, c.num_tokens) for c in run_step(sched).chunks] for _ in range(4)]
    assert sizes == [[("a", 0, 16)], [("a", 16, 16)], [("a", 32, 8)], [("a", 40, 1)]]
    assert s.output_ids == [7, 7]   # sampled at the end of the prompt, then after the first decode


def test_decodes_go_first_then_prefill_chunks_share_the_budget():
    sched, _ = make(budget=10)
    a, b = seq("a", 6), seq("b", 0, tokens=range(200, 206))
    sched.add(a)
    run_step(sched)                 # a: whole prompt (6), samples
    sched.add(b)
    c = seq("c", 0, tokens=range(300, 330))
    sched.add(c)
    out = run_step(sched)
    assert [(x.seq.request_id, x.num_tokens) for x in out.chunks] == [("a", 1), ("b", 6), ("c", 3)]
    out = run_step(sched)
    # a and b decode first, then c continues its prefill with what is left of the budget
    assert [(x.seq.request_id, x.start, x.num_tokens) for x in out.chunks] == [("a", 7, 1), ("b", 6, 1), ("c", 3, 8)]


def test_max_num_seqs_limits_admission():
    sched, _ = make(budget=100, max_seqs=2)
    for r in "abc":
        sched.add(seq(r, 4))
    out = run_step(sched)
    assert [x.seq.request_id for x in out.chunks] == ["a", "b"] and len(sched.waiting) == 1


def test_preemption_takes_the_newest_and_recomputes_it():
    sched, bm = make(num_blocks=5, block_size=4, budget=64)
    old, new = seq("old", 8, max_new=8), seq("new", 8, max_new=8)
    sched.add(old)
    sched.add(new)
    run_step(sched)                       # both prefilled: 2 blocks each, 1 free
    assert bm.num_free_blocks == 1
    run_step(sched)                       # decode at pos 8: old takes the last block, new is preempted
    assert new.num_preemptions == 1 and old.num_preemptions == 0
    assert new.num_computed_tokens == 0 and new.output_ids == [7]   # generated tokens kept
    assert sched.waiting[0] is new
    # the preempted sequence returns later and recomputes prompt + outputs
    for _ in range(30):
        if not sched.has_unfinished:
            break
        run_step(sched)
    assert old.finish_reason == new.finish_reason == "length"
    assert len(new.output_ids) == 8 and bm.num_free_blocks == 5


def test_abort_frees_blocks_immediately():
    sched, bm = make(num_blocks=16)
    s = seq("a", 10)
    sched.add(s)
    run_step(sched)
    assert bm.num_free_blocks == 16 - 3
    sched.finish(s, "abort")
    assert bm.num_free_blocks == 16 and s.finish_reason == "abort" and not sched.has_unfinished


def test_prefix_blocks_are_shared_and_images_are_part_of_the_key():
    sched, bm = make(num_blocks=32, block_size=4, budget=64)
    toks = list(range(1, 14))            # 13 tokens; image placeholder run at 4..11
    first = seq("a", 0, max_new=1, tokens=toks, spans=[ImageSpan(4, 8)], hashes=["img-A"])
    sched.add(first)
    while sched.has_unfinished:
        run_step(sched)
    same = seq("b", 0, max_new=1, tokens=toks, spans=[ImageSpan(4, 8)], hashes=["img-A"])
    other = seq("c", 0, max_new=1, tokens=toks, spans=[ImageSpan(4, 8)], hashes=["img-B"])
    assert len(bm.match_prefix(same)) == 3    # 12 of 13 tokens: one token is always computed
    assert len(bm.match_prefix(other)) == 1   # only the text block before the image
    sched.add(same)
    out = run_step(sched)
    assert out.chunks[0].start == 12 and same.num_cached_tokens == 12


def test_a_burst_sharing_a_prefix_computes_it_once():
    """Three prompts sharing 3 blocks (one picture), arriving together, and one sharing nothing:
    the first computes the shared blocks while the other two wait a step and take them cached."""
    toks = list(range(1, 14))            # 12 shared tokens, image placeholder run at 4..11
    spans, hashes = [ImageSpan(4, 8)], ["img-A"]

    def burst(caching):
        sched, bm = make(num_blocks=64, block_size=4, budget=64, caching=caching)
        same = [seq(r, 0, max_new=1, tokens=toks + [50 + i], spans=spans, hashes=hashes) for i, r in enumerate("abc")]
        for s in [*same, seq("x", 9)]:
            sched.add(s)
        steps = [chunk_sizes(run_step(sched)) for _ in range(2)]
        return steps, same, bm

    steps, (a, b, c), bm = burst(True)
    assert steps == [[("a", 14), ("x", 9)], [("x", 1), ("b", 2), ("c", 2)]]
    assert (a.num_cached_tokens, b.num_cached_tokens, c.num_cached_tokens) == (0, 12, 12)
    assert bm.stats.prefix_hits == 6
    steps, same, _ = burst(False)        # without the prefix cache all go at once, as nothing is shared
    assert steps[0] == [("a", 14), ("b", 14), ("c", 14), ("x", 9)]


def test_a_prompt_waits_for_shared_blocks_only_while_their_prefill_runs():
    # chunked: b waits while a computes the 8 blocks they share, then computes only its own 2
    sched, _ = make(num_blocks=64, block_size=4, budget=16)
    shared = list(range(1, 33))
    a, b = seq("a", 0, tokens=shared + list(range(40, 48))), seq("b", 0, tokens=shared + list(range(60, 68)))
    sched.add(a)
    sched.add(b)
    assert chunk_sizes(run_step(sched)) == [("a", 16)]
    assert chunk_sizes(run_step(sched)) == [("a", 16)]
    out = run_step(sched)
    assert chunk_sizes(out) == [("a", 8), ("b", 8)] and out.chunks[1].start == 32 and b.num_cached_tokens == 32
    # the prefill it waits for is aborted before its blocks are registered: it computes them itself
    sched, _ = make(num_blocks=64, block_size=4, budget=64)
    a, b = seq("a", 0, tokens=shared + [40]), seq("b", 0, tokens=shared + [60])
    sched.add(a)
    sched.add(b)
    assert chunk_sizes(sched.schedule()) == [("a", 33)]
    sched.finish(a, "abort")
    out = run_step(sched)
    assert chunk_sizes(out) == [("b", 33)] and b.num_cached_tokens == 0
    # a prompt that owes prompt log-probabilities computes every position anyway: it does not wait
    sched, _ = make(num_blocks=64, block_size=4, budget=128)
    a, b = seq("a", 0, tokens=shared + [40]), seq("b", 0, tokens=shared + [60])
    b.prompt_logprobs = []
    sched.add(a)
    sched.add(b)
    assert chunk_sizes(run_step(sched)) == [("a", 33), ("b", 33)]


def test_block_manager_counts():
    bm = BlockManager(8, 4)
    s = seq("a", 9)
    bm.allocate(s, 9)
    assert (bm.num_free_blocks, bm.stats.allocated) == (5, 3)
    bm.free_seq(s)
    assert (bm.num_free_blocks, bm.stats.freed) == (8, 3)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(seq("b", 40), 40)


def chunk_sizes(out):
    return [(c.seq.request_id, c.num_tokens) for c in out.chunks]


def test_a_short_prompt_arriving_during_a_long_prefill_runs_in_the_next_step():
    sched, _ = make(num_blocks=256, budget=64)
    long = seq("long", 400)
    sched.add(long)
    assert chunk_sizes(run_step(sched)) == [("long", 64)]       # alone: the whole budget
    short = seq("short", 0, tokens=range(600, 610))      # nothing in common with the long prompt
    sched.add(short)
    out = run_step(sched)
    # the long prefill takes the cap (a quarter of the budget), the short prompt all of itself,
    # and the rest of the budget goes back to the long one: nothing is left unused
    assert chunk_sizes(out) == [("long", 54), ("short", 10)]
    assert short.output_ids == [7] and out.num_batched_tokens == 64


def test_two_long_prompts_share_the_budget_oldest_first():
    sched, _ = make(num_blocks=256, budget=64)
    a, b = seq("a", 300), seq("b", 0, tokens=range(5000, 5300))
    sched.add(a)
    sched.add(b)
    # both admitted in one step: each takes the cap (16), the 32 left go back to the older one
    assert chunk_sizes(run_step(sched)) == [("a", 48), ("b", 16)]
    assert chunk_sizes(run_step(sched)) == [("a", 48), ("b", 16)]   # two prefills running: still capped


def test_a_long_prompt_finishes_under_a_steady_stream_of_short_ones():
    sched, _ = make(num_blocks=1024, budget=64, max_seqs=64)
    long = seq("long", 400)
    sched.add(long)
    steps = 0
    while not long.output_ids:
        for k in range(3):                       # three new 20-token prompts every step
            sched.add(seq(f"s{steps}-{k}", 0, max_new=1, tokens=range(1000 + 20 * (3 * steps + k),
                                                                        1020 + 20 * (3 * steps + k))))
        run_step(sched)
        steps += 1
        assert steps <= -(-400 // 16)            # at least the cap (64 / 4) every step
    assert long.num_computed_tokens == 400


def test_at_most_max_partial_prefills_prompts_are_part_way_and_shorter_ones_pass_a_waiting_long_one():
    sched, _ = make(num_blocks=512, budget=64)       # max_partial_prefills 2 by default
    a, b, c = (seq(name, 0, tokens=range(base, base + 100)) for name, base in (("a", 1000), ("b", 2000), ("c", 3000)))
    d = seq("d", 0, tokens=range(4000, 4010))
    for s in (a, b, c, d):
        sched.add(s)
    # a and b start; c would be a third prompt part-way, so it keeps its place while d, which
    # finishes its prompt in this step, goes past it; the budget left goes back to a
    assert chunk_sizes(run_step(sched)) == [("a", 38), ("b", 16), ("d", 10)]
    assert [s.request_id for s in sched.waiting] == ["c"] and d.output_ids == [7]
    for step in (2, 3):
        out = run_step(sched)
        assert len([s for s in sched.running if s.num_remaining > 1]) <= 2
    # c started in step 3, the step a's prefill ended (a advanced by at least the cap each step)
    assert [ch.seq.request_id for ch in out.chunks if ch.start == 0] == ["c"]
    assert a.output_ids and not b.output_ids and c.num_computed_tokens > 0
    with pytest.raises(ValueError, match="max_partial_prefills"):
        SchedulerConfig(64, 8, max_partial_prefills=0)


def test_budget_the_bound_would_leave_unused_goes_to_a_prompt_passed_over():
    sched, _ = make(num_blocks=512, budget=64)
    a, b = seq("a", 0, tokens=range(1000, 1100)), seq("b", 0, tokens=range(2000, 2100))
    sched.add(a)
    sched.add(b)
    run_step(sched)
    a.num_computed_tokens = b.num_computed_tokens = 80          # 20 tokens left each
    c = seq("c", 0, tokens=range(3000, 3100))
    sched.add(c)
    # a and b take the cap each (two part-way: c is passed over), then the rest of their prompts
    # from the budget left; the 24 tokens still left go to c rather than stay unused
    assert chunk_sizes(run_step(sched)) == [("a", 20), ("b", 20), ("c", 24)]
    assert a.output_ids and b.output_ids and not sched.waiting


def test_a_configured_cap_and_no_cap_without_competition():
    bm = BlockManager(256, 4, True)
    sched = Scheduler(SchedulerConfig(64, 8, prefill_chunk_cap=8), bm)
    a = seq("a", 200)
    sched.add(a)
    assert chunk_sizes(run_step(sched)) == [("a", 64)]
    b = seq("b", 0, tokens=range(700, 800))
    sched.add(b)
    assert chunk_sizes(run_step(sched)) == [("a", 56), ("b", 8)]
    with pytest.raises(ValueError, match="prefill_chunk_cap"):
        SchedulerConfig(64, 8, prefill_chunk_cap=0)


def test_priority_orders_admission_and_equal_priorities_keep_arrival_order():
    sched, _ = make(num_blocks=64, budget=64, max_seqs=1)
    first, urgent, later = seq("first", 6, max_new=1), seq("urgent", 0, max_new=1, tokens=range(300, 306)), \
        seq("later", 0, max_new=1, tokens=range(400, 406))
    urgent.priority = -1
    for s in (first, later, urgent):
        sched.add(s)
    assert [s.request_id for s in sched.waiting] == ["urgent", "first", "later"]
    admitted = []
    while sched.has_unfinished:
        admitted += [c.seq.request_id for c in run_step(sched).chunks if c.start == 0]
    assert admitted == ["urgent", "first", "later"]


def test_preemption_takes_the_least_urgent_before_the_newest():
    sched, bm = make(num_blocks=5, block_size=4, budget=64)
    low, high = seq("low", 8, max_new=8), seq("high", 0, max_new=8, tokens=range(300, 308))
    low.priority, high.priority = 5, 0          # the older request is the less urgent one
    sched.add(low)
    sched.add(high)
    run_step(sched)                       # both prefilled: 2 blocks each, 1 free
    run_step(sched)                       # one more block needed by each: the low-priority one yields
    assert low.num_preemptions == 1 and high.num_preemptions == 0
    for _ in range(40):
        if not sched.has_unfinished:
            break
        run_step(sched)
    assert len(low.output_ids) == len(high.output_ids) == 8 and bm.num_free_blocks == 5
