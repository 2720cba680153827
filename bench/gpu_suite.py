"""Everything only a GPU can show, in one command (budget: 10 minutes on an H100/H200).

    python bench/gpu_suite.py [--out bench/results/gpu-<device>.json] [--skip-tests] [--skip-e2e]

Runs on a bare GPU image (torch, triton, transformers, einops, msgpack, pillow). Each section records its
error and the suite goes on; the JSON is written whatever failed.
1. The GPU tests: `pytest -m gpu` over the test files that hold GPU tests (`GPU_TEST_FILES`; the others
   import Ray, FastAPI and the like, which such an image lacks). pytest comes from `.whl/` when it is not
   installed (`pip download pytest pluggy iniconfig -d .whl` on a machine with a registry).
2. Every W4A16 path (Triton, tinygemm, Triton dequantize + cuBLAS) at M = 1, 8, 16, 64, 256, 2048 on the
   LLaMA-7B linears (fused q/k/v, o, fused gate/up, down), fp16 and bf16, against cuBLAS on the dense
   weight and the measured copy bandwidth, the L2 cache flushed before every timed call. The fastest path
   per dtype, shape and M becomes the device's path table (`vlm_core/quant/tables/<device>.json`, read by
   `AWQLinear` on a GPU of that name).
3. Triton paged attention: decode at batch 1/8/64 over 700- and 4,096-token contexts, and a 676-token
   prefill, with the bytes of KV read per second.
4. Fused RMSNorm(+residual) and rope (Triton) against their torch references at 7B shapes.
5. End to end on a LLaVA-1.5-7B-shaped AWQ checkpoint (random weights, `bench/real_shape.py`'s writer):
   the time to first token of a 576-image-token + ~124-text-token prompt with the prefix cache off (fresh
   prompts each time, after a warm-up); decode tokens/s at 700 tokens of context (batch 1/8/64) and at
   4,000 (batch 1/8), eager and with CUDA graphs (captured at engine start, outside the timing), with the
   fused norm/rope kernels and with the torch ops. Each engine is freed before the next is sized.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
GROUP = 128
GPU_TEST_FILES = ["tests/test_w4a16_kernel.py", "tests/test_int4_paths.py", "tests/test_paged_attention.py",
                  "tests/test_norm_rope_kernels.py", "tests/test_decode_graphs.py"]
LINEARS = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}   # (K, N)
MS = [1, 8, 16, 64, 256, 2048]
W4A16_PATHS = ("triton", "tinygemm", "cuda-dequant")


def section(result: dict, name: str, fn, *args):
    """Run one section; its error (type, message, traceback tail) is recorded instead of its result."""
    t = time.perf_counter()
    try:
        result[name] = fn(*args)
    except Exception as e:   # noqa: BLE001 - one section's failure must not lose the others
        result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        print(f"{name}: FAILED {type(e).__name__}: {e}")
    finally:
        free_device()
    print(f"[{name}: {time.perf_counter() - t:.0f} s]")
    return result[name]


def free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- 1. tests ----------------------------------------------------------------------------------

def ensure_pytest() -> str:
    try:
        import pytest  # noqa: F401
        return "installed"
    except ImportError:
        pass
    wheels = ROOT / ".whl"
    site = Path(tempfile.mkdtemp(prefix="gpu-suite-site-"))
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                        *map(str, sorted(wheels.glob("*.whl")))], capture_output=True, text=True, timeout=120)
    sys.path.insert(0, str(site))
    try:
        import pytest  # noqa: F401,F811
    except ImportError:
        raise RuntimeError(f"pytest is not installed and not in {wheels} (pip said: {p.stderr[-300:]})") from None
    return str(site)


def gpu_tests() -> dict:
    where = ensure_pytest()
    env_path = ":".join(p for p in sys.path if p)
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TEST_FILES]
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                           env={**__import__("os").environ, "PYTHONPATH": env_path})
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"error": "timed out after 240 s", "output_tail": out[-3000:], "pytest": where}
    lines = p.stdout.strip().splitlines()
    tail = lines[-1] if lines else p.stderr[-500:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", tail)}
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    print(f"gpu tests: {tail}")
    return {"returncode": p.returncode, "summary": tail, **counts, "failures": failures[:50],
            "output_tail": p.stdout[-4000:] if p.returncode else "", "pytest": where,
            "seconds": round(time.perf_counter() - t, 1)}


# ---- timing ------------------------------------------------------------------------------------

class Timer:
    """CUDA-event timing with the L2 cache flushed before each call; the median of `reps`."""

    def __init__(self):
        props = torch.cuda.get_device_properties(0)
        self.flush = torch.empty(max(2 * getattr(props, "L2_cache_size", 50 << 20), 256 << 20), dtype=torch.uint8,
                                 device="cuda")

    def median_s(self, fn, reps: int = 25) -> float:
        fn()
        fn()
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            self.flush.zero_()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        times.sort()
        return times[len(times) // 2]


def copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy GB/s (bytes read + written) of a 1 GiB buffer."""
    src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = timer.median_s(lambda: dst.copy_(src), reps=10)
    print(f"device-to-device copy: {2 * src.numel() / t / 1e9:.0f} GB/s")
    return 2 * src.numel() / t / 1e9


