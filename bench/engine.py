"""Engine benchmark (CPU): host overhead per step, the default model under concurrency, and time
to first token under mixed load.

    python bench/engine.py [--steps 40] [--out bench/results/engine-cpu-2cores.json]
    python bench/engine.py --mixed [--duration 60] [--out bench/results/engine-mixed-cpu-2cores.json]

(a) Host overhead: the engine around a null model (embeddings, hidden states and logits of the
    right shapes, all zeros, no attention) at 1/32/128/256 running sequences in decode: the
    whole step (schedule, flat inputs, sampling, update, detokenizing) per step and per sequence,
    split into schedule / execute / update.
(b) The embedded default model (AWQ, CPU): one decode step with 1, 32, 128 and 256 running
    sequences; aggregate tokens/s of 1, 8 and 32 concurrent requests (a picture and a question
    each, 32 tokens, EOS ignored) through `add_request` / `step`; and transformers' `generate`
    on the same model's fp16 checkpoint, one request at a time.
(c) --mixed: long image prompts (four 256-token pictures and a question, ~1,050 tokens) and short
    text prompts (8-24 tokens) arriving as two Poisson processes, 16 tokens out each, on a
    checkpoint built here with an 8k context (a 10M-parameter LLaMA, so that a step's time grows
    with its tokens). The same arrivals are replayed through the engine under the scheduler's old
    policy (no prefill cap: a running prefill takes the whole budget; no bound on partial
    prefills) and its current one (the defaults); p50/p99 time to first token of each kind and
    the total throughput, measured side by side. The long prompts' arrival rate is set from a
    median of five full-budget steps so that their prefills alone would take `--load` (30 %) of
    the engine's time (with the short prompts and the decodes, the engine is then busy but keeps
    up; at 40 % it falls behind on this box and every policy's queue grows).

Prints a table, writes JSON and (with matplotlib) a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm_core.default_model import default_model_dir  # noqa: E402
from vlm_core.default_model.data import heldout_set  # noqa: E402
from vlm_core.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from vlm_core.engine.request import EngineRequest  # noqa: E402
from vlm_core.engine.sampling import SamplingParams  # noqa: E402
from vlm_core.inputs.placeholders import MultimodalPrompt  # noqa: E402
from vlm_core.vlm import VLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LONG = SamplingParams(max_new_tokens=100_000, ignore_eos=True)


class NullModel(nn.Module):
    """A decoder stand-in with the real config: every output is zeros of the right shape."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(ids.shape[0], self.config.text.hidden_size)

    def forward(self, input_ids, positions, kv, inputs_embeds=None) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], self.config.text.hidden_size)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros(hidden.shape[0], self.config.text.vocab_size)


class StepClock:
    """Accumulates the time of the engine's schedule / execute calls (execute: the runner's
    `launch`, which on CPU runs the forward and the sampler)."""

    def __init__(self, engine: LLMEngine):
        self.parts = {"schedule": 0.0, "execute": 0.0}
        for name, obj, method in (("schedule", engine.scheduler, "schedule"), ("execute", engine.runner, "launch")):
            real = getattr(obj, method)

            def timed(*a, _real=real, _name=name):
                t = time.perf_counter()
                try:
                    return _real(*a)
                finally:
                    self.parts[_name] += time.perf_counter() - t

            setattr(obj, method, timed)

    def reset(self):
        for k in self.parts:
            self.parts[k] = 0.0


def fill_decode(engine: LLMEngine, prompts: list[MultimodalPrompt], embeds=None, params=LONG) -> None:
    """Admit every prompt and step until all of them are decoding."""
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", EngineRequest(p, embeds[i] if embeds else [], params))
    while len(engine.scheduler.running) < len(prompts) or any(
            s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()


def time_steps(engine: LLMEngine, steps: int) -> float:
    engine.step()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - t) / steps


