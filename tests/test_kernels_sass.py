"""What a GPU would show, checked here: the decode W4A16 kernels (M = 1, and 2..16), the split-K matmul
and the paged attention compile for sm_90a (H100/H200) with Triton's bundled ptxas, without spills, and the
decode kernels issue far fewer instructions per byte of weights than the split-K kernel did (bench/kernels_sass.py writes the whole report; it compiles,
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
                        "--only", "w4a16_gemv,w4a16_decode,w4a16_matmul:matmul,paged_attention"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(out.read_text())["entries"]


def test_decode_and_attention_kernels_do_not_spill(report):
    assert {r["kernel"] for r in report} == {"w4a16_gemv", "w4a16_decode", "w4a16_matmul", "paged_attention"}
    for r in report:
        assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255, r


def test_the_decode_kernels_issue_fewer_instructions_per_byte(report):
    by = {r["kernel"]: r for r in report}
    split_k = by["w4a16_matmul"]                    # what served M <= 16 before
    assert by["w4a16_gemv"]["sass_per_4kb"] * 2.5 < split_k["sass_per_4kb"] and by["w4a16_gemv"]["ceiling_tb_s"] > 3.5
    assert by["w4a16_decode"]["sass_per_4kb"] * 1.5 < split_k["sass_per_4kb"] and by["w4a16_decode"]["ceiling_tb_s"] > 2
