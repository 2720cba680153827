"""A static report of every Triton kernel, compiled for sm_90a (H100/H200) on this machine, no GPU needed.

    python bench/kernels_sass.py [--out bench/results/kernels-sass-sm90.json]

Each kernel is compiled in each configuration its launcher uses (`triton.compile` for GPUTarget cuda 90),
then Triton's bundled `ptxas -arch=sm_90a -v` gives registers and spills and `nvdisasm` the SASS. Per entry:
    registers, spill_bytes (stores + loads), shared_bytes, occupancy (resident warps / 64 per SM, from
        registers, shared memory and warps per CTA),
    loop_sass: SASS instructions in the kernel's main loop (the largest backward branch's body), and
        sass_per_4kb: the instructions all warps of a CTA issue for each 4 KB of the data the loop streams
        (packed weights for W4A16 and dequantize, K and V for attention, the row for norm/rope),
    ceiling_tb_s: the issue-bound ceiling of that stream, 132 SMs x 4 warp-instructions per clock x 1.98 GHz
        over the instructions per byte (a kernel cannot read faster than it can issue its instructions).
The goal for the M <= 16 W4A16 path (role `decode`: `w4a16_gemv` for M = 1, `w4a16_decode` for 2..16) is a
ceiling of at least 4 TB/s (H200's HBM is 4.8); role `matmul` is `w4a16_matmul`'s split-K configuration for
small M, which served decode before. A W4A16 loop's stream is its packed words.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
SMS, ISSUE_PER_CLOCK, CLOCK_HZ = 132, 4, 1.98e9
REGS_PER_SM, MAX_WARPS_PER_SM, SHARED_PER_SM = 65536, 64, 228 * 1024


@dataclass
class Entry:
    kernel: str
    role: str
    config: dict
    fn: object
    types: dict                      # non-constexpr argument -> Triton type ("*fp16", "i32", "fp32")
    constexprs: dict
    stream_bytes_per_iter: int       # bytes of the streamed operand one loop iteration of one CTA consumes
    values: dict = field(default_factory=dict)    # integer arguments as the launcher passes them
    num_warps: int = 4
    num_stages: int = 3


def entries() -> list[Entry]:
    import kernels.norm_rope as nr
    import kernels.paged_attention as pa
    import kernels.w4a16 as w

    out = []
    k, n, g = 4096, 11008, 128
    w4_types = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "out_ptr": "*fp32"}

    def w4_values(m, split):
        return dict(M=m, N=n, K=k, group_size=g, stride_xm=k, stride_xk=1, stride_qk=n // 8, stride_qn=1,
                    stride_sg=n, stride_sn=1, stride_os=m * n if split > 1 else 0, stride_om=n, stride_on=1)

    gcfg = w.gemv_config(k, n, g)
    out.append(Entry("w4a16_gemv", "decode", {"M": 1, "K": k, "N": n, "group": g, **gcfg}, w._w4a16_gemv_kernel,
                     {**w4_types, "out_ptr": "*fp16", "part_ptr": "*fp32", "lock_ptr": "*i32"},
                     dict(GROUP=g, BLOCK_W=gcfg["block_w"], BLOCK_K=gcfg["block_k"], SPLIT_K=gcfg["split_k"]),
                     g * gcfg["block_w"] * 4,
                     dict(N=n, K=k, groups_per_split=gcfg["groups_per_split"], stride_qk=n // 8, stride_sg=n)))
    dcfg = w.decode_config(k, n, g)
    out.append(Entry("w4a16_decode", "decode", {"M": 16, "K": k, "N": n, "group": g, **dcfg}, w._w4a16_decode_kernel,
                     {**w4_types, "out_ptr": "*fp16", "part_ptr": "*fp32", "lock_ptr": "*i32"},
                     dict(BLOCK_M=16, BLOCK_W=dcfg["block_w"], BLOCK_K=dcfg["block_k"], SPLIT_K=dcfg["split_k"],
                          DOT_FP32=False), dcfg["block_k"] * dcfg["block_w"] * 4,
                     dict(M=16, N=n, K=k, group_size=g, stride_xm=k, stride_qk=n // 8, stride_sg=n, stride_om=n)))
    for m in (16,):
        cfg = w.default_config(m, k, n, g)
        out.append(Entry("w4a16_matmul", "matmul", {**cfg, "M": m, "K": k, "N": n, "group": g}, w._w4a16_kernel,
                         w4_types, dict(BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                                        SPLIT_K=cfg["split_k"], DOT_FP32=False),
                         cfg["block_k"] * cfg["block_n"] // 2, w4_values(m, cfg["split_k"])))
    for m in (64, 1024):
        cfg = w.default_config(m, k, n, g)
        out.append(Entry("w4a16_matmul", "prefill", {**cfg, "M": m, "K": k, "N": n, "group": g},
                         w._w4a16_kernel, {**w4_types, "out_ptr": "*fp16"},
                         dict(BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], SPLIT_K=1,
                              DOT_FP32=False), cfg["block_k"] * cfg["block_n"] // 2, w4_values(m, 1)))
    out.append(Entry("w4a16_dequantize", "dequantize", {"block_k": 32, "block_n": 128}, w._dequantize_kernel,
                     {"qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "out_ptr": "*fp16"},
                     dict(BLOCK_K=32, BLOCK_N=128), 32 * 128 // 2,
                     dict(K=k, N=n, group_size=g, stride_qk=n // 8, stride_sg=n, stride_ok=n)))
    pa_types = {"q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "out_ptr": "*fp16", "bt_ptr": "*i32",
                "seq_lens_ptr": "*i32", "qstart_ptr": "*i32", "scale": "fp32"}
    for group in (1, 4):
        out.append(Entry("paged_attention", "attention", {"head_dim": 128, "group": group, "block_q": 16, "block_size": 16},
                         pa._paged_attention_kernel, pa_types,
                         dict(HEAD_DIM=128, GROUP=group, BLOCK_Q=16, BLOCK_SIZE=16, BLOCK_D=128, DOT_FP32=False),
                         2 * 16 * 128 * 2,
                         dict(stride_qt=32 * 128, stride_qh=128, stride_kb=16 * (32 // group) * 128,
                              stride_ks=(32 // group) * 128, stride_kh=128, stride_ot=32 * 128, stride_oh=128,
                              stride_bt=256)))
    out.append(Entry("rms_norm", "norm", {"hidden": 4096, "residual": True}, nr._rms_norm_kernel,
                     {"x_ptr": "*fp16", "r_ptr": "*fp16", "w_ptr": "*fp16", "out_ptr": "*fp16", "res_out_ptr": "*fp16",
                      "eps": "fp32"}, dict(HAS_RESIDUAL=True, BLOCK=4096), 2 * 4096 * 2,
                     dict(H=4096, stride_x=4096, stride_r=4096, stride_o=4096, stride_ro=4096)))
    out.append(Entry("rope", "rope", {"heads": 32, "head_dim": 128}, nr._rope_kernel,
                     {"q_ptr": "*fp16", "k_ptr": "*fp16", "cos_ptr": "*fp16", "sin_ptr": "*fp16", "qo_ptr": "*fp16",
                      "ko_ptr": "*fp16"}, dict(HALF=64, BLOCK_H=8), 8 * 128 * 2 * 2,
                     dict(HQ=32, HKV=32, stride_qt=3 * 4096, stride_qh=128, stride_kt=3 * 4096, stride_kh=128,
                          stride_c=128, stride_qot=4096, stride_qoh=128, stride_kot=4096, stride_koh=128)))
    return out


def tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def ptxas(ptx: Path, cubin: Path) -> str:
    """`ptxas -v` of the PTX (the bundled ptxas that reads its PTX version: Triton ships two)."""
    errors = []
    for name in ("ptxas", "ptxas-blackwell"):
        p = subprocess.run([tool(name), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)], capture_output=True, text=True)
        if p.returncode == 0:
            return p.stdout + p.stderr
        errors.append(f"{name}: {p.stderr.strip()[-200:]}")
    raise RuntimeError("no bundled ptxas compiled the PTX: " + "; ".join(errors))


def compile_entry(e: Entry) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # what a launch specializes on: 16-byte aligned pointers and integers divisible by 16, integers equal to 1
    constexprs = {**e.constexprs, **{a: 1 for a, v in e.values.items() if v == 1}}
    sig = {a: e.types.get(a, "i32") for a in e.fn.arg_names if a not in constexprs}
    sig.update({c: "constexpr" for c in constexprs})
    aligned = [a for a, t in sig.items() if t.startswith("*")] + [a for a, v in e.values.items() if v % 16 == 0]
    attrs = {(e.fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    k = triton.compile(ASTSource(fn=e.fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": e.num_warps, "num_stages": e.num_stages})
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        ptx.write_text(k.asm["ptx"])
        rep = ptxas(ptx, cubin)
        sass = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"Used (\d+) registers", rep).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", rep))
    shared = int(k.metadata.shared)
    return {"registers": regs, "spill_bytes": spills, "shared_bytes": shared, "sass": sass}


def loop_body(sass: str) -> list[str]:
    """The instructions of the largest loop: the span from a label to the backward branch that returns to it;
    a kernel without a loop: all its instructions."""
    lines = [ln for ln in sass.splitlines()]
    labels, instrs = {}, []          # label -> index into instrs
    for ln in lines:
        m = re.match(r"^\s*\.?(L_x_\d+|\.L_\w+):", ln.strip()) or re.match(r"^(\.L_x_\d+):", ln.strip())
        if m:
            labels[m.group(1).lstrip(".")] = len(instrs)
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", ln)
        if m:
            instrs.append(m.group(1).strip())
    best: list[str] = []
    for i, ins in enumerate(instrs):
        m = re.search(r"\bBRA\b.*?`?\(?\.?(L_x_\d+)", ins)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            body = instrs[labels[m.group(1)]: i + 1]
            if len(body) > max(len(best), 2):        # (a kernel ends in a one-instruction self-branch)
                best = body
    return best or instrs


def occupancy(regs: int, shared: int, warps: int) -> float:
    by_regs = REGS_PER_SM // max(1, regs * 32 * warps)
    by_shared = SHARED_PER_SM // shared if shared else 32
    ctas = max(0, min(by_regs, by_shared, MAX_WARPS_PER_SM // warps, 32))
    return ctas * warps / MAX_WARPS_PER_SM


def report(e: Entry) -> dict:
    c = compile_entry(e)
    body = loop_body(c.pop("sass"))
    per_4kb = len(body) * e.num_warps * 4096 / e.stream_bytes_per_iter
    ceiling = SMS * ISSUE_PER_CLOCK * CLOCK_HZ / (per_4kb / 4096) / 1e12
    return {"kernel": e.kernel, "role": e.role, "config": {**e.config, "num_warps": e.num_warps,
                                                             "num_stages": e.num_stages},
            **c, "occupancy": round(occupancy(c["registers"], c["shared_bytes"], e.num_warps), 3),
            "loop_sass": len(body), "stream_bytes_per_iter": e.stream_bytes_per_iter,
            "sass_per_4kb": round(per_4kb, 1), "ceiling_tb_s": round(ceiling, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench/results/kernels-sass-sm90.json"))
    ap.add_argument("--only", default=None, help="comma-separated kernel[:role] names, e.g. w4a16_gemv,w4a16_matmul:decode")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernels_sass compiles the kernels: run it without TRITON_INTERPRET=1")
    only = [tuple(o.split(":")) for o in a.only.split(",")] if a.only else None
    chosen = [e for e in entries() if only is None or any(o[0] == e.kernel and (len(o) == 1 or o[1] == e.role)
                                                          for o in only)]
    rows = [report(e) for e in chosen]
    print(f"{'kernel':>17} {'role':>10} {'config':>44} {'regs':>5} {'spill':>6} {'smem':>7} {'occ':>5} "
          f"{'loop':>5} {'sass/4KB':>9} {'TB/s':>6}")
    for r in rows:
        cfg = ",".join(f"{k}={v}" for k, v in r["config"].items() if k not in ("num_stages",))[:44]
        print(f"{r['kernel']:>17} {r['role']:>10} {cfg:>44} {r['registers']:>5} {r['spill_bytes']:>6} "
              f"{r['shared_bytes']:>7} {r['occupancy']:>5.2f} {r['loop_sass']:>5} {r['sass_per_4kb']:>9.0f} "
              f"{r['ceiling_tb_s']:>6.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"target": "sm_90a", "sms": SMS, "issue_per_clock": ISSUE_PER_CLOCK,
                               "clock_ghz": CLOCK_HZ / 1e9, "entries": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
