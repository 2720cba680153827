"""End-to-end serving benchmark: the Serve application over HTTP vs the in-process engine, and
routing across replicas.

    python bench/serve.py [--model DIR] [--concurrency 1 8 32] [--requests 48] [--max-tokens 32]
                          [--out bench/results/serve-<device>.json]
    python bench/serve.py --multi-turn [--conversations 16] [--blocks 16] [--block-requests 256] [--rounds 3]
                          [--out bench/results/routing-<device>.json]

Both sides run the same requests (one distinct held-out picture + question each, greedy,
`max_tokens` tokens with EOS ignored so every request produces the same number of tokens):

- in-process: image preprocessing, the vision tower and `AsyncLLMEngine` in this process,
  what `VLM` users get;
- HTTP: `serve_config.yaml`'s application (its args and engine settings) on a local Ray
  instance on loopback, streamed through the OpenAI endpoint with SSE.

For each concurrency level (that many clients, each sending its next request when the last
one finishes) it reports requests/s, end-to-end latency, time to first token (TTFT) and time
per output token after the first (TPOT) at p50/p90, and Serve's p50 latency overhead. Writes
the table, a JSON file and a PNG (with matplotlib, `pip install -e '.[bench]'`) beside it.

--multi-turn runs the application twice side by side on one Ray instance, with two replicas of
each deployment: once with Serve's default router (power of two choices, at /power_of_two) and
once with the cache-aware one (`llm.routing`, `vision.routing`, at /cache_affinity). It measures:
- conversations: `--conversations` three-turn image conversations, turns interleaved across
  conversations (four clients): the share of the previous turn's prompt, in whole blocks, that
  turns 2-3 find in the prefix cache (`usage.prompt_tokens_details.cached_tokens`), and the
  encoder-cache hits of their pictures;
- skewed load, `--blocks` blocks of `--block-requests` requests of 16 tokens each, half of them
  next turns of one hot conversation (one picture, one first exchange, different follow-up
  questions), half single questions about distinct pictures, each block with its own hot
  conversation and pictures. Both applications serve a block at the same time, each from its
  own 16 clients, so a change of the machine's speed (on a small shared box it varies by more
  than the routers differ, from one minute or one Ray start to the next) hits both alike, and
  an application whose routing costs more work or leaves a replica idle loses its share of the
  machine to the other. Counted until the first one has sent its last request: requests/s,
  TTFT, the difference between its two LLM replicas' queues (Serve's count of ongoing
  requests, what the load bound uses), read from both together every 20 ms (and the largest gap
  held for 100 ms: a replica that ends several requests in one step drops its queue for a
  moment whatever routed them), how often one replica had nothing in flight, and the Ingresses'
  routing decisions and queue probes. The throughput ratio of the two routers is the geometric
  mean of the blocks' ratios, with a 95% bootstrap interval;
- held-open skew, `--rounds` times on each, one at a time: 32 requests of 150 tokens, three in
  four extending a hot conversation new to the replicas, sent 40 ms apart; once all have their
  first token (all routed, none ended) the two LLM replicas' queues, whose gap the load bound
  keeps within `imbalance`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Timing:
    latency: float
    ttft: float
    tpot: float | None
    tokens: int


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def workload(n: int, offset: int):
    """n (PNG bytes, question) pairs from distinct held-out pictures."""
    import random

    from vlm_core.default_model.data import make_scene, sample_qa, split_ids

    rng = random.Random(offset)
    out = []
    for i in split_ids("heldout", n, offset=offset):
        scene = make_scene(i)
        q, _ = sample_qa(scene, rng)
        out.append((png_bytes(scene), q))
    return out


async def run_clients(concurrency: int, items, one) -> tuple[list[Timing], float]:
    queue = list(items)
    timings: list[Timing] = []

    async def client():
        while queue:
            item = queue.pop()
            timings.append(await one(item))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return timings, time.perf_counter() - start


def timing(start: float, first: float | None, last: float, tokens: int) -> Timing:
    first = first if first is not None else last
    return Timing(last - start, first - start, (last - first) / (tokens - 1) if tokens > 1 else None, tokens)


# ---- in-process -------------------------------------------------------------------------------

class InProcess:
    def __init__(self, model_dir: str, engine_args: dict, max_tokens: int):
        from vlm_core.engine.engine import AsyncLLMEngine, EngineConfig
        from vlm_core.engine.sampling import SamplingParams
        from vlm_core.vlm import VLM

        self.vlm = VLM.from_pretrained(model_dir, fuse_projections=True)
        self.engine = AsyncLLMEngine(self.vlm.engine(EngineConfig(**engine_args)))
        self.params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(self, item) -> Timing:
        png, question = item
        start = time.perf_counter()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        # what the ingress and the vision replica do, off the event loop as there
        req = await asyncio.to_thread(self.vlm.request, messages, {"image": [png]}, self.params)
        first, tokens = None, 0
        async for out in self.engine.generate(uuid.uuid4().hex, req):
            if out.token_ids and first is None:
                first = time.perf_counter()
            tokens += len(out.token_ids)
        return timing(start, first, time.perf_counter(), tokens)


# ---- HTTP -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_apps(config: str, apps: dict[str | None, dict], num_cpus: int | None = None) -> dict[str | None, str]:
    """A local Ray instance with Serve on loopback, running the config's application once per
    entry of `apps` (name -> overrides of its args; None: under the config's own name and route
    prefix, a name: under that name at /<name>). Returns each one's base URL."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.app import app_from_config

    ray.init(num_cpus=num_cpus, include_dashboard=False, address="local", log_to_driver=False)
    port = free_port()      # after Ray's own processes have bound theirs
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    bases = {}
    for name, overrides in apps.items():
        app_name, prefix, app = app_from_config(config, overrides)
        if name is not None:
            app_name, prefix = name, "/" + name
        serve.run(app, name=app_name, route_prefix=prefix, blocking=False)
        bases[name] = f"http://127.0.0.1:{port}" + prefix.rstrip("/")
    return bases