def host_overhead(vlm: VLM, sizes: list[int], steps: int) -> list[dict]:
    rows = []
    for n in sizes:
        engine = LLMEngine(NullModel(vlm.model.config), vlm.tokenizer, (),
                           EngineConfig(num_blocks=4096, block_size=16, max_num_seqs=n,
                                        max_num_batched_tokens=max(2048, 16 * n)))
        ids = [5 + (i % 20) for i in range(16)]
        fill_decode(engine, [MultimodalPrompt(tuple(ids), ()) for _ in range(n)])
        clock = StepClock(engine)
        clock.reset()
        per_step = time_steps(engine, steps)
        sched, execute = clock.parts["schedule"] / (steps + 1), clock.parts["execute"] / (steps + 1)
        rows.append({"running": n, "step_ms": per_step * 1e3, "per_seq_us": per_step / n * 1e6,
                     "schedule_ms": sched * 1e3, "execute_ms": execute * 1e3,
                     "update_ms": (per_step - sched - execute) * 1e3})
    return rows


def requests(vlm: VLM, n: int, params: SamplingParams):
    scenes = heldout_set(n, seed=77)
    return [vlm.request(q, {"image": [scene.image()]}, params) for scene, q, _ in scenes]


def decode_steps(vlm: VLM, sizes: list[int], steps: int) -> list[dict]:
    rows = []
    for n in sizes:
        reqs = requests(vlm, n, SamplingParams(max_new_tokens=steps + 8, ignore_eos=True))
        engine = vlm.engine(EngineConfig(max_num_seqs=n, max_num_batched_tokens=max(2048, 64 * n)))
        fill_decode(engine, [r.prompt for r in reqs], [r.media_embeds for r in reqs], reqs[0].params)
        per_step = time_steps(engine, steps)
        rows.append({"running": n, "step_ms": per_step * 1e3})
    return rows


def concurrent_streams(vlm: VLM, sizes: list[int], tokens: int) -> list[dict]:
    rows = []
    for n in sizes:
        reqs = requests(vlm, n, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
        engine = vlm.engine(EngineConfig(max_num_seqs=max(n, 1)))
        start = time.perf_counter()
        for i, r in enumerate(reqs):
            engine.add_request(f"r{i}", r)
        got = engine.run_to_completion()
        wall = time.perf_counter() - start
        produced = sum(len(o.token_ids) for outs in got.values() for o in outs)
        rows.append({"concurrency": n, "tokens": produced, "wall_s": wall, "tokens_per_s": produced / wall})
    return rows


def hf_one_at_a_time(n: int, tokens: int) -> dict:
    from transformers import LlavaForConditionalGeneration

    folder = default_model_dir("fp16")
    hf = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    vlm = VLM.from_pretrained(folder, dtype="float32")
    scenes = heldout_set(n, seed=77)
    start = time.perf_counter()
    produced = 0
    for scene, q, _ in scenes:
        r = vlm.request(q, {"image": [scene.image()]}, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
        ids = torch.tensor([r.prompt.token_ids])
        with torch.inference_mode():
            g = hf.generate(input_ids=ids, pixel_values=vlm.image_processor([scene.image()]), do_sample=False,
                            max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=vlm.tokenizer.pad_token_id)
        produced += g.shape[1] - ids.shape[1]
    wall = time.perf_counter() - start
    return {"requests": n, "tokens": produced, "wall_s": wall, "tokens_per_s": produced / wall}


def write_json(out: Path, result: dict):
    """Write the results; returns matplotlib's pyplot for the figure beside them (None without it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


MIXED_BUDGET = 512
MIXED_OUT = SamplingParams(max_new_tokens=16, ignore_eos=True)


def mixed_workload(vlm: VLM, duration: float, long_rate: float, short_rate: float, seed: int):
    """(arrival s, name, request) sorted by arrival: every long request has its own four pictures."""
    rng = random.Random(seed)
    vocab = vlm.model.config.text.vocab_size
    arrivals = []
    for kind, rate in (("long", long_rate), ("short", short_rate)):
        t = rng.expovariate(rate)
        while t < duration:
            arrivals.append((t, kind))
            t += rng.expovariate(rate)
    arrivals.sort()
    scenes = iter(heldout_set(4 * sum(k == "long" for _, k in arrivals), seed=seed))
    out = []
    for i, (t, kind) in enumerate(arrivals):
        if kind == "long":
            pictures = [next(scenes)[0].image() for _ in range(4)]
            req = vlm.request("Compare these pictures.", {"image": pictures}, MIXED_OUT)
        else:
            ids = tuple(rng.randrange(10, vocab - 10) for _ in range(rng.randint(8, 24)))
            req = EngineRequest(MultimodalPrompt(ids, ()), params=MIXED_OUT)
        out.append((t, f"{kind}-{i}", req))
    return out


def replay(vlm: VLM, config: EngineConfig, workload) -> dict:
    """Add each request at its arrival time (between steps, as a server would), step the engine,
    and record every request's time to first token."""
    engine = vlm.engine(config)
    first: dict[str, float] = {}
    prompt_tokens = generated = 0
    start = time.perf_counter()
    i = 0
    while i < len(workload) or engine.has_unfinished():
        now = time.perf_counter() - start
        while i < len(workload) and workload[i][0] <= now:
            engine.add_request(workload[i][1], workload[i][2])
            prompt_tokens += len(workload[i][2].prompt.token_ids)
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, workload[i][0] - now))
            continue
        for o in engine.step():
            if o.token_ids and o.request_id not in first:
                first[o.request_id] = time.perf_counter() - start
            generated += len(o.token_ids)
    wall = time.perf_counter() - start - workload[0][0]
    arrival = {name: t for t, name, _ in workload}
    ttft = {kind: sorted(first[n] - arrival[n] for n in first if n.startswith(kind)) for kind in ("short", "long")}

    def pct(xs, q):
        return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] * 1e3

    row = {"requests": {k: len(v) for k, v in ttft.items()}, "wall_s": wall,
           "tokens_per_s": (prompt_tokens + generated) / wall, "generated_per_s": generated / wall,
           "preemptions": engine.scheduler.num_preemptions}
    for kind, xs in ttft.items():
        row[f"{kind}_ttft_p50_ms"], row[f"{kind}_ttft_p99_ms"] = pct(xs, 50), pct(xs, 99)
    row["short_ttft_ms"] = [x * 1e3 for x in ttft["short"]]
    return row


