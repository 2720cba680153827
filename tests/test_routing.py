"""Cache-aware routing across replicas: the router's policy on its own, then the application with
two replicas of each deployment on loopback (multi-turn conversations, a replica killed mid-load)."""

import asyncio
import os
import time
from types import SimpleNamespace

import pytest

from helpers import data_url, local_serve
from vlm_core.default_model.data import heldout_set
from vlm_core.engine.blocks import BlockManager, prompt_block_keys
from vlm_core.engine.request import EngineRequest
from vlm_core.engine.sampling import SamplingParams
from vlm_core.engine.sequence import Sequence
from vlm_core.inputs.placeholders import ImageSpan, MultimodalPrompt

pytestmark = pytest.mark.timeout(300)


def test_prompt_block_keys_are_the_prefix_cache_keys():
    prompt = MultimodalPrompt(tuple(range(100, 170)), (ImageSpan(10, 30),))
    seq = Sequence("a", prompt, [None], ("img-1",), SamplingParams(), 0)
    bm = BlockManager(64, 16)
    assert prompt_block_keys(prompt, ("img-1",), 16) == bm._hashes(seq, 70 // 16)
    # another picture behind the same text changes every key from its first block on, and only those
    other = prompt_block_keys(prompt, ("img-2",), 16)
    assert len(other) == 4 and other[0] != prompt_block_keys(prompt, ("img-1",), 16)[0]
    shorter = prompt_block_keys(MultimodalPrompt(prompt.token_ids[:40], prompt.spans), ("img-1",), 16)
    assert shorter == prompt_block_keys(prompt, ("img-1",), 16)[:2]       # a prefix keeps its keys


def make_router(imbalance=2):
    from ray.serve._private.common import DeploymentID

    from deployments.routing import CacheAffinityRouter

    r = CacheAffinityRouter.__new__(CacheAffinityRouter)        # the policy alone, without Serve's plumbing
    r._deployment_id = DeploymentID(name="LLMServer", app_name="vlm")
    r.initialize_state(keys="prompt_blocks", block_size=16, imbalance=imbalance, index_size=1000)
    return r


def replicas(*names):
    from ray.serve._private.common import DeploymentID, ReplicaID

    dep = DeploymentID(name="LLMServer", app_name="vlm")
    return [SimpleNamespace(replica_id=ReplicaID(unique_id=n, deployment_id=dep)) for n in names]


def pending(request, rid="r1"):
    return SimpleNamespace(args=["id", request, None], kwargs={}, metadata=SimpleNamespace(internal_request_id=rid))


def conversation(turn_tokens: int, image="pic"):
    return EngineRequest(MultimodalPrompt(tuple(range(200, 200 + turn_tokens)), (ImageSpan(2, 20),)), (),
                         SamplingParams(), (image,))


def choose(router, reps, req, loads, rid="r1"):
    async def loads_of(_replicas, _preferred=None, _bound=None):
        return {r.replica_id: loads[r.replica_id.unique_id] for r in _replicas}

    router._loads = loads_of
    ranks = asyncio.run(router.choose_replicas(reps, pending(req, rid)))
    router.on_request_routed(pending(req, rid), ranks[0][0].replica_id, None)
    return ranks[0][0].replica_id.unique_id


def test_rendezvous_choice_is_shared_by_routers_and_moves_only_with_its_replica():
    reps = replicas("a", "b", "c")
    live = {r.replica_id: r for r in reps}
    one, two = make_router(), make_router()
    keys = [prompt_block_keys(conversation(40, f"pic-{i}").prompt, (f"pic-{i}",), 16) for i in range(300)]
    first = [one.preferred(k, live)[0][0].unique_id for k in keys]
    assert first == [two.preferred(k, live)[0][0].unique_id for k in keys]   # no shared state needed
    assert {n: first.count(n) for n in "abc"} == pytest.approx({"a": 100, "b": 100, "c": 100}, abs=30)
    without_b = {r.replica_id: r for r in reps if r.replica_id.unique_id != "b"}
    moved = [one.preferred(k, without_b)[0][0].unique_id for k in keys]
    assert all(m == f for m, f in zip(moved, first) if f != "b")           # only b's keys move
    assert set(m for m, f in zip(moved, first) if f == "b") == {"a", "c"}


def test_a_next_turn_follows_its_cached_prefix_and_the_load_bound_overrides_it():
    reps = replicas("a", "b")
    router = make_router(imbalance=2)
    turn1, turn2 = conversation(40), conversation(90)       # turn 2 starts with turn 1's tokens
    home = choose(router, reps, turn1, {"a": 0, "b": 0})
    other = "b" if home == "a" else "a"
    assert choose(router, reps, turn2, {"a": 0, "b": 0}, "r2") == home
    # sent home, its queue would be 2 above the other's: within the bound; 3 would be past it
    assert choose(router, reps, conversation(120), {home: 1, other: 0}, "r3") == home
    assert choose(router, reps, conversation(150), {home: 2, other: 0}, "r4") == other
    from deployments.metrics import routing_decisions

    assert routing_decisions()["LLMServer"]["load"] >= 1 and routing_decisions()["LLMServer"]["cached"] >= 2
    # the conversation's next turn now follows the blocks it left on the other replica
    assert choose(router, reps, conversation(170), {"a": 0, "b": 0}, "r5") == other
    # the blocks it shares with the earlier turns are held by both replicas now: a request sharing
    # only those goes to the less loaded one (a hot prefix, once moved, costs no imbalance)
    assert choose(router, reps, conversation(125), {home: 3, other: 5}, "r5b") == home
    assert choose(router, reps, conversation(126), {home: 5, other: 3}, "r5c") == other
    # a key remembers its latest holders, a bounded number of them
    from deployments.routing import MAX_HOLDERS

    many = [r.replica_id for r in replicas(*(f"h{i}" for i in range(MAX_HOLDERS + 3)))]
    for rid in many:
        router._index_keys([b"hot"], rid)
    assert router._index[b"hot"] == many[::-1][:MAX_HOLDERS]
    # a replica that is gone is passed over: its conversations go to the one left
    assert choose(router, [r for r in reps if r.replica_id.unique_id == home], conversation(190),
                  {home: 0}, "r6") == home


def test_a_request_with_nothing_cached_yields_at_half_the_bound():
    reps = replicas("a", "b")
    live = {r.replica_id: r for r in reps}
    router = make_router(imbalance=4)
    cold = conversation(40, "cold-pic")
    home = router.preferred(prompt_block_keys(cold.prompt, ("cold-pic",), 16), live)[0][0].unique_id
    other = "b" if home == "a" else "a"
    assert choose(make_router(imbalance=4), reps, cold, {home: 1, other: 0}) == home     # 2 above: within 4 // 2
    assert choose(make_router(imbalance=4), reps, cold, {home: 2, other: 0}) == other    # 3 above: past it
    assert choose(make_router(imbalance=4), reps, cold, {home: 3, other: 3}) == home     # never for equal queues
    assert choose(make_router(imbalance=0), reps, cold, {home: 3, other: 3}) == home
    # once its first turn is indexed, its next turn has a cached prefix and the whole bound
    assert choose(router, reps, cold, {home: 0, other: 0}) == home
    assert choose(router, reps, conversation(80, "cold-pic"), {home: 3, other: 0}, "r2") == home


def test_the_router_decides_on_its_own_figures_and_waits_for_answers_only_near_the_bound():
    from deployments.metrics import routing_probes

    reps = replicas("a", "b")
    a, b = (r.replica_id for r in reps)
    router = make_router(imbalance=8)
    router._use_replica_queue_len_cache = False           # Serve's part of on_send_request is not under test
    asked = []

    async def probe(replicas_, backoff):                  # Serve's probe: the replicas' answers go to the cache
        asked.append(len(replicas_))
        await asyncio.sleep(0.01)
        answers = [(r, {"a": 9, "b": 1}[r.replica_id.unique_id]) for r in replicas_]   # the others' sends too
        router._replica_queue_len_cache.update({r.replica_id: q for r, q in answers})
        return answers

    async def loads(preferred, bound, settle=False):
        got = await router._loads(reps, [preferred], bound)
        if settle and router._refreshing is not None:
            await router._refreshing
        return got

    router._probe_queue_lens = probe
    router._replica_queue_len_cache = {a: 6, b: 2}        # the replicas' last answers and this router's sends
    router._asked_at = time.monotonic()
    before = routing_probes().get("LLMServer", 0)
    assert asyncio.run(loads(a, 8)) == {a: 6, b: 2} and not asked                # 4 above: within 8 // 2
    # past 4 // 2 the bound may decide: the replicas are asked and their answers (which count
    # what other routers sent) decide
    assert asyncio.run(loads(a, 4)) == {a: 9, b: 1} and asked == [2]
    router._replica_queue_len_cache = {a: 3, b: 3}
    assert asyncio.run(loads(a, 8)) == {a: 3, b: 3} and asked == [2]             # asked just now: not again
    router._asked_at = time.monotonic() - 2                                       # asked over refresh_s ago:
    assert asyncio.run(loads(a, 8, settle=True)) == {a: 3, b: 3} and asked == [2, 2]   # in the background
    # replicas slower than Serve's first deadline: the request goes on its figures, the answers
    # still come to the cache for the next one
    async def slow_probe(replicas_, backoff):
        await asyncio.sleep(router.queue_len_response_deadline_s * 3)
        return await probe(replicas_, backoff)

    async def slow_answers():
        router._replica_queue_len_cache = {a: 6, b: 2}
        got = await router._loads(reps, [a], 4)
        await router._refreshing
        return got

    router._probe_queue_lens = slow_probe

    assert asyncio.run(slow_answers()) == {a: 6, b: 2} and router._replica_queue_len_cache == {a: 9, b: 1}
    router._probe_queue_lens = probe
    router._replica_queue_len_cache = {a: 1}              # a replica without a figure: asked, and waited for
    assert asyncio.run(loads(a, 8)) == {a: 1, b: 1} and asked == [2, 2, 2, 1]
    assert routing_probes()["LLMServer"] == before + 4
    # a request chosen for a replica counts in its queue until Serve sends it
    router._decided(pending(conversation(40), "u1"), [b"k"], a, "hashed")
    router._asked_at = time.monotonic()
    assert asyncio.run(loads(a, 8)) == {a: 2, b: 1}
    router.on_send_request(a)
    assert asyncio.run(loads(a, 8)) == {a: 1, b: 1}


def test_a_burst_waiting_on_its_probes_counts_what_the_router_chose_meanwhile():
    """Twelve cached-prefix requests arrive together and all wait on their probes, which answer
    with the same queues: each still sees the ones chosen and not yet sent before it, so the load
    bound holds."""
    reps = replicas("a", "b")
    router = make_router(imbalance=4)
    turn1 = conversation(40)
    home = choose(router, reps, turn1, {"a": 0, "b": 0})
    del router._loads                                       # the router's own, from here on

    async def probe(replicas_, backoff):
        await asyncio.sleep(0.01)
        return [(r, 0) for r in replicas_]                  # nothing reached the replicas yet

    router._probe_queue_lens = probe
    router._replica_queue_len_cache = {}

    async def burst():
        return await asyncio.gather(*(router.choose_replicas(reps, pending(conversation(60 + i), f"b{i}"))
                                      for i in range(12)))

    chosen = [ranks[0][0].replica_id.unique_id for ranks in asyncio.run(burst())]
    assert abs(chosen.count("a") - chosen.count("b")) <= 4 + 1
    assert chosen[0] == home and chosen.count(home) >= 6       # affinity kept as far as the bound allows


def test_requests_without_keys_get_two_choices():
    reps = replicas("a", "b", "c")
    router = make_router()
    short = EngineRequest(MultimodalPrompt(tuple(range(10)), ()), (), SamplingParams())
    ranks = asyncio.run(router.choose_replicas(reps, pending(short)))
    assert len(ranks) == 1 and len(ranks[0]) == 2 and len({r.replica_id for r in ranks[0]}) == 2


def test_a_replica_dying_mid_stream_is_continued_on_another():
    """LLMStream on a fake deployment whose replica dies after two outputs: the rest comes from the
    request's prompt and the tokens produced so far, with the request's own counts."""
    from ray.exceptions import ActorDiedError

    from deployments.ingress import RayLLM        # the Serve client (its import registers Ray's actor death)
    from deployments.serving import LLMStream, continues_exactly
    from vlm_core.engine.request import RequestOutput

    sent = []

    class Stream:
        def __init__(self, request, die_after):
            self.request, self.die_after, self.n = request, die_after, 0

        def __aiter__(self):
            return self

        async def __anext__(self):
            if self.n == self.die_after:
                raise ActorDiedError()
            if self.n == self.request.params.max_new_tokens:
                raise StopAsyncIteration
            self.n += 1
            done = self.n == self.request.params.max_new_tokens
            token = len(self.request.prompt.token_ids) + self.n - 1        # the position it is made at
            return RequestOutput("r", "", [token], "length" if done else None,
                                 len(self.request.prompt.token_ids), self.n, 16)

        def cancel(self):
            pass

    class Method:
        def remote(self, rid, request, embeds):
            sent.append(request)
            return Stream(request, 2 if len(sent) == 1 else 99)

    class Handle:
        def options(self, stream):
            return SimpleNamespace(generate=Method())

    request = EngineRequest(MultimodalPrompt(tuple(range(30)), ()), (), SamplingParams(max_new_tokens=5, min_tokens=3))
    assert continues_exactly(request.params)

    async def run():
        return [o async for o in LLMStream(RayLLM(Handle()), "r", request, None)]

    outs = asyncio.run(run())
    assert [t for o in outs for t in o.token_ids] == [30, 31, 32, 33, 34]      # nothing lost, nothing twice
    assert [o.completion_tokens for o in outs] == [1, 2, 3, 4, 5] and outs[-1].finish_reason == "length"
    assert {o.prompt_tokens for o in outs} == {30} and {o.cached_tokens for o in outs} == {16}
    again = sent[1]
    assert again.prompt.token_ids == tuple(range(32)) and again.params.max_new_tokens == 3
    assert again.params.min_tokens == 1
    # a request whose rest depends on what it generated is not continued: the error stands
    for params in (SamplingParams(n=2), SamplingParams(stop=("x",)), SamplingParams(presence_penalty=0.5),
                   SamplingParams(temperature=0.7, seed=3)):
        assert not continues_exactly(params)
    sent.clear()
    stops = EngineRequest(request.prompt, (), SamplingParams(max_new_tokens=5, stop=("x",)))
    with pytest.raises(ActorDiedError):
        asyncio.run(_collect(LLMStream(RayLLM(Handle()), "r", stops, None)))
    assert len(sent) == 1


async def _collect(stream):
    return [o async for o in stream]


# ---- the application, two replicas of each deployment ----------------------------------------

async def stream_chunks(http, base: str, messages, max_tokens: int):
    """The parsed chunks of a streamed chat completion (greedy, `max_tokens` tokens, usage last);
    the stream must open with 200 and carry no error."""
    import json

    body = {"messages": messages, "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    async with http.stream("POST", base + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                yield chunk


async def until(done, tasks, timeout_s: float = 90):
    """Waits until `done()` holds; a task that fails first raises its error at once."""
    deadline = time.monotonic() + timeout_s
    while not done():
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()
        assert time.monotonic() < deadline, f"not done within {timeout_s} s"
        await asyncio.sleep(0.005)


@pytest.fixture(scope="module")
def two_of_each():
    from deployments.app import DEPLOYMENTS

    two = {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2}}
    with local_serve({"deployments": {d: two for d in DEPLOYMENTS}}) as url:
        yield url


def replica_stats(deployment: str, count: int = 2, pids=(), timeout_s: float = 30) -> dict[int, dict]:
    """stats() of `count` replicas of a deployment (or of those in processes `pids`), by pid: stats
    calls carry no routing keys, so they take the less busy of two replicas (either, when both are
    idle); call until all have answered."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, "vlm")
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s

    def done():
        return set(pids) <= set(seen) if pids else len(seen) >= count

    while not done() and time.monotonic() < deadline:
        st = handle.stats.remote().result(timeout_s=30)
        seen[st["pid"]] = st
    assert done(), f"{deployment} stats answered from processes {sorted(seen)}"
    return seen


def turn_messages(scene, asked):
    """The conversation so far: the picture with the first question, then each answer and question."""
    msgs = []
    for i, (q, a) in enumerate(asked):
        content = [{"type": "image_url", "image_url": {"url": data_url(scene.image())}},
                   {"type": "text", "text": q}] if i == 0 else q
        msgs.append({"role": "user", "content": content})
        if a is not None:
            msgs.append({"role": "assistant", "content": a})
    return msgs


def test_turns_of_image_conversations_find_their_prefix_and_pictures_cached(two_of_each):
    """16 three-turn image conversations, turns interleaved across conversations (four at a time)
    through two Ingress replicas: each next turn finds the previous turn's whole prompt blocks in
    the prefix cache of the replica it lands on, and its picture in the encoder cache."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from vlm_core.default_model.data import questions

    client = OpenAI(base_url=two_of_each + "/v1", api_key="unused", timeout=120, max_retries=0)
    scenes = [s for s, _, _ in heldout_set(16, seed=41)]
    asked = [[[q, None]] for q, _ in (questions(s)[0] for s in scenes)]
    vision_before = replica_stats("VisionEncoder")
    prompt_tokens = [[] for _ in scenes]
    cached = [[] for _ in scenes]

    def turn(i):
        r = client.chat.completions.create(model="vlm-serve-default", temperature=0, max_tokens=8,
                                           messages=turn_messages(scenes[i], asked[i]))
        asked[i][-1][1] = r.choices[0].message.content
        prompt_tokens[i].append(r.usage.prompt_tokens)
        cached[i].append(r.usage.prompt_tokens_details.cached_tokens)

    with ThreadPoolExecutor(4) as pool:
        for t in range(3):
            list(pool.map(turn, range(16)))
            if t < 2:
                for i, s in enumerate(scenes):
                    asked[i].append([questions(s)[(t + 1) % len(questions(s))][0], None])
    # of the previous turn's prompt, in whole blocks, what the next turn found cached
    whole = sum(p // 16 * 16 for ps in prompt_tokens for p in ps[:2])
    found = sum(c for cs in cached for c in cs[1:])
    print(f"turns 2-3 found {found} of {whole} previous-prompt tokens in whole blocks cached ({found / whole:.0%})")
    assert found >= 0.9 * whole
    vision_after = replica_stats("VisionEncoder")
    hits = sum(vision_after[p]["hits"] - vision_before[p]["hits"] for p in vision_after)
    print(f"encoder cache hits on turns 2-3: {hits} of 32")
    assert hits >= 0.9 * 32
    llm = replica_stats("LLMServer")
    assert all(st["requests"] > 0 for st in llm.values())                  # both replicas served
    assert all(0 <= st["cached_prompt_tokens"] <= st["prompt_tokens"] for st in llm.values())
    # every Ingress replica counted its routing decisions (no load fallback was needed here)
    routing = [st["routing"] for st in replica_stats("Ingress").values()]
    decided = sum(n for r in routing for n in r.get("LLMServer", {}).values())
    assert decided == 48 and not any(r.get("LLMServer", {}).get("load") for r in routing)
    assert sum(n for r in routing for n in r.get("VisionEncoder", {}).values()) == 48


def test_a_hot_conversation_fills_one_replica_only_up_to_the_imbalance(two_of_each):
    """24 next turns of one hot conversation and 8 cold questions, sent 40 ms apart through two
    Ingress replicas, kept in flight (150 tokens each). By affinity alone all 24 would go to
    one replica; the load bound moves one once that replica is `imbalance` ahead, and from then
    on both hold the hot prefix. Once every request has its first token, the two LLMServer
    replicas' queues (what the load bound reads) differ by at most the imbalance, and the hot
    turns found their shared prefix cached wherever they went. On a slow box the first streams
    may end before the last has its first token; with at least 28 still in flight, affinity
    alone would leave a gap of at least 20 - 8 = 12, so the reading still tells the bound apart."""
    import httpx
    import ray
    from ray.util import list_named_actors

    from deployments.settings import RoutingSettings
    from vlm_core.default_model.data import questions

    imbalance = RoutingSettings().imbalance
    hot, *cold = [s for s, _, _ in heldout_set(9, seed=47)]
    hot_qs = [q for q, _ in questions(hot)]
    items = []
    for k in range(32):
        if k % 4 == 3:
            items.append(turn_messages(cold[k // 4], [[questions(cold[k // 4])[0][0], None]]))
        else:
            items.append(turn_messages(hot, [[hot_qs[0], "yes"], [hot_qs[k % len(hot_qs)], None]]))
    actors = [ray.get_actor(e["name"], namespace=e["namespace"]) for e in list_named_actors(all_namespaces=True)
              if "#LLMServer#" in e["name"]]
    assert len(actors) == 2
    loads_before = sum(st["routing"].get("LLMServer", {}).get("load", 0) for st in replica_stats("Ingress").values())
    started = set()
    usage = {}

    async def one(http, k, messages, delay):
        await asyncio.sleep(delay)
        async for chunk in stream_chunks(http, two_of_each, messages, 150):
            if chunk["choices"]:
                started.add(k)
            if chunk.get("usage"):
                usage[k] = chunk["usage"]

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            tasks = [asyncio.create_task(one(http, i, m, 0.04 * i)) for i, m in enumerate(items)]
            await until(lambda: len(started) == len(items), tasks)
            queues = sorted(await asyncio.gather(*(a.get_num_ongoing_requests.remote() for a in actors)))
            await asyncio.gather(*tasks)
            return queues

    low, high = asyncio.run(main())
    print(f"queues with 24 hot + 8 cold requests in flight: {low} and {high} (imbalance {imbalance})")
    assert low + high >= 28 and high - low <= imbalance
    loads_after = sum(st["routing"].get("LLMServer", {}).get("load", 0) for st in replica_stats("Ingress").values())
    assert loads_after > loads_before                   # the bound moved some of its turns
    hot_usage = [usage[k] for k in range(32) if k % 4 != 3]
    shared = min(u["prompt_tokens"] for u in hot_usage) // 16 * 16 - 16     # less a block for the follow-up
    found = sum(u["prompt_tokens_details"]["cached_tokens"] >= shared for u in hot_usage)
    print(f"hot turns that found the shared {shared}-token prefix cached: {found} of 24 "
          f"({[u['prompt_tokens_details']['cached_tokens'] for u in hot_usage]})")
    assert found >= 24 - 4      # all but the first on each replica and those that came while it was prefilled


def test_killing_an_llm_replica_mid_load_moves_its_conversations(two_of_each):
    """Eight streams in flight on two LLMServer replicas; the busier replica is killed once every
    stream has tokens. Its streams go on from their tokens on the other replica and every one ends
    with all its tokens; each conversation's next turn completes too."""
    import httpx
    import ray
    from ray.util import list_named_actors

    from vlm_core.default_model.data import questions

    scenes = [s for s, _, _ in heldout_set(8, seed=43)]
    first_q = [questions(s)[0][0] for s in scenes]
    started: set[int] = set()
    max_tokens = 150

    async def stream(http, messages, i=None, tokens=max_tokens):
        text, usage, finish = "", None, None
        async for chunk in stream_chunks(http, two_of_each, messages, tokens):
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content") or ""
                finish = chunk["choices"][0].get("finish_reason") or finish
                if i is not None and text:
                    started.add(i)
        return text, usage, finish

    def kill_busiest():
        """Kills the replica with the most requests in flight (read from the replica actors, as a
        stats call, carrying no routing keys, is routed to the less busy one); returns that count
        and the survivor's process id."""
        actors = [ray.get_actor(e["name"], namespace=e["namespace"]) for e in list_named_actors(all_namespaces=True)
                  if "#LLMServer#" in e["name"]]
        assert len(actors) == 2
        ongoing = ray.get([a.get_num_ongoing_requests.remote() for a in actors])
        pids = ray.get([a.__ray_call__.remote(lambda _self: os.getpid()) for a in actors])
        busiest = max(range(2), key=ongoing.__getitem__)
        ray.kill(actors[busiest], no_restart=True)
        return ongoing[busiest], pids[1 - busiest]

    before = replica_stats("LLMServer")        # idle: stats calls reach both replicas

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            tasks = [asyncio.create_task(stream(http, turn_messages(s, [(q, None)]), i))
                     for i, (s, q) in enumerate(zip(scenes, first_q))]
            await until(lambda: len(started) == len(tasks), tasks)
            cut, survivor = await asyncio.to_thread(kill_busiest)
            first = await asyncio.gather(*tasks)
            second = await asyncio.gather(*(
                stream(http, turn_messages(s, [(q, " ".join(text.split()[:4])), ("How many shapes are there?", None)]),
                       tokens=8)
                for s, q, (text, _, _) in zip(scenes, first_q, first)))
            return cut, survivor, first, second

    cut, survivor, first, second = asyncio.run(main())
    assert cut >= 1                                              # streams were on the killed replica
    for (text, usage, finish), tokens in [(f, max_tokens) for f in first] + [(s, 8) for s in second]:
        assert finish == "length" and usage["completion_tokens"] == tokens and text
    # the survivor served its own first turns, the rest of the cut ones, and every second turn
    after = replica_stats("LLMServer", count=1, pids=[survivor])
    assert after[survivor]["requests"] - before[survivor]["requests"] >= 16