def start_serve(config: str, overrides: dict, num_cpus: int | None = None) -> str:
    return start_apps(config, {None: overrides}, num_cpus)[None]


async def sse_chunks(http, url: str, body: dict):
    """The JSON chunks of one streamed request; an HTTP error or an error event raises."""
    async with http.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            yield chunk


class OverHTTP:
    def __init__(self, base: str, model_name: str, max_tokens: int):
        import httpx

        self.url = base + "/v1/chat/completions"
        self.model_name, self.max_tokens = model_name, max_tokens
        self.http = httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=256))

    async def one(self, item) -> Timing:
        png, question = item
        start = time.perf_counter()
        body = {"model": self.model_name, "temperature": 0, "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
                    {"type": "text", "text": question}]}]}
        first, tokens = None, 0
        async for chunk in sse_chunks(self.http, self.url, body):
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content") is not None \
                    and chunk["choices"][0]["delta"].get("role") is None:
                first = time.perf_counter()
        return timing(start, first, time.perf_counter(), tokens)


# ---- report -----------------------------------------------------------------------------------

def summarize(timings: list[Timing], wall: float) -> dict:
    tpots = [t.tpot for t in timings if t.tpot is not None]
    return {"requests": len(timings), "wall_s": wall, "requests_per_s": len(timings) / wall,
            "output_tokens_per_s": sum(t.tokens for t in timings) / wall,
            "tokens_per_request": statistics.mean(t.tokens for t in timings),
            **{f"latency_p{int(q * 100)}_ms": 1e3 * percentile([t.latency for t in timings], q) for q in (0.5, 0.9)},
            **{f"ttft_p{int(q * 100)}_ms": 1e3 * percentile([t.ttft for t in timings], q) for q in (0.5, 0.9)},
            **{f"tpot_p{int(q * 100)}_ms": 1e3 * percentile(tpots, q) for q in (0.5, 0.9)}}


