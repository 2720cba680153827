"""The one codec for tensors that leave a process as bytes: msgpack maps `{dtype, shape, data}`.

Image embeddings go from VisionEncoder replicas to LLMServer replicas as these bytes (one
buffer per request, carried by Ray's object store), so every dtype the models use — bfloat16
included, which numpy cannot hold — survives the trip exactly, and any msgpack reader can
decode them: `data` is the tensor's raw little-endian bytes in row-major order.
"""

from __future__ import annotations

import math
import sys

import msgpack
import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
          "bool": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


class WireError(ValueError):
    """Bytes that are not a tensor payload of this codec."""


def tensor_to_dict(t: torch.Tensor) -> dict:
    if t.dtype not in NAMES:
        raise WireError(f"cannot encode tensors of dtype {t.dtype}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    if sys.byteorder != "little":   # pragma: no cover - every supported platform is little-endian
        raise WireError("big-endian hosts are not supported")
    return {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data": data}


def tensor_from_dict(d: dict) -> torch.Tensor:
    if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data"}:
        raise WireError("a tensor payload is a map with exactly the keys dtype, shape, data")
    dtype = DTYPES.get(d["dtype"])
    if dtype is None:
        raise WireError(f"unknown dtype {d['dtype']!r}; known: {sorted(DTYPES)}")
    shape = d["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise WireError(f"shape must be a list of non-negative ints, got {shape!r}")
    data = d["data"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not isinstance(data, (bytes, bytearray)) or len(data) != math.prod(shape) * itemsize:
        raise WireError(f"data has {len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__} "
                        f"bytes; shape {shape} of {d['dtype']} needs {math.prod(shape) * itemsize}")
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def pack_tensors(tensors: list[torch.Tensor]) -> bytes:
    """A list of tensors as one msgpack buffer."""
    return msgpack.packb([tensor_to_dict(t) for t in tensors], use_bin_type=True)


def unpack_tensors(buf: bytes) -> list[torch.Tensor]:
    try:
        items = msgpack.unpackb(buf, raw=False)
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        raise WireError(f"not a msgpack tensor list: {e}") from None
    if not isinstance(items, list):
        raise WireError("a tensor list payload is a msgpack array")
    return [tensor_from_dict(d) for d in items]
