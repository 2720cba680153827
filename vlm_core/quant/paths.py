"""Which W4A16 path computes an AWQ linear, per device, activation dtype, number of rows M and shape.

Paths:
    cpu-int4mm      PyTorch's int4 CPU matmul (`torch._weight_int4pack_mm_for_cpu`); bf16 activations
    cpu-dequant     dequantize into a shared scratch buffer, then one GEMM (any dtype; fp32 for fp16/fp32)
    triton          our Triton W4A16 kernel (split-K GEMV for M <= 16, tiled GEMM above)
    tinygemm        PyTorch's CUDA int4 matmul (`torch._weight_int4pack_mm`); bf16 activations
    cuda-dequant    our Triton dequantize kernel into a scratch buffer, then cuBLAS
A table is a list of rules `{"device": "cpu"|"cuda", "dtype": "bfloat16"|..., "max_m": int, "path": str}` with
optional `"k"` / `"n"` for one shape; the first rule that matches serves the call, a shape rule before the
general ones. `bench/gpu_suite.py` writes a measured table for its GPU (`vlm_core/quant/tables/<device>.json`,
read when a model runs on a GPU of that name); `DEFAULT` holds when there is none.

The CPU crossover between int4mm and dequantize + GEMM is measured by `bench/kernels.py --cpu-paths`
(bench/results/w4a16-cpu-paths.json, 2-core AVX-512 box, LLaMA-7B shapes: int4mm is 5-6x faster than the
dense bf16 matmul at M = 1 and wins up to M = 128; dequantize + GEMM wins from M = 256 on and is 1.4-1.6x
faster at M = 600). fp32 runs dequantize + GEMM at every M: PyTorch's fp32 int4 kernel is no faster.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

PATHS = ("cpu-int4mm", "cpu-dequant", "triton", "tinygemm", "cuda-dequant")
CPU_PATHS = ("cpu-int4mm", "cpu-dequant")
TABLES = Path(__file__).resolve().parent / "tables"
CPU_INT4MM_MAX_M = 128
CUDA_DEQUANT_MIN_M = 256
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Rule:
    device: str
    path: str
    max_m: int = 1 << 62
    dtype: str | None = None          # None: any
    k: int | None = None
    n: int | None = None

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"unknown W4A16 path {self.path!r}; one of {PATHS}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.path != "triton" and (self.device == "cpu") != (self.path in CPU_PATHS):
            raise ValueError(f"path {self.path!r} does not run on {self.device}")   # triton: CUDA, or the interpreter
        if self.path in ("cpu-int4mm", "tinygemm") and self.dtype not in ("bfloat16",):
            raise ValueError(f"path {self.path!r} takes bf16 activations only; give the rule dtype 'bfloat16'")

    def matches(self, device: str, dtype: str, m: int, k: int, n: int) -> bool:
        return (self.device == device and m <= self.max_m and self.dtype in (None, dtype)
                and self.k in (None, k) and self.n in (None, n))


@dataclass(frozen=True)
class PathTable:
    rules: tuple[Rule, ...]

    @classmethod
    def from_json(cls, rules: list[dict]) -> "PathTable":
        return cls(tuple(Rule(**r) for r in rules))

    def choose(self, device: str, dtype: torch.dtype, m: int, k: int, n: int) -> str:
        return _choose(self, device, dtype, m, k, n)

    def _choose(self, device: str, dtype: torch.dtype, m: int, k: int, n: int) -> str:
        name = _DTYPE_NAMES[dtype]
        shaped = [r for r in self.rules if r.k is not None or r.n is not None]
        general = [r for r in self.rules if r.k is None and r.n is None]
        for r in shaped + general + list(DEFAULT.rules):
            if r.matches(device, name, m, k, n):
                return r.path
        raise ValueError(f"no W4A16 path for {device} {name} M={m} K={k} N={n}")

    def paths(self, device: str) -> set[str]:
        return {r.path for r in self.rules + DEFAULT.rules if r.device == device}


@functools.lru_cache(maxsize=1 << 16)
def _choose(table: PathTable, device: str, dtype: torch.dtype, m: int, k: int, n: int) -> str:
    """`PathTable.choose`, remembered: it runs for every linear of every step."""
    return table._choose(device, dtype, m, k, n)


DEFAULT = PathTable((
    Rule("cpu", "cpu-int4mm", CPU_INT4MM_MAX_M, "bfloat16"),
    Rule("cpu", "cpu-dequant"),
    Rule("cuda", "triton", CUDA_DEQUANT_MIN_M - 1),
    Rule("cuda", "cuda-dequant"),
))


def device_table_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def table_for(device: torch.device) -> PathTable:
    """The measured table for this GPU model if `bench/gpu_suite.py` wrote one, else DEFAULT."""
    if device.type != "cuda":
        return DEFAULT
    path = TABLES / f"{device_table_name(torch.cuda.get_device_name(device))}.json"
    if not path.is_file():
        return DEFAULT
    return PathTable.from_json(json.loads(path.read_text())["rules"])