def table(rows: list[dict]) -> str:
    cols = ["mode", "conc", "req/s", "lat p50", "lat p90", "TTFT p50", "TTFT p90", "TPOT p50", "TPOT p90"]
    lines = [" | ".join(f"{c:>9}" for c in cols)]
    for r in rows:
        vals = [r["mode"], r["concurrency"], f"{r['requests_per_s']:.2f}"] + [
            f"{r[k]:.1f}" for k in ("latency_p50_ms", "latency_p90_ms", "ttft_p50_ms", "ttft_p90_ms",
                                    "tpot_p50_ms", "tpot_p90_ms")]
        lines.append(" | ".join(f"{v:>9}" for v in vals))
    return "\n".join(lines) + "\n(times in ms)"


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for mode, style in (("in-process", "o-"), ("http", "s--")):
        rs = [r for r in rows if r["mode"] == mode]
        conc = [r["concurrency"] for r in rs]
        axes[0].plot(conc, [r["requests_per_s"] for r in rs], style, label=mode)
        axes[1].plot(conc, [r["ttft_p50_ms"] for r in rs], style, label=mode)
        axes[2].plot(conc, [r["tpot_p50_ms"] for r in rs], style, label=mode)
    for ax, name in zip(axes, ("requests/s", "TTFT p50 (ms)", "TPOT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# ---- routing across replicas (--multi-turn) ---------------------------------------------------

def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def conversation_messages(png: bytes, exchanges: list[tuple[str, str | None]]) -> list[dict]:
    msgs = []
    for i, (q, a) in enumerate(exchanges):
        content = [{"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": q}] \
            if i == 0 else q
        msgs.append({"role": "user", "content": content})
        if a is not None:
            msgs.append({"role": "assistant", "content": a})
    return msgs


POLICIES = ("power_of_two", "cache_affinity")     # Serve's default router, the cache-aware one


def replica_stats(deployment: str, app: str, count: int = 2) -> dict[int, dict]:
    """stats() of each replica (keyless calls reach replicas at random: call until all answered)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app)
    seen: dict[int, dict] = {}
    for _ in range(200):
        st = handle.stats.remote().result(timeout_s=30)
        seen[st["pid"]] = st
        if len(seen) == count:
            break
    return seen


async def chat(http, url: str, messages: list[dict], max_tokens: int,
               ignore_eos: bool = False) -> tuple[dict, float, float]:
    """(usage and answer, TTFT, latency) of one streamed request."""
    body = {"model": "vlm-serve-default", "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "messages": messages, "ignore_eos": ignore_eos}
    start, first, text, usage = time.perf_counter(), None, "", None
    async for chunk in sse_chunks(http, url, body):
        if chunk.get("usage"):
            usage = chunk["usage"]
        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter()
            text += chunk["choices"][0]["delta"]["content"]
    end = time.perf_counter()
    return {**usage, "answer": text}, (first or end) - start, end - start


def png_bytes(scene) -> bytes:
    buf = io.BytesIO()
    scene.image().save(buf, "PNG")
    return buf.getvalue()


async def conversations(base: str, app: str, n: int) -> dict:
    import httpx

    from vlm_core.default_model.data import make_scene, questions, split_ids

    scenes = [make_scene(i) for i in split_ids("heldout", n, offset=51000)]
    pngs = [png_bytes(s) for s in scenes]
    asked = [[(questions(s)[0][0], None)] for s in scenes]
    prompts, cached = [[] for _ in scenes], [[] for _ in scenes]
    before = await asyncio.to_thread(replica_stats, "VisionEncoder", app)
    async with httpx.AsyncClient(timeout=300) as http:
        for turn in range(3):
            queue = list(range(n))

            async def client():
                while queue:
                    i = queue.pop(0)
                    usage, _, _ = await chat(http, base + "/v1/chat/completions", conversation_messages(pngs[i], asked[i]), 8)
                    asked[i][-1] = (asked[i][-1][0], usage["answer"])
                    prompts[i].append(usage["prompt_tokens"])
                    cached[i].append(usage["prompt_tokens_details"]["cached_tokens"])

            await asyncio.gather(*(client() for _ in range(4)))
            for i, s in enumerate(scenes):
                qs = questions(s)
                asked[i].append((qs[(turn + 1) % len(qs)][0], None))
    after = await asyncio.to_thread(replica_stats, "VisionEncoder", app)
    whole = sum(p // 16 * 16 for ps in prompts for p in ps[:2])
    found = sum(c for cs in cached for c in cs[1:])
    hits = sum(after[p]["hits"] - before.get(p, {"hits": 0})["hits"] for p in after)
    return {"conversations": n, "previous_prompt_tokens_in_whole_blocks": whole, "found_cached": found,
            "cached_share": found / whole, "encoder_hits_turns_2_3": hits, "encoder_lookups_turns_2_3": 2 * n}


def replica_actors(deployment: str, app: str) -> list:
    import ray
    from ray.util import list_named_actors

    return [ray.get_actor(e["name"], namespace=e["namespace"]) for e in list_named_actors(all_namespaces=True)
            if e["name"].split("::")[-1].startswith(f"{app}#{deployment}#")]


def replica_pids(app: str) -> dict[str, list[int]]:
    return {d: sorted(replica_stats(d, app)) for d in ("Ingress", "VisionEncoder", "LLMServer")}


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU time (user + system) each deployment's replica processes have used, by deployment."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for deployment, ps in pids.items():
        fields = [Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split() for pid in ps]
        out[deployment] = sum(int(f[11]) + int(f[12]) for f in fields) / tick
    return out


def routing_counts(app: str) -> dict:
    """Routing decisions and queue probes for LLMServer, summed over the Ingress replicas."""
    decisions: dict[str, int] = {}
    probes = 0
    for st in replica_stats("Ingress", app).values():
        for decision, n in st["routing"].get("LLMServer", {}).items():
            decisions[decision] = decisions.get(decision, 0) + n
        probes += st["routing_probes"].get("LLMServer", 0)
    return {"decisions": decisions, "probes": probes}


def skewed_messages(requests: int, hot_every: int = 2, block: int = 0) -> list[list[dict]]:
    """Every `hot_every`-th request a next turn of one hot conversation (one picture, one first
    exchange, different follow-up questions), the others single questions about distinct pictures.
    Each `block` has its own hot conversation and pictures."""
    from vlm_core.default_model.data import make_scene, questions, split_ids

    hot = make_scene(next(iter(split_ids("heldout", 1, offset=52000 + block))))
    hot_png, hot_qs = png_bytes(hot), [q for q, _ in questions(hot)]
    cold = [make_scene(i) for i in split_ids("heldout", requests, offset=60000 + block * requests)]
    items, turns = [], 0
    for k in range(requests):
        if k % hot_every != hot_every - 1:
            items.append(conversation_messages(hot_png, [(hot_qs[0], "yes"), (hot_qs[turns % len(hot_qs)], None)]))
            turns += 1
        else:
            items.append(conversation_messages(png_bytes(cold[k]), [(questions(cold[k])[0][0], None)]))
    return items


async def replica_queues(actors) -> list[int]:
    """Serve's count of each replica's ongoing requests (what the load bound uses), read together."""
    return list(await asyncio.gather(*(a.get_num_ongoing_requests.remote() for a in actors)))


async def held_skew(base: str, app: str, imbalance: int, block: int, requests: int = 32,
                    max_tokens: int = 150) -> dict:
    """Requests that stay in flight: three in four extend a hot conversation new to the replicas,
    sent 40 ms apart, each making `max_tokens` tokens. Once every one has its first token (all
    routed, none ended), the two LLM replicas' queues show where the router put them: without the
    load bound the hot ones would all be on one replica."""
    import httpx

    items = skewed_messages(requests, hot_every=4, block=block)
    actors = await asyncio.to_thread(replica_actors, "LLMServer", app)
    before = await asyncio.to_thread(routing_counts, app)
    started, failed = 0, []
    all_started = asyncio.Event()

    async def one(http, messages, delay):
        nonlocal started
        await asyncio.sleep(delay)
        body = {"model": "vlm-serve-default", "temperature": 0, "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True, "messages": messages}
        first = False
        try:
            async for chunk in sse_chunks(http, base + "/v1/chat/completions", body):
                if not first and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = True
                    started += 1
                    if started == requests:
                        all_started.set()
        except Exception as e:
            failed.append(e)
            all_started.set()

    async with httpx.AsyncClient(timeout=300) as http:
        tasks = [asyncio.create_task(one(http, m, 0.04 * i)) for i, m in enumerate(items)]
        await asyncio.wait_for(all_started.wait(), 120)
        queues = sorted(await replica_queues(actors))
        await asyncio.gather(*tasks)
    if failed:
        raise failed[0]
    after = await asyncio.to_thread(routing_counts, app)
    decisions = {k: n - before["decisions"].get(k, 0) for k, n in after["decisions"].items()}
    return {"requests": requests, "hot": sum(1 for k in range(requests) if k % 4 != 3), "queues": queues,
            "gap": queues[1] - queues[0], "within_imbalance": queues[1] - queues[0] <= imbalance,
            "routing_decisions": {k: n for k, n in decisions.items() if n},
            "queue_probes": after["probes"] - before["probes"]}


async def skewed(bases: dict[str, str], imbalance: int, items: list, clients: int = 16,
                 max_tokens: int = 16) -> dict[str, dict]:
    """The applications in `bases` (name -> URL) serve `items` (a block of `skewed_messages`) at the
    same time, each from its own `clients` clients that send their next request when the last
    ends; every request makes `max_tokens` tokens. A change of the machine's speed hits all alike,
    and an application whose routing costs more work or leaves a replica idle loses its share of
    the machine to the others. Counted until the first application has sent its last request (all
    fully loaded until then): each one's requests completed by then, their TTFT, the CPU time its
    replicas used per completed request (by deployment; Ray runs on this machine), and its two LLM
    replicas' queues (Serve's count of their ongoing requests, which the router's load bound uses),
    read together every 20 ms."""
    import httpx

    apps = list(bases)
    actors = {p: await asyncio.to_thread(replica_actors, "LLMServer", p) for p in apps}
    for p, a in actors.items():
        assert len(a) == 2, f"expected two LLMServer replicas in {p}, found {len(a)}"
    before = {p: await asyncio.to_thread(routing_counts, p) for p in apps}
    pids = {p: await asyncio.to_thread(replica_pids, p) for p in apps}
    ttfts: dict[str, list] = {p: [] for p in apps}
    samples: dict[str, list] = {p: [] for p in apps}
    queues = {p: list(items) for p in apps}
    window_end = asyncio.Event()      # the first application has sent its last request

    async def sample(p):
        while not window_end.is_set():
            samples[p].append(sorted(await replica_queues(actors[p])))
            await asyncio.sleep(0.02)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=4 * clients)) as http:
        async def client(p):
            while queues[p]:
                messages = queues[p].pop(0)
                if not queues[p]:
                    window_end.set()
                _, ttft, _ = await chat(http, bases[p] + "/v1/chat/completions", messages, max_tokens,
                                        ignore_eos=True)
                if not window_end.is_set():
                    ttfts[p].append(ttft)

        samplers = [asyncio.create_task(sample(p)) for p in apps]
        cpu_start = {p: cpu_seconds(pids[p]) for p in apps}
        start = time.perf_counter()
        tasks = [asyncio.create_task(client(p)) for _ in range(clients) for p in apps]
        await window_end.wait()
        window = time.perf_counter() - start
        cpu = {p: {d: t - cpu_start[p][d] for d, t in cpu_seconds(pids[p]).items()} for p in apps}
        await asyncio.gather(*tasks, *samplers)
    out = {}
    for p in apps:
        after = await asyncio.to_thread(routing_counts, p)
        gaps = [hi - lo for lo, hi in samples[p]]
        held = [min(gaps[i:i + 5]) for i in range(max(0, len(gaps) - 4))]      # a gap held for 100 ms
        decisions = {k: n - before[p]["decisions"].get(k, 0) for k, n in after["decisions"].items()}
        out[p] = {"requests": len(items), "clients": clients, "window_s": window, "completed": len(ttfts[p]),
                  "requests_per_s": len(ttfts[p]) / window,
                  "cpu_ms_per_request": {d: 1e3 * t / max(1, len(ttfts[p])) for d, t in cpu[p].items()},
                  "ttft_p50_ms": 1e3 * percentile(ttfts[p], 0.5),
                  "ttft_p90_ms": 1e3 * percentile(ttfts[p], 0.9), "queue_samples": len(samples[p]),
                  "mean_queue_busier": statistics.mean(hi for _, hi in samples[p]),
                  "mean_queue_other": statistics.mean(lo for lo, _ in samples[p]),
                  "queue_gap_p50": percentile(gaps, 0.5), "queue_gap_p90": percentile(gaps, 0.9),
                  "queue_gap_p99": percentile(gaps, 0.99), "max_queue_gap": max(gaps, default=0),
                  "max_queue_gap_held_100ms": max(held, default=0),
                  "share_of_samples_over_imbalance": sum(g > imbalance for g in gaps) / max(1, len(gaps)),
                  "share_of_samples_with_an_idle_replica": sum(lo == 0 for lo, _ in samples[p]) / max(1, len(gaps)),
                  "routing_decisions": {k: n for k, n in decisions.items() if n},
                  "queue_probes": after["probes"] - before[p]["probes"]}
    return out


def ratio_interval(ratios: list[float], resamples: int = 10_000) -> tuple[float, float, float]:
    """Geometric mean of paired ratios and its 95% bootstrap interval (resampling the pairs)."""
    import math
    import random

    logs = [math.log(r) for r in ratios]
    rng = random.Random(0)
    means = sorted(statistics.mean(rng.choices(logs, k=len(logs))) for _ in range(resamples))
    return (math.exp(statistics.mean(logs)), math.exp(means[int(0.025 * resamples)]),
            math.exp(means[int(0.975 * resamples) - 1]))


def multi_turn(config: str, model_dir: str, n: int, n_blocks: int, block_requests: int, rounds: int,
               out: Path | None) -> None:
    import ray
    from ray import serve

    from deployments.app import DEPLOYMENTS
    from deployments.settings import RoutingSettings

    two = {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2}}
    imbalance = RoutingSettings().imbalance
    print("starting both applications, two replicas of each deployment ...", flush=True)
    bases = start_apps(config, {p: {"model_dir": model_dir, "deployments": {d: two for d in DEPLOYMENTS},
                                    "llm": {"routing": {"policy": p}}, "vision": {"routing": {"policy": p}}}
                                for p in POLICIES},
                       num_cpus=16)     # logical CPUs: twelve replicas
    try:
        conv = {p: asyncio.run(conversations(bases[p], p, n)) for p in POLICIES}
        for p in POLICIES:
            print(f"{p}: turns 2-3 cached {conv[p]['cached_share']:.0%}, encoder hits "
                  f"{conv[p]['encoder_hits_turns_2_3']} of {conv[p]['encoder_lookups_turns_2_3']}", flush=True)
        asyncio.run(skewed(bases, imbalance, skewed_messages(block_requests, block=n_blocks)))    # warm-up
        blocks: dict[str, list] = {p: [] for p in POLICIES}
        for k in range(n_blocks):
            both = asyncio.run(skewed(bases, imbalance, skewed_messages(block_requests, block=k)))
            for p in POLICIES:
                blocks[p].append(both[p])
            a, d = (both[p]["requests_per_s"] for p in ("cache_affinity", "power_of_two"))
            print(f"skewed block {k + 1}/{n_blocks}: default {d:.2f} req/s, cache_affinity {a:.2f} ({a / d:.3f})",
                  flush=True)
        held: dict[str, list] = {p: [] for p in POLICIES}
        for r in range(rounds):
            for p in (POLICIES if r % 2 == 0 else POLICIES[::-1]):
                held[p].append(asyncio.run(held_skew(bases[p], p, imbalance, block=n_blocks + 1 + r)))
            print(f"held-open round {r + 1}/{rounds}: queues " +
                  ", ".join(f"{p} {held[p][-1]['queues']}" for p in POLICIES), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = {}
    for p in POLICIES:
        bs = blocks[p]
        rps = [x["requests_per_s"] for x in bs]
        summary[p] = {
            "cached_share": conv[p]["cached_share"], "encoder_hits": conv[p]["encoder_hits_turns_2_3"],
            "encoder_lookups": conv[p]["encoder_lookups_turns_2_3"],
            "skewed_requests_per_s_median": statistics.median(rps),
            "skewed_requests_per_s_range": [min(rps), max(rps)],
            "ttft_p50_ms_median": statistics.median(x["ttft_p50_ms"] for x in bs),
            "mean_queue_busier": statistics.mean(x["mean_queue_busier"] for x in bs),
            "mean_queue_other": statistics.mean(x["mean_queue_other"] for x in bs),
            "queue_gap_p90_max": max(x["queue_gap_p90"] for x in bs),
            "queue_gap_p99_max": max(x["queue_gap_p99"] for x in bs),
            "max_queue_gap": max(x["max_queue_gap"] for x in bs),
            "max_queue_gap_held_100ms": max(x["max_queue_gap_held_100ms"] for x in bs),
            "share_of_samples_over_imbalance": statistics.mean(x["share_of_samples_over_imbalance"] for x in bs),
            "share_of_samples_with_an_idle_replica": statistics.mean(x["share_of_samples_with_an_idle_replica"]
                                                                     for x in bs),
            "cpu_ms_per_request": {d: statistics.mean(x["cpu_ms_per_request"][d] for x in bs)
                                   for d in bs[0]["cpu_ms_per_request"]},
            "held_open_queues": [x["queues"] for x in held[p]],
            "held_open_gap_max": max(x["gap"] for x in held[p])}
    paired = [a["requests_per_s"] / b["requests_per_s"] for a, b in zip(blocks["cache_affinity"], blocks["power_of_two"])]
    geo, lo, hi = ratio_interval(paired)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{os.cpu_count()}cores"
    print(f"\n{'router':<16} {'turns 2-3 cached':>17} {'encoder hits':>14} {'skewed req/s: median (range)':>29} "
          f"{'TTFT p50':>9} {'queues':>11} {'gap p90/p99/max':>16} {'held':>5} {'>imb':>6}")
    for p, m in summary.items():
        gap = f"{m['queue_gap_p90_max']:.0f}/{m['queue_gap_p99_max']:.0f}/{m['max_queue_gap']}"
        spread = "{:.1f}-{:.1f}".format(*m["skewed_requests_per_s_range"])
        print(f"{p:<16} {m['cached_share']:>16.0%} {str(m['encoder_hits']) + ' of ' + str(m['encoder_lookups']):>14} "
              f"{m['skewed_requests_per_s_median']:>15.2f} ({spread}) {m['ttft_p50_ms_median']:>7.0f}ms "
              f"{m['mean_queue_busier']:>5.1f}/{m['mean_queue_other']:<5.1f} {gap:>16} "
              f"{m['max_queue_gap_held_100ms']:>5} {m['share_of_samples_over_imbalance']:>6.1%}")
    for p, m in summary.items():
        print(f"{p}: held-open skew ({held[p][0]['hot']} hot + {held[p][0]['requests'] - held[p][0]['hot']} cold "
              f"requests in flight), the replicas' queues per round {m['held_open_queues']}, largest gap "
              f"{m['held_open_gap_max']}")
    for p, m in summary.items():
        print(f"{p}: CPU time per skewed request, by deployment: " +
              ", ".join(f"{d} {t:.1f} ms" for d, t in m["cpu_ms_per_request"].items()))
    print(f"cache_affinity / default skewed throughput over {n_blocks} blocks: geometric mean {geo:.3f}, 95% "
          f"interval {lo:.3f}-{hi:.3f} (blocks: {' '.join(f'{x:.2f}' for x in paired)})")
    print(f"(queues: mean of the busier / the other LLM replica's queue; gap: their difference, both read every "
          f"20 ms, p90/p99 the highest of the blocks; held: the largest gap held for 100 ms; >imb: share of "
          f"readings over the configured imbalance, {imbalance})")
    out = out or ROOT / "bench" / "results" / f"routing-{device.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "platform": platform.platform(), "model_dir": model_dir,
                               "imbalance": imbalance, "block_requests": block_requests, "summary": summary,
                               "conversations": conv, "skewed_blocks": blocks, "held_open": held,
                               "skewed_throughput_cache_affinity_over_default_by_block": paired,
                               "skewed_throughput_cache_affinity_over_default_geomean": geo,
                               "skewed_throughput_cache_affinity_over_default_95pct_interval": [lo, hi],
                               "command": "python bench/serve.py " + " ".join(sys.argv[1:])}, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the config's model_dir or the embedded AWQ model)")
    ap.add_argument("--config", default=str(ROOT / "serve_config.yaml"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--multi-turn", action="store_true", help="compare the routers across two replicas of each "
                                                                  "deployment (conversations, skewed load)")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=16, help="--multi-turn: skewed-load blocks, both routers at once")
    ap.add_argument("--block-requests", type=int, default=256, help="--multi-turn: requests per skewed-load block")
    ap.add_argument("--rounds", type=int, default=3, help="--multi-turn: held-open skew runs on each router")
    ap.add_argument("--out", help="JSON path (default bench/results/serve-<device>.json)")
    a = ap.parse_args()

    from vlm_core.default_model import default_model_dir

    app = yaml.safe_load(Path(a.config).read_text())["applications"][0]
    app_args = dict(app.get("args") or {})
    if a.model:
        app_args["model_dir"] = a.model
    model_dir = app_args.get("model_dir") or str(default_model_dir("awq"))
    overrides = {"model_dir": app_args.get("model_dir") or model_dir}
    if a.multi_turn:
        multi_turn(a.config, model_dir, a.conversations, a.blocks, a.block_requests, a.rounds,
                   Path(a.out) if a.out else None)
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{os.cpu_count()}cores"
    levels = sorted(set(a.concurrency))
    items = {c: workload(a.requests, offset=20000 + 1000 * c) for c in levels}
    warm = workload(4, offset=90000)
    rows = []

    async def measure(mode: str, runner) -> None:
        await run_clients(2, warm, runner.one)
        for c in levels:
            timings, wall = await run_clients(c, items[c], runner.one)
            assert all(t.tokens == a.max_tokens for t in timings), "every request must give max_tokens tokens"
            rows.append({"mode": mode, "concurrency": c, **summarize(timings, wall)})
            print(f"  {mode:>10} concurrency {c:>3}: {rows[-1]['requests_per_s']:.2f} req/s", flush=True)

    print("in-process engine ...", flush=True)
    asyncio.run(measure("in-process", InProcess(model_dir, (app_args.get("llm") or {}).get("engine") or {}, a.max_tokens)))
    print("Serve over HTTP ...", flush=True)
    base = start_serve(a.config, overrides)
    try:
        async def over_http():
            runner = OverHTTP(base, (app_args.get("ingress") or {}).get("model_name", "vlm-serve-default"), a.max_tokens)
            try:
                await measure("http", runner)
            finally:
                await runner.http.aclose()

        asyncio.run(over_http())
    finally:
        from ray import serve

        import ray

        serve.shutdown()
        ray.shutdown()

    overhead = {}
    for c in levels:
        local, http = (next(r for r in rows if r["mode"] == m and r["concurrency"] == c) for m in ("in-process", "http"))
        overhead[str(c)] = {"latency_p50_ms": http["latency_p50_ms"] - local["latency_p50_ms"],
                            "ttft_p50_ms": http["ttft_p50_ms"] - local["ttft_p50_ms"]}
    print(table(rows))
    print("Serve overhead, p50 latency (ms): " + ", ".join(
        f"concurrency {c}: {o['latency_p50_ms']:+.1f}" for c, o in overhead.items()))
    out = Path(a.out or ROOT / "bench" / "results" / f"serve-{device.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "platform": platform.platform(), "torch": torch.__version__,
              "model_dir": str(model_dir), "max_tokens": a.max_tokens, "requests_per_level": a.requests,
              "engine": (app_args.get("llm") or {}).get("engine") or {}, "rows": rows, "serve_overhead": overhead,
              "command": "python bench/serve.py " + " ".join(sys.argv[1:])}
    out.write_text(json.dumps(result, indent=2) + "\n")
    png = out.with_suffix(".png")
    drew = plot(rows, png, f"vlm-serve: Serve over HTTP vs in-process engine ({device})")
    print(f"wrote {out}" + (f" and {png}" if drew else " (no PNG: pip install matplotlib)"))


if __name__ == "__main__":
    main()
