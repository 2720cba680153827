"""`AWQLinear`: a drop-in 4-bit linear (same `forward(x)` as nn.Linear).

Its buffers are the AutoAWQ gemm tensors, so checkpoints load by name:
    qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales [K/g, N], bias [N] (optional)
`post_load()` derives `scaled_zeros = -zero * scale` [K/g, N]. The first forward (or `prepare()`, which
`VLM.from_pretrained` calls once the model is loaded and fused) puts the weight in the layout of the paths
`vlm_core.quant.paths` picks for its device, once:
  CPU:  PyTorch's int4pack (`int4pack.cpu_pack`); the AutoAWQ qweight is dropped, so a 4-bit weight is held
        once, in 4 bits. bf16 activations run `torch._weight_int4pack_mm_for_cpu` for small M; long prefills and
        fp16/fp32 activations dequantize into one scratch buffer the model's linears share and run one GEMM
        (fp16 and fp32 in fp32, so fp32 loads keep their precision). `qweight` stays readable (rebuilt from
        the packed form on access) and in `state_dict()`.
  CUDA: our Triton kernels on the AutoAWQ tensors (`w4a16_gemv` for M = 1, `w4a16_decode` up to 16,
        `w4a16_matmul` above), tinygemm on its own packing when the device's table chooses it, or Triton
        dequantize + cuBLAS for long prefills.
Moving or casting a prepared module (`.to()`, `.half()`) returns it to the AutoAWQ form first.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.w4a16 import w4a16_decode, w4a16_dequantize, w4a16_gemv, w4a16_matmul

from ..config import AWQConfig
from ..models.layers import LinearFactory, dense_linear
from . import int4pack
from .pack import pack_awq, unpack_awq
from .paths import DEFAULT, PathTable, table_for


class _CPUWeight:
    """The CPU form: int4pack bytes uint8 [N_pad, K/2] and scales_and_zeros [K/g, N_pad, 2] in the compute
    dtype (bf16 for a bf16 load, for PyTorch's int4 matmul; fp32 otherwise)."""

    def __init__(self, lin: "AWQLinear"):
        q, sz = int4pack.awq_to_int4(lin.qweight, lin.qzeros, lin.scales, lin.group_size, int4pack.CPU_N_MULTIPLE)
        self.n_pad = q.shape[1]
        self.packed = int4pack.cpu_pack(q)
        del q
        self.load_dtype = lin.scales.dtype
        self.compute = torch.bfloat16 if lin.scales.dtype == torch.bfloat16 else torch.float32
        self.scales_and_zeros = sz.to(self.compute)

    def qweight(self, k: int, n: int) -> torch.Tensor:
        q = int4pack.cpu_unpack_into(self.packed, k, self.n_pad)[:, :n]
        return pack_awq(q.to(torch.int32))

    def scales(self, n: int) -> torch.Tensor:
        return self.scales_and_zeros[:, :n, 0].to(self.load_dtype).contiguous()

    @classmethod
    def cat(cls, parts: list["_CPUWeight"]) -> "_CPUWeight":
        """The parts joined along N (each a whole number of column blocks, so the bytes concatenate)."""
        out = cls.__new__(cls)
        out.n_pad = sum(p.n_pad for p in parts)
        out.packed = torch.cat([p.packed for p in parts])
        out.load_dtype, out.compute = parts[0].load_dtype, parts[0].compute
        out.scales_and_zeros = torch.cat([p.scales_and_zeros for p in parts], dim=1)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))


def _changes(fn, t: torch.Tensor) -> bool:
    """Whether `Module._apply`'s fn would move or cast a tensor like t (tried on an empty one)."""
    probe = torch.empty(0, dtype=t.dtype, device=t.device)
    out = fn(probe)
    return out.device != probe.device or out.dtype != probe.dtype


DEQUANT_CHUNK = 32 * 2 ** 20      # weights dequantized at once on CPU: the scratch is 3 bytes each (u8 + bf16)


class _TinygemmWeight:
    def __init__(self, lin: "AWQLinear"):
        q, sz = int4pack.awq_to_int4(lin.qweight, lin.qzeros, lin.scales, lin.group_size)
        self.packed = int4pack.cuda_pack(q)
        self.scales_and_zeros = sz.to(torch.bfloat16).contiguous()


class AWQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 scratch: int4pack.DequantScratch | None = None, table: PathTable | None = None):
        super().__init__()
        if in_features % group_size or out_features % 8:
            raise ValueError(f"AWQ linear {in_features}->{out_features} needs in % {group_size} == 0 and out % 8 == 0")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features, out_features // 8, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("scaled_zeros", None, persistent=False)
        self.scratch = scratch or int4pack.DequantScratch()
        self._table_override = table  # None: the device's table (`paths.table_for`)
        self._loaded = False
        self._prepared = False        # prepare() ran for the tensors' current device
        self._cpu: _CPUWeight | None = None
        self._tinygemm: _TinygemmWeight | None = None
        self._tinygemm_refused: str | None = None

    # ---- the AutoAWQ form ------------------------------------------------------------------

    def post_load(self) -> None:
        """Derive the kernel's scaled zeros from the loaded integer zeros."""
        self._release()
        self._prepared = False
        z = unpack_awq(self.qzeros).float()
        self.scaled_zeros = (-z * self.scales.float()).to(self.scales.dtype)
        self._loaded = True

    _REBUILT = ("qweight", "scales", "scaled_zeros")     # what the CPU form replaces, rebuilt on access

    def __getattr__(self, name: str):
        cpu = self.__dict__.get("_cpu")
        if cpu is not None and name in self._REBUILT:
            if name == "qweight":
                return cpu.qweight(self.in_features, self.out_features)
            scales = cpu.scales(self.out_features)
            if name == "scales":
                return scales
            return (-unpack_awq(self.qzeros).float() * scales.float()).to(scales.dtype)
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._cpu is not None:
            destination[prefix + "qweight"] = self.qweight
            destination[prefix + "scales"] = self.scales

    def _release(self) -> None:
        """Back to the AutoAWQ form only (rebuilding what the CPU form replaced)."""
        if self._cpu is not None:
            rebuilt = {name: getattr(self, name) for name in self._REBUILT}
            self._cpu = None
            for name, t in rebuilt.items():
                self.register_buffer(name, t, persistent=name != "scaled_zeros")
        self._tinygemm = None

    def _apply(self, fn, recurse=True):
        self._prepared = False
        c = self._cpu
        if c is not None and not _changes(fn, c.packed) and not _changes(fn, c.scales_and_zeros):
            return super()._apply(fn, recurse)            # e.g. `.to("cpu")` of a CPU model: the form stays
        self._release()
        return super()._apply(fn, recurse)

    @classmethod
    @torch.no_grad()
    def concat(cls, parts: list["AWQLinear"]) -> "AWQLinear":
        """The parts as one AWQLinear over the same input: packed weights, zeros and scales joined
        along the output columns (packing is within groups of 8 columns, so they concatenate)."""
        first = parts[0]
        if any(p.in_features != first.in_features or p.group_size != first.group_size for p in parts):
            raise ValueError("AWQ linears fuse only with the same input size and group size")
        has_bias = first.bias is not None
        fused = cls(first.in_features, sum(p.out_features for p in parts), has_bias, first.group_size,
                    first.scratch, first.table)
        if all(p._cpu is not None and p._cpu.n_pad == p.out_features for p in parts):   # already in the CPU form
            fused.qzeros = torch.cat([p.qzeros for p in parts], dim=1)
            if has_bias:
                fused.bias = torch.cat([p.bias for p in parts])
            for name in fused._REBUILT:
                del fused._buffers[name]
            fused._cpu, fused._loaded = _CPUWeight.cat([p._cpu for p in parts]), True
            return fused
        for name in ("qweight", "qzeros", "scales"):
            setattr(fused, name, torch.cat([getattr(p, name) for p in parts], dim=1))
        if has_bias:
            fused.bias = torch.cat([p.bias for p in parts])
        fused.post_load()
        return fused

    # ---- the device's form -------------------------------------------------------------------

    @property
    def table(self) -> PathTable | None:
        """The path table this linear follows (None: its device's); setting it prepares again."""
        return self._table_override

    @table.setter
    def table(self, table: PathTable | None) -> None:
        self._table_override = table
        self._prepared = False

    def _table(self, device: torch.device) -> PathTable:
        return self._table_override if self._table_override is not None else table_for(device)

    @torch.no_grad()
    def prepare(self) -> None:
        """Put the weight in the form its device's paths read (once; later calls return at once)."""
        if not self._loaded:
            raise RuntimeError("AWQLinear.post_load() was not called after loading weights")
        if self._prepared:
            return
        device = self.qzeros.device
        self._prepared = True
        if device.type == "cpu":
            if self._cpu is None:
                cpu = _CPUWeight(self)
                for name in self._REBUILT:
                    del self._buffers[name]
                self.qzeros = self.qzeros.clone()     # nothing of the checkpoint file stays mapped
                if self.bias is not None:
                    self.bias = self.bias.clone()
                self._cpu = cpu
            return
        if "tinygemm" in self._table(device).paths("cuda") and self._tinygemm is None and not self._tinygemm_refused:
            try:
                self._tinygemm = _TinygemmWeight(self)
            except ValueError as e:            # a shape tinygemm cannot take: the other paths serve it
                self._tinygemm_refused = str(e)

    def path(self, m: int, dtype: torch.dtype, device: torch.device) -> str:
        """The path a call with M rows computed in `dtype` takes (after `prepare`; on CPU the compute dtype
        is bf16 for a bf16 load and fp32 otherwise, whatever the activations' dtype)."""
        p = self._table(device).choose(device.type, dtype, m, self.in_features, self.out_features)
        if p == "tinygemm" and self._tinygemm is None:     # refused this shape: the built-in choice serves it
            return DEFAULT.choose(device.type, dtype, m, self.in_features, self.out_features)
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.prepare()
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.device != self.qzeros.device:
            raise ValueError(f"input on {x2.device}, AWQ weights on {self.qzeros.device}")
        m, n = x2.shape[0], self.out_features
        path = self.path(m, self._cpu.compute if self._cpu is not None else x2.dtype, x2.device)
        if path == "cpu-int4mm":
            c = self._cpu
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), c.packed, self.group_size,
                                                  c.scales_and_zeros)[:, :n].to(x.dtype)
        elif path == "cpu-dequant":
            y = self._dequant_gemm(x2.to(self._cpu.compute))[:, :n].to(x.dtype)
        elif path == "tinygemm":
            t = self._tinygemm
            y = torch._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), t.packed, self.group_size,
                                          t.scales_and_zeros).to(x.dtype)
        elif path == "cuda-dequant":
            w = self.scratch.weight(self.in_features, n, x2.dtype, x2.device)
            w4a16_dequantize(self.qweight, self.scales, self.scaled_zeros, self.group_size, out=w)
            y = x2 @ w
        else:
            kernel = w4a16_gemv if m == 1 else w4a16_decode if m <= 16 else w4a16_matmul
            y = kernel(x2.contiguous(), self.qweight, self.scales, self.scaled_zeros, self.group_size)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], n)

    def _dequant_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W on CPU, W dequantized into the shared scratch DEQUANT_CHUNK weights (whole groups of rows)
        at a time; partial products summed in fp32."""
        c, k, g = self._cpu, self.in_features, self.group_size
        rows = max(g, DEQUANT_CHUNK // c.n_pad // g * g)
        if rows >= k:
            return x @ int4pack.cpu_dequantize(c.packed, c.scales_and_zeros, g, self.scratch)
        acc = None
        for k0 in range(0, k, rows):
            k1 = min(k, k0 + rows)
            part = x[:, k0:k1] @ int4pack.cpu_dequantize(c.packed, c.scales_and_zeros, g, self.scratch, k0, k1)
            acc = part.float() if acc is None else acc.add_(part)
        return acc.to(c.compute)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def prepare_awq(model: nn.Module) -> None:
    """`prepare()` every AWQ linear of a loaded (and fused) model."""
    for m in model.modules():
        if isinstance(m, AWQLinear):
            m.prepare()


_CHECKPOINT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")


def awq_linear_factory(cfg: AWQConfig) -> LinearFactory:
    """AWQLinear for every decoder linear except those `modules_to_not_convert` names; the linears of one
    model share one dequantize scratch buffer."""
    skip = tuple(_strip_prefix(s) for s in cfg.modules_to_not_convert)
    scratch = int4pack.DequantScratch()

    def make(in_features: int, out_features: int, bias: bool, name: str) -> nn.Module:
        if any(s and s in name for s in skip):
            return dense_linear(in_features, out_features, bias, name)
        return AWQLinear(in_features, out_features, bias, cfg.group_size, scratch)

    return make


def _strip_prefix(name: str) -> str:
    for p in _CHECKPOINT_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name
