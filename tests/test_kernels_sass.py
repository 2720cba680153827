"""What a GPU would show, checked here: the M = 1 W4A16 kernel, the split-K one and the paged attention
compile for sm_90a (H100/H200) with Triton's bundled ptxas, without spills, and the M = 1 kernel issues
far fewer instructions per byte of weights (bench/kernels_sass.py writes the whole report; it compiles,
so it runs in a process without TRITON_INTERPRET)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sass") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "bench/kernels_sass.py", "--out", str(out),
                        "--only", "w4a16_gemv,w4a16_matmul:decode,paged_attention"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(out.read_text())["entries"]


def test_decode_and_attention_kernels_do_not_spill(report):
    assert {r["kernel"] for r in report} == {"w4a16_gemv", "w4a16_matmul", "paged_attention"}
    for r in report:
        assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255, r


def test_the_m1_kernel_issues_fewer_instructions_per_byte(report):
    gemv = next(r for r in report if r["kernel"] == "w4a16_gemv")
    split_k = next(r for r in report if r["kernel"] == "w4a16_matmul")
    assert gemv["sass_per_4kb"] * 2.5 < split_k["sass_per_4kb"]
    assert gemv["ceiling_tb_s"] > 3.5