def mixed_load(duration: float, seed: int, out: Path, load: float = 0.3) -> None:
    from vlm_core.tiny import build_tiny_llava

    folder = build_tiny_llava(tempfile.mkdtemp(prefix="mixed-load-"), seed=0, image_size=224, patch_size=14,
                              max_positions=8192, text_hidden=512, text_layers=4)
    vlm = VLM.from_pretrained(folder, dtype="float32")
    # one full-budget prefill step, measured (after a warm-up), sets the arrival rates
    pictures = [s.image() for s, _, _ in heldout_set(16)]       # four requests with nothing in common
    probe = [vlm.request("Compare these pictures.", {"image": pictures[k:k + 4]}, MIXED_OUT) for k in (0, 4, 8, 12)]
    engine = vlm.engine(EngineConfig(max_num_batched_tokens=MIXED_BUDGET))
    for k, req in enumerate(probe):
        engine.add_request(f"probe-{k}", req)
    engine.step()
    times = []
    for _ in range(5):                                           # full-budget prefill steps
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    step_s = sorted(times)[2]
    long_tokens = len(probe[0].prompt.token_ids)
    long_rate = load / (long_tokens / MIXED_BUDGET * step_s)
    short_rate = 6 * long_rate
    workload = mixed_workload(vlm, duration, long_rate, short_rate, seed)
    policies = {
        "before (no cap, no partial-prefill bound)": EngineConfig(
            max_num_batched_tokens=MIXED_BUDGET, prefill_chunk_cap=MIXED_BUDGET, max_partial_prefills=64),
        "after (defaults)": EngineConfig(max_num_batched_tokens=MIXED_BUDGET),
    }
    rows = {name: replay(vlm, config, workload) for name, config in policies.items()}

    print(f"\n(c) mixed load: {sum(n.startswith('long') for _, n, _ in workload)} long image prompts "
          f"(~{long_tokens} tokens) and {sum(n.startswith('short') for _, n, _ in workload)} short text prompts "
          f"over {duration:.0f} s, budget {MIXED_BUDGET}, full-budget step {step_s * 1e3:.0f} ms")
    print(f"{'policy':<44} {'short p50':>10} {'short p99':>10} {'long p50':>9} {'long p99':>9} {'tok/s':>8}")
    for name, r in rows.items():
        print(f"{name:<44} {r['short_ttft_p50_ms']:>8.0f}ms {r['short_ttft_p99_ms']:>8.0f}ms "
              f"{r['long_ttft_p50_ms']:>7.0f}ms {r['long_ttft_p99_ms']:>7.0f}ms {r['tokens_per_s']:>8.0f}")
    before, after = rows.values()
    result = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "duration_s": duration, "seed": seed, "load": load, "budget": MIXED_BUDGET, "full_budget_step_ms": step_s * 1e3,
              "long_prompt_tokens": long_tokens, "long_rate_per_s": long_rate, "short_rate_per_s": short_rate,
              "policies": rows,
              "ratios": {"short_p50_before_over_after": before["short_ttft_p50_ms"] / after["short_ttft_p50_ms"],
                         "short_p99_before_over_after": before["short_ttft_p99_ms"] / after["short_ttft_p99_ms"],
                         "throughput_after_over_before": after["tokens_per_s"] / before["tokens_per_s"]}}
    plt = write_json(out, result)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in rows.items():
        xs = r["short_ttft_ms"]
        ax.plot(xs, [(k + 1) / len(xs) for k in range(len(xs))], label=name)
    ax.set(xscale="log", xlabel="time to first token of a short request, ms", ylabel="fraction of requests")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.png')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--mixed", action="store_true", help="run only the mixed-load comparison (c)")
    ap.add_argument("--duration", type=float, default=60.0, help="--mixed: seconds of arrivals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load", type=float, default=0.3, help="--mixed: share of the engine's time the long "
                                                             "prompts' prefills alone would take")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if a.mixed:
        mixed_load(a.duration, a.seed, Path(a.out or ROOT / "bench/results/engine-mixed-cpu-2cores.json"), a.load)
        return
    a.out = a.out or str(ROOT / "bench/results/engine-cpu-2cores.json")
    vlm = VLM.from_pretrained(default_model_dir("awq"), fuse_projections=True)
    host = host_overhead(vlm, [1, 32, 128, 256], a.steps)
    steps = decode_steps(vlm, [1, 32, 128, 256], min(a.steps, 40))
    streams = concurrent_streams(vlm, [1, 8, 32], a.tokens)
    hf = hf_one_at_a_time(8, a.tokens)

    print("\n(a) host overhead per decode step, null model")
    print(f"{'running':>8} {'step ms':>9} {'us/seq':>8} {'schedule':>9} {'execute':>8} {'update':>8}")
    for r in host:
        print(f"{r['running']:>8} {r['step_ms']:>9.3f} {r['per_seq_us']:>8.2f} {r['schedule_ms']:>9.3f} "
              f"{r['execute_ms']:>8.3f} {r['update_ms']:>8.3f}")
    print("\n(b) default model (AWQ, CPU): one decode step")
    base = steps[0]["step_ms"]
    for r in steps:
        print(f"{r['running']:>8} running: {r['step_ms']:8.2f} ms  ({r['step_ms'] / base:5.2f}x the 1-sequence step)")
    print(f"\n    concurrent requests, {a.tokens} tokens each, aggregate tokens/s")
    one = streams[0]["tokens_per_s"]
    for r in streams:
        print(f"{r['concurrency']:>8} streams: {r['tokens_per_s']:8.1f} tok/s  ({r['tokens_per_s'] / one:5.2f}x one)")
    print(f"    transformers generate, one request at a time: {hf['tokens_per_s']:.1f} tok/s")

    result = {"device": "cpu", "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "host_overhead_null_model": host, "default_model_decode_step": steps,
              "default_model_concurrent": streams, "hf_generate_one_at_a_time": hf,
              "ratios": {"step_256_over_1": steps[-1]["step_ms"] / base,
                         "streams_32_over_1": streams[-1]["tokens_per_s"] / one}}
    out = Path(a.out)
    plt = write_json(out, result)
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["running"] for r in host], [r["per_seq_us"] for r in host], "o-", label="null model, whole step")
    ax1.plot([r["running"] for r in steps], [r["step_ms"] * 1e3 / r["running"] for r in steps], "s-",
             label="default model, whole step")
    ax1.set(xscale="log", yscale="log", xlabel="running sequences", ylabel="µs per sequence per decode step")
    ax1.legend()
    ax2.plot([r["concurrency"] for r in streams], [r["tokens_per_s"] for r in streams], "o-", label="engine")
    ax2.axhline(hf["tokens_per_s"], color="gray", ls="--", label="transformers generate, one at a time")
    ax2.set(xscale="log", xlabel="concurrent requests", ylabel="aggregate tokens/s")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
