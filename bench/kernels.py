"""W4A16 matmul benchmark on Llama-7B layer shapes.

    python bench/kernels.py [--out bench/results/kernels-<device>.json] [--ms 200]
    python bench/kernels.py --cpu-paths [--out bench/results/w4a16-cpu-paths.json]

`--cpu-paths`: `AWQLinear`'s CPU paths side by side at each M — PyTorch's int4 matmul (bf16) and
dequantize + GEMM (bf16 and fp32) — beside the dense bf16 / fp32 matmul, and for bf16 the M from which
dequantize + GEMM wins (the crossover `vlm_core.quant.paths.CPU_INT4MM_MAX_M` is set from).

On a CUDA device: the Triton kernel against torch's fp16 matmul (cuBLAS) on the same shapes,
timed with CUDA events. On CPU: the torch reference dequantization + fp32 matmul against torch's fp32
matmul (AWQLinear's own CPU paths: `--cpu-paths`); the table says which. Effective GB/s counts
the bytes each path must read and write once (4-bit weights + fp16 scales/zeros + activations +
output for W4A16; the dense weight for the baseline).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.w4a16 import dequantize_reference, triton_available, w4a16_matmul  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]   # (K, N)
MS = [1, 8, 64, 1024]
GROUP = 128


def timeit(fn, device: torch.device, budget_ms: float) -> float:
    """Median seconds per call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        once = max(start.elapsed_time(end), 1e-3)
        reps = max(5, min(200, int(budget_ms / once)))
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    t_end = time.perf_counter() + budget_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def w4_bytes(m, k, n, act_bytes):
    return k * n // 2 + 2 * (k // GROUP) * n * act_bytes + m * k * act_bytes + m * n * act_bytes


def dense_bytes(m, k, n, act_bytes):
    return k * n * act_bytes + m * k * act_bytes + m * n * act_bytes


CPU_MS = [1, 4, 16, 32, 48, 64, 96, 128, 256, 600]


