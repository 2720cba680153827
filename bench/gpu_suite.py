"""Everything only a GPU can show, in one command (budget: 10 minutes on an H100/H200).

    python bench/gpu_suite.py [--out bench/results/gpu-<device>.json] [--skip-tests] [--skip-e2e]

1. The GPU tests (`pytest -m gpu tests`): counts of passed / failed / skipped.
2. W4A16 (Triton) against cuBLAS fp16 at LLaMA-7B layer shapes, M = 1/8/16/64/1024/2048, with the
   L2 cache flushed before every timed call; effective GB/s beside the measured device-to-device
   copy bandwidth, and the ratio to cuBLAS.
3. Triton paged attention: decode at batch 1/8/64 over 1,024-token contexts, and a 676-token
   prefill, with the bytes of KV read per second.
4. Fused RMSNorm(+residual) and rope (Triton) against their torch references at 7B shapes.
5. End to end on a LLaVA-1.5-7B-shaped AWQ checkpoint (random weights, written by
   `bench/real_shape.py`'s writer into a temporary folder): decode tokens/s at batch 1/8/64,
   eager and with CUDA graphs, each with the fused norm/rope kernels and with the torch ops,
   and the time to first token of a 576-image-token + ~100-text-token prompt.

Writes the JSON (and prints each table). Run it on the GPU machine from the repository root.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
GROUP = 128
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]   # (K, N) of q/k/v/o, gate/up, down
MS = [1, 8, 16, 64, 1024, 2048]


def gpu_tests() -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-500:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)}
    print(f"gpu tests: {tail}")
    return {"returncode": p.returncode, "summary": tail, **counts, "seconds": round(time.perf_counter() - t, 1)}


class Timer:
    """CUDA-event timing with the L2 cache flushed before each call."""

    def __init__(self):
        props = torch.cuda.get_device_properties(0)
        self.flush = torch.empty(max(2 * getattr(props, "L2_cache_size", 50 << 20), 256 << 20), dtype=torch.uint8,
                                 device="cuda")

    def median_s(self, fn, reps: int = 30) -> float:
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
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = timer.median_s(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() / t / 1e9


def w4a16_vs_cublas(timer: Timer, copy_gbps: float) -> list[dict]:
    from kernels.w4a16 import w4a16_matmul

    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    print(f"\n{'K x N':>13} {'M':>5} {'w4a16 us':>9} {'GB/s':>7} {'% copy':>7} {'cuBLAS us':>10} {'w4/cuBLAS':>9}")
    for k, n in SHAPES:
        qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k, n // 8), dtype=torch.int32, generator=gen).cuda()
        scales = (torch.rand(k // GROUP, n, generator=gen) * 0.01).half().cuda()
        szeros = (-8 * scales.float()).half()
        dense = torch.randn(k, n, generator=gen).half().cuda()
        for m in MS:
            x = torch.randn(m, k, generator=gen).half().cuda()
            t_w4 = timer.median_s(lambda: w4a16_matmul(x, qweight, scales, szeros, GROUP))
            t_fp16 = timer.median_s(lambda: x @ dense)
            moved = k * n // 2 + 2 * (k // GROUP) * n * 2 + 2 * m * (k + n)
            row = {"K": k, "N": n, "M": m, "w4a16_us": t_w4 * 1e6, "cublas_fp16_us": t_fp16 * 1e6,
                   "w4a16_GBps": moved / t_w4 / 1e9, "fraction_of_copy_bw": moved / t_w4 / 1e9 / copy_gbps,
                   "w4a16_over_cublas_speed": t_fp16 / t_w4}
            rows.append(row)
            print(f"{k:>6}x{n:<6} {m:>5} {row['w4a16_us']:>9.1f} {row['w4a16_GBps']:>7.0f} "
                  f"{100 * row['fraction_of_copy_bw']:>6.0f}% {row['cublas_fp16_us']:>10.1f} "
                  f"{row['w4a16_over_cublas_speed']:>9.2f}")
    return rows


def paged_attention_rows(timer: Timer) -> list[dict]:
    from kernels.paged_attention import paged_attention

    rows = []
    hq = hkv = 32
    d, bs = 128, 16
    for batch, q_len, ctx in ((1, 1, 1024), (8, 1, 1024), (64, 1, 1024), (1, 676, 676)):
        nblk = -(-ctx // bs)
        k = torch.randn(batch * nblk + 1, bs, hkv, d, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        tables = torch.arange(batch * nblk, device="cuda", dtype=torch.int32).view(batch, nblk)
        seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        qs = torch.arange(0, (batch + 1) * q_len, q_len, device="cuda", dtype=torch.int32)
        q = torch.randn(batch * q_len, hq, d, device="cuda", dtype=torch.float16)
        t = timer.median_s(lambda: paged_attention(q, k, v, tables, seq_lens, qs, d ** -0.5, max_query_len=q_len))
        kv_bytes = 2 * batch * ctx * hkv * d * 2
        rows.append({"batch": batch, "query_len": q_len, "context": ctx, "us": t * 1e6, "kv_GBps": kv_bytes / t / 1e9})
        print(f"paged attention batch {batch:>3} q {q_len:>4} ctx {ctx}: {t * 1e6:8.1f} us, KV {kv_bytes / t / 1e9:6.0f} GB/s")
    return rows


def norm_rope_rows(timer: Timer) -> list[dict]:
    from kernels.norm_rope import rms_norm, rms_norm_reference, rope, rope_reference

    rows = []
    for t in (1, 64, 2048):
        x, r = (torch.randn(t, 4096, device="cuda", dtype=torch.float16) for _ in range(2))
        w = torch.rand(4096, device="cuda", dtype=torch.float16)
        q, k = torch.randn(t, 32, 128, device="cuda", dtype=torch.float16), torch.randn(t, 32, 128, device="cuda",
                                                                                        dtype=torch.float16)
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


def end_to_end() -> dict:
    from PIL import Image

    from bench.real_shape import write_checkpoint
    from vlm_core.engine.engine import EngineConfig
    from vlm_core.engine.sampling import SamplingParams
    from vlm_core.vlm import VLM

    folder = Path(tempfile.mkdtemp(prefix="llava7b-awq-"))
    try:
        write_checkpoint(folder)
        t = time.perf_counter()
        vlm = VLM.from_pretrained(folder, dtype="float16", device="cuda", fuse_projections=True)
        load_s = time.perf_counter() - t
        image = Image.new("RGB", (640, 480), (120, 160, 200))
        long_question = "Describe the image in detail, " * 16
        out = {"load_s": round(load_s, 1)}
        req = vlm.request(long_question, {"image": [image]}, SamplingParams(max_new_tokens=1, ignore_eos=True))
        engine = vlm.engine(EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096))
        for i in range(3):   # warm-up, then two timed first tokens
            torch.cuda.synchronize()
            t = time.perf_counter()
            engine.add_request(f"ttft{i}", req)
            engine.run_to_completion()
            torch.cuda.synchronize()
            ttft = time.perf_counter() - t
        out.update(prompt_tokens=len(req.prompt), image_tokens=sum(s.length for s in req.prompt.spans),
                   ttft_ms=round(ttft * 1e3, 1))
        for batch, graphs, kernels in ((b, g, k) for g in (False, True) for k in ("auto", "torch") for b in (1, 8, 64)):
            vlm.model.decoder.use_kernels(kernels)
            text = vlm.request("Describe the image.", None, SamplingParams(max_new_tokens=64, ignore_eos=True))
            engine = vlm.engine(EngineConfig(max_num_seqs=batch, cuda_graphs=graphs))
            for i in range(batch):
                engine.add_request(f"b{i}", text)
            while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
                    or len(engine.scheduler.running) < batch:
                engine.step()
            torch.cuda.synchronize()
            t, steps = time.perf_counter(), 0
            while engine.has_unfinished():
                engine.step()
                steps += 1
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            mode = ("graphs" if graphs else "eager") + ("_fused" if kernels == "auto" else "_torch_ops")
            out[f"decode_tok_s_batch_{batch}_{mode}"] = round(batch * steps / dt, 1)
            out[f"decode_ms_per_step_batch_{batch}_{mode}"] = round(dt / steps * 1e3, 2)
            print(f"decode batch {batch:>3} {mode:>17}: {batch * steps / dt:9.1f} tok/s ({dt / steps * 1e3:.2f} ms/step)")
        print(f"TTFT {out['prompt_tokens']} tokens ({out['image_tokens']} image): {out['ttft_ms']} ms")
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
    result = {"device": name, "torch": torch.__version__, "platform": platform.platform()}
    if not a.skip_tests:
        result["gpu_tests"] = gpu_tests()
    timer = Timer()
    result["copy_GBps"] = copy_bandwidth(timer)
    print(f"device-to-device copy: {result['copy_GBps']:.0f} GB/s")
    result["w4a16"] = w4a16_vs_cublas(timer, result["copy_GBps"])
    result["paged_attention"] = paged_attention_rows(timer)
    result["norm_rope"] = norm_rope_rows(timer)
    if not a.skip_e2e:
        result["end_to_end_7b_awq"] = end_to_end()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / f"gpu-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
