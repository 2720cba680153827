"""W4A16 matmul benchmark on Llama-7B layer shapes.

    python bench/kernels.py [--out bench/results/kernels-<device>.json] [--ms 200]

On a CUDA device: the Triton kernel against torch's fp16 matmul (cuBLAS) on the same shapes,
timed with CUDA events. On CPU: the torch reference path (dequantize + fp32 matmul, what
AWQLinear runs on CPU) against torch's fp32 matmul; the table says which. Effective GB/s counts
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", type=float, default=200.0, help="time budget per measurement (ms)")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,4096x11008 (K x N)")
    ap.add_argument("--m", default=None, help="e.g. 1,8,64")
    args = ap.parse_args(argv)
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