def cpu_paths(args) -> None:
    from vlm_core.quant.awq_linear import AWQLinear
    from vlm_core.quant.pack import pack_awq
    from vlm_core.quant.paths import CPU_INT4MM_MAX_M, PathTable, Rule

    torch.set_num_threads(min(2, torch.get_num_threads()))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(v) for v in args.m.split(",")] if args.m else CPU_MS
    gen = torch.Generator().manual_seed(0)
    variants = [("int4mm_bf16", torch.bfloat16, "cpu-int4mm"), ("dequant_bf16", torch.bfloat16, "cpu-dequant"),
                ("dequant_fp32", torch.float32, "cpu-dequant")]
    rows, crossover = [], {}
    print(f"{'K x N':>13} {'M':>5} " + " ".join(f"{v:>13}" for v, _, _ in variants)
          + f" {'dense_bf16':>11} {'dense_fp32':>11}   (ms)")
    for k, n in shapes:
        lins = {}
        for name, dtype, path in variants:
            lin = AWQLinear(k, n, False, GROUP, table=PathTable((Rule("cpu", path, dtype="bfloat16"
                                                                      if path == "cpu-int4mm" else None),)))
            lin.qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k, n // 8), dtype=torch.int32, generator=gen)
            lin.qzeros = pack_awq(torch.randint(0, 16, (k // GROUP, n), dtype=torch.int32, generator=gen))
            lin.scales = (torch.rand(k // GROUP, n, generator=gen) * 0.01 + 0.001).to(dtype)
            lin.post_load()
            lin.prepare()
            lins[name] = lin
        dense = {dt: torch.randn(k, n, generator=gen).to(dt) for dt in (torch.bfloat16, torch.float32)}
        first_win = None
        for m in ms:
            x = torch.randn(m, k, generator=gen)
            t = {name: timeit(lambda: lins[name](x.to(dtype)), torch.device("cpu"), args.ms)
                 for name, dtype, _ in variants}
            for dt, w in dense.items():
                xd = x.to(dt)
                t[f"dense_{str(dt).split('.')[-1].replace('bfloat16', 'bf16').replace('float32', 'fp32')}"] = \
                    timeit(lambda: xd @ w, torch.device("cpu"), args.ms)
            if first_win is None and t["dequant_bf16"] < t["int4mm_bf16"]:
                first_win = m
            rows.append({"K": k, "N": n, "M": m, **{f"{key}_ms": round(v * 1e3, 3) for key, v in t.items()}})
            print(f"{k:>6}x{n:<6} {m:>5} " + " ".join(f"{t[v] * 1e3:>13.2f}" for v, _, _ in variants)
                  + f" {t['dense_bf16'] * 1e3:>11.2f} {t['dense_fp32'] * 1e3:>11.2f}")
        crossover[f"{k}x{n}"] = first_win
        del lins, dense
    print(f"\nbf16: dequantize + GEMM first beats the int4 matmul at M = {crossover} "
          f"(built-in: int4 matmul up to M = {CPU_INT4MM_MAX_M})")
    result = {"device": f"cpu ({platform.processor() or platform.machine()})", "threads": torch.get_num_threads(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
              "group_size": GROUP, "rows": rows, "bf16_dequant_wins_from_m": crossover,
              "built_in_int4mm_max_m": CPU_INT4MM_MAX_M}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "w4a16-cpu-paths.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-paths", action="store_true", help="AWQLinear's CPU paths and their crossover")
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", type=float, default=200.0, help="time budget per measurement (ms)")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,4096x11008 (K x N)")
    ap.add_argument("--m", default=None, help="e.g. 1,8,64")
    args = ap.parse_args(argv)
    if args.cpu_paths:
        return cpu_paths(args)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    use_kernel = cuda and triton_available(device)
    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})"
    path = "triton kernel vs cuBLAS fp16" if use_kernel else "torch reference (dequant + fp32 matmul) vs torch fp32 matmul"
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(v) for v in args.m.split(",")] if args.m else MS
    act_bytes = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    print(f"device: {device_name}\npath: {path}\n")
    print(f"{'K x N':>13} {'M':>5} {'w4a16 ms':>10} {'GB/s':>8} {'dense ms':>10} {'GB/s':>8} {'dense/w4':>9}")
    for k, n in shapes:
        qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k, n // 8), dtype=torch.int32, generator=gen).to(device)
        scales = (torch.rand(k // GROUP, n, generator=gen) * 0.01).to(device, dtype)
        szeros = (-8 * scales.float()).to(dtype)
        dense_w = torch.randn(k, n, generator=gen).to(device, dtype)
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            if use_kernel:
                w4 = lambda: w4a16_matmul(x, qweight, scales, szeros, GROUP)  # noqa: E731
            else:
                w4 = lambda: x @ dequantize_reference(qweight, scales, szeros, GROUP)  # noqa: E731
            dense = lambda: x @ dense_w  # noqa: E731
            t_w4, t_dense = timeit(w4, device, args.ms), timeit(dense, device, args.ms)
            row = {"K": k, "N": n, "M": m, "w4a16_ms": t_w4 * 1e3, "dense_ms": t_dense * 1e3,
                   "w4a16_GBps": w4_bytes(m, k, n, act_bytes) / t_w4 / 1e9,
                   "dense_GBps": dense_bytes(m, k, n, act_bytes) / t_dense / 1e9,
                   "speedup_vs_dense": t_dense / t_w4}
            rows.append(row)
            print(f"{k:>6}x{n:<6} {m:>5} {row['w4a16_ms']:>10.3f} {row['w4a16_GBps']:>8.1f} "
                  f"{row['dense_ms']:>10.3f} {row['dense_GBps']:>8.1f} {row['speedup_vs_dense']:>9.2f}")
    result = {"device": device_name, "path": path, "dtype": str(dtype), "group_size": GROUP,
              "torch": torch.__version__, "rows": rows}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "kernels-" + ("".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()) + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