# ---- 2. W4A16 paths ----------------------------------------------------------------------------

def awq_linear(k: int, n: int, dtype: torch.dtype, gen: torch.Generator):
    from vlm_core.quant.awq_linear import AWQLinear
    from vlm_core.quant.pack import pack_awq

    lin = AWQLinear(k, n, False, GROUP)
    lin.qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k, n // 8), dtype=torch.int32, generator=gen)
    lin.qzeros = pack_awq(torch.randint(0, 16, (k // GROUP, n), dtype=torch.int32, generator=gen))
    lin.scales = (torch.rand(k // GROUP, n, generator=gen) * 0.01 + 0.001).to(dtype)
    lin = lin.cuda()
    lin.post_load()
    return lin


def w4a16_paths(timer: Timer, copy_gbps: float) -> dict:
    from kernels.w4a16 import dequantize_reference
    from vlm_core.quant.paths import PathTable, Rule

    gen = torch.Generator(device="cpu").manual_seed(0)
    rows, rules = [], []
    print(f"\n{'linear':>8} {'dtype':>9} {'M':>5} " + " ".join(f"{p:>13}" for p in W4A16_PATHS)
          + f" {'cuBLAS':>9} {'best':>13} {'GB/s':>6} {'% copy':>6}")
    for dtype in (torch.float16, torch.bfloat16):
        for name, (k, n) in LINEARS.items():
            lin = awq_linear(k, n, dtype, gen)
            dense = dequantize_reference(lin.qweight, lin.scales, lin.scaled_zeros, GROUP).to(dtype)
            winners = []
            for m in MS:
                x = torch.randn(m, k, generator=gen).to("cuda", dtype)
                ref = x.float() @ dense.float()
                times, errs = {}, {}
                for path in W4A16_PATHS:
                    if path == "tinygemm" and dtype != torch.bfloat16:
                        continue
                    lin.table = PathTable((Rule("cuda", path, dtype="bfloat16" if path == "tinygemm" else None),))
                    lin.prepare()
                    if lin.path(m, dtype, x.device) != path:
                        errs[path] = "refused this shape"
                        continue
                    y = lin(x)
                    errs[path] = ((y.float() - ref).norm() / ref.norm()).item()
                    times[path] = timer.median_s(lambda: lin(x))
                t_dense = timer.median_s(lambda: x @ dense)
                ok = {p: t for p, t in times.items() if isinstance(errs[p], float) and errs[p] < 2e-2}
                best = min(ok, key=ok.get) if ok else "triton"
                winners.append((m, best))
                moved = k * n // 2 + 2 * (k // GROUP) * n * 2 + 2 * m * (k + n)
                row = {"linear": name, "K": k, "N": n, "M": m, "dtype": str(dtype).split(".")[-1],
                       **{f"{p}_us": round(t * 1e6, 2) for p, t in times.items()},
                       **{f"{p}_rel_err": e for p, e in errs.items()},
                       "cublas_dense_us": round(t_dense * 1e6, 2), "best": best,
                       "best_GBps": round(moved / ok[best] / 1e9, 1) if ok else None,
                       "best_fraction_of_copy_bw": round(moved / ok[best] / 1e9 / copy_gbps, 3) if ok else None,
                       "best_over_cublas_speed": round(t_dense / ok[best], 3) if ok else None}
                rows.append(row)
                print(f"{name:>8} {row['dtype']:>9} {m:>5} "
                      + " ".join(f"{times[p] * 1e6:>11.1f}us" if p in times else f"{'-':>13}" for p in W4A16_PATHS)
                      + f" {t_dense * 1e6:>7.1f}us {best:>13} {row['best_GBps'] or 0:>6.0f} "
                      f"{100 * (row['best_fraction_of_copy_bw'] or 0):>5.0f}%")
            rules += table_rules(winners, str(dtype).split(".")[-1], k, n)
            del lin, dense
            free_device()
    return {"rows": rows, "table": rules}


def table_rules(winners: list[tuple[int, str]], dtype: str, k: int, n: int) -> list[dict]:
    """Rules for one dtype and shape from the fastest path at each measured M (ascending): M up to a
    measured point takes that point's winner, M past the last the last one's; neighbours that agree merge."""
    rules: list[dict] = []
    for i, (m, best) in enumerate(winners):
        if rules and rules[-1]["path"] == best:
            rules.pop()
        rule = {"device": "cuda", "path": best, "dtype": dtype, "k": k, "n": n}
        if i < len(winners) - 1:
            rule["max_m"] = m
        rules.append(rule)
    return rules


def write_table(rules: list[dict], device_name: str) -> str:
    from vlm_core.quant.paths import TABLES, PathTable, device_table_name

    PathTable.from_json(rules)          # validates every rule
    TABLES.mkdir(parents=True, exist_ok=True)
    path = TABLES / f"{device_table_name(device_name)}.json"
    path.write_text(json.dumps({"device": device_name, "measured_by": "bench/gpu_suite.py", "rules": rules},
                               indent=1) + "\n")
    print(f"wrote the W4A16 path table {path}")
    from vlm_core.quant.paths import table_for

    table_for.cache_clear()             # the end-to-end section runs on the measured table
    return str(path.relative_to(ROOT))


# ---- 3. attention, 4. norm/rope ------------------------------------------------------------------

def paged_attention_rows(timer: Timer) -> list[dict]:
    from kernels.paged_attention import paged_attention

    rows = []
    hq = hkv = 32
    d, bs = 128, 16
    cases = [(b, 1, ctx) for ctx in (700, 4096) for b in (1, 8, 64)] + [(1, 676, 676)]
    for batch, q_len, ctx in cases:
        nblk = -(-ctx // bs)
        k = torch.randn(batch * nblk + 1, bs, hkv, d, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        tables = torch.randperm(batch * nblk, device="cuda").to(torch.int32).view(batch, nblk)
        seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        qs = torch.arange(0, (batch + 1) * q_len, q_len, device="cuda", dtype=torch.int32)
        q = torch.randn(batch * q_len, hq, d, device="cuda", dtype=torch.float16)
        t = timer.median_s(lambda: paged_attention(q, k, v, tables, seq_lens, qs, d ** -0.5, max_query_len=q_len))
        kv_bytes = 2 * batch * ctx * hkv * d * 2
        rows.append({"batch": batch, "query_len": q_len, "context": ctx, "us": round(t * 1e6, 2),
                     "kv_GBps": round(kv_bytes / t / 1e9, 1)})
        print(f"paged attention batch {batch:>3} q {q_len:>4} ctx {ctx:>5}: {t * 1e6:8.1f} us, "
              f"KV {kv_bytes / t / 1e9:6.0f} GB/s")
        del k, v
    return rows


def norm_rope_rows(timer: Timer) -> list[dict]:
    from kernels.norm_rope import rms_norm, rms_norm_reference, rope, rope_reference

    rows = []
    for t in (1, 64, 2048):
        x, r = (torch.randn(t, 4096, device="cuda", dtype=torch.float16) for _ in range(2))
        w = torch.rand(4096, device="cuda", dtype=torch.float16)
        q, k = (torch.randn(t, 32, 128, device="cuda", dtype=torch.float16) for _ in range(2))
        emb = torch.rand(t, 1, 128, device="cuda")
        cos, sin = emb.cos().half(), emb.sin().half()
        row = {"tokens": t,
               "rms_norm_add_triton_us": timer.median_s(lambda: rms_norm(x, w, 1e-6, r)) * 1e6,
               "rms_norm_add_torch_us": timer.median_s(lambda: rms_norm_reference(x, w, 1e-6, r)) * 1e6,
               "rope_qk_triton_us": timer.median_s(lambda: rope(q, k, cos, sin)) * 1e6,
               "rope_qk_torch_us": timer.median_s(lambda: (rope_reference(q, cos, sin), rope_reference(k, cos, sin)))
               * 1e6}
        rows.append(row)
        print(f"T {t:>5}: add+RMSNorm triton {row['rms_norm_add_triton_us']:7.1f} us, torch "
              f"{row['rms_norm_add_torch_us']:7.1f} us; rope q+k triton {row['rope_qk_triton_us']:7.1f} us, "
              f"torch {row['rope_qk_torch_us']:7.1f} us")
    return rows


# ---- 5. end to end -----------------------------------------------------------------------------

def _vlm_request(vlm, i: int, text_tokens: int, image, max_new: int):
    """A request with one picture and about `text_tokens` of text, distinct from every other i."""
    from vlm_core.engine.sampling import SamplingParams

    words = " ".join(f"w{(i * 7919 + j) % 997}" for j in range(max(1, text_tokens // 3)))
    return vlm.request(f"Request {i}. {words}", {"image": [image]} if image is not None else None,
                       SamplingParams(max_new_tokens=max_new, ignore_eos=True))


def _pad_to(vlm, req, context: int):
    """The request's prompt grown with text tokens to `context` tokens (for the 4k decode)."""
    from dataclasses import replace

    extra = context - len(req.prompt)
    if extra <= 0:
        return req
    ids = list(req.prompt.token_ids)
    filler = [ids[-2]] * extra
    prompt = replace(req.prompt, token_ids=tuple(ids[:-1] + filler + ids[-1:]))
    return replace(req, prompt=prompt)


def decode_rate(vlm, reqs, config) -> tuple[float, float]:
    """(tokens/s, ms/step) of decode-only steps once every request has its first token; the engine's
    graphs (if any) were captured when it started, and two decode steps warm up before the timing."""
    engine = vlm.engine(config)
    try:
        for i, r in enumerate(reqs):
            engine.add_request(f"d{i}", r)
        while any(s.num_computed_tokens < s.num_prompt_tokens + 2 for s in engine.scheduler.running) \
                or len(engine.scheduler.running) < len(reqs):
            engine.step()
        torch.cuda.synchronize()
        t, steps = time.perf_counter(), 0
        while engine.has_unfinished() and steps < 48:
            engine.step()
            steps += 1
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        return len(reqs) * steps / dt, dt / steps * 1e3
    finally:
        del engine
        free_device()


def end_to_end() -> dict:
    from PIL import Image

    from bench.real_shape import write_checkpoint
    from vlm_core.engine.engine import EngineConfig
    from vlm_core.vlm import VLM

    folder = Path(tempfile.mkdtemp(prefix="llava7b-awq-"))
    try:
        write_checkpoint(folder)
        t = time.perf_counter()
        vlm = VLM.from_pretrained(folder, dtype="float16", device="cuda", fuse_projections=True)
        out = {"load_s": round(time.perf_counter() - t, 1)}
        image = Image.new("RGB", (640, 480), (120, 160, 200))
        # TTFT: fresh prompts (nothing cached), prefix cache off, after two warm-up requests
        engine = vlm.engine(EngineConfig(max_num_seqs=8, max_num_batched_tokens=4096, enable_prefix_caching=False))
        ttfts = []
        for i in range(6):
            req = _vlm_request(vlm, 1000 + i, 124, image, 1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            engine.add_request(f"ttft{i}", req)
            engine.run_to_completion()
            torch.cuda.synchronize()
            ttfts.append(time.perf_counter() - t)
        del engine
        free_device()
        ttfts = sorted(ttfts[2:])
        out.update(ttft_prompt_tokens=len(req.prompt), ttft_image_tokens=sum(s.length for s in req.prompt.spans),
                   ttft_ms_median=round(ttfts[len(ttfts) // 2] * 1e3, 1), ttft_ms_all=[round(x * 1e3, 1) for x in ttfts])
        print(f"TTFT {out['ttft_prompt_tokens']} tokens ({out['ttft_image_tokens']} image), prefix cache off: "
              f"{out['ttft_ms_median']} ms")
        runs = [(700, b, g, k) for g in (False, True) for k in ("auto", "torch") for b in (1, 8, 64)]
        runs += [(4000, b, g, "auto") for g in (False, True) for b in (1, 8)]   # 4k: 4,000 + 64 new < 4,096
        for context, batch, graphs, kernels in runs:
            mode = ("graphs" if graphs else "eager") + ("_fused" if kernels == "auto" else "_torch_ops")
            key = f"ctx{context}_batch{batch}_{mode}"
            try:
                vlm.model.decoder.use_kernels(kernels)
                reqs = [_pad_to(vlm, _vlm_request(vlm, i, 124, image, 64), context) for i in range(batch)]
                cfg = EngineConfig(max_num_seqs=batch, cuda_graphs=graphs, enable_prefix_caching=False,
                                   max_num_batched_tokens=8192)
                tok_s, ms = decode_rate(vlm, reqs, cfg)
                out[f"decode_tok_s_{key}"], out[f"decode_ms_per_step_{key}"] = round(tok_s, 1), round(ms, 2)
                print(f"decode ctx {context:>5} batch {batch:>3} {mode:>17}: {tok_s:9.1f} tok/s ({ms:.2f} ms/step)")
            except Exception as e:   # noqa: BLE001 - the other runs still count
                out[f"error_{key}"] = f"{type(e).__name__}: {e}"
                print(f"decode {key}: FAILED {type(e).__name__}: {e}")
                free_device()
        vlm.model.decoder.use_kernels("torch")
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_suite needs a CUDA device")
    name = torch.cuda.get_device_name()
    result = {"device": name, "torch": torch.__version__, "platform": platform.platform(),
              "gpus": torch.cuda.device_count()}
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / f"gpu-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not a.skip_tests:
            section(result, "gpu_tests", gpu_tests)
        timer = Timer()
        copy = section(result, "copy_GBps", copy_bandwidth, timer)
        copy = copy if isinstance(copy, float) else 3000.0
        paths = section(result, "w4a16", w4a16_paths, timer, copy)
        if isinstance(paths, dict) and "table" in paths:
            section(result, "w4a16_table_file", write_table, paths["table"], name)
        section(result, "paged_attention", paged_attention_rows, timer)
        section(result, "norm_rope", norm_rope_rows, timer)
        if not a.skip_e2e:
            section(result, "end_to_end_7b_awq", end_to_end)
    finally:
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
