"""The msgpack tensor codec used for image embeddings between replicas."""

import msgpack
import pytest
import torch

from deployments.wire import WireError, pack_tensors, tensor_to_dict, unpack_tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.bool])
def test_round_trip_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    ts = [(torch.randn(36, 128, generator=g) * 10).to(dtype), torch.randn(2, 3, 4, generator=g).to(dtype)[:, 1],
          torch.zeros(0, 5, dtype=dtype), torch.tensor(3).to(dtype)]
    out = unpack_tensors(pack_tensors(ts))
    assert len(out) == len(ts)
    for a, b in zip(ts, out):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))   # bit for bit


def test_layout_is_plain_msgpack():
    t = torch.tensor([[1.0, -2.0]], dtype=torch.float16)
    d = msgpack.unpackb(pack_tensors([t]))[0]
    assert d == {"dtype": "float16", "shape": [1, 2], "data": t.numpy().tobytes()}
    assert tensor_to_dict(t)["data"] == b"\x00\x3c\x00\xc0"    # IEEE half 1.0 and -2.0, little-endian


@pytest.mark.parametrize("payload,message", [
    (b"\xc1", "not a msgpack"),
    (msgpack.packb({"dtype": "float32"}), "msgpack array"),
    (msgpack.packb([{"dtype": "float32", "shape": [2]}]), "exactly the keys"),
    (msgpack.packb([{"dtype": "complex7", "shape": [1], "data": b"1234"}]), "unknown dtype"),
    (msgpack.packb([{"dtype": "float32", "shape": [-1], "data": b""}]), "non-negative"),
    (msgpack.packb([{"dtype": "float32", "shape": [2], "data": b"1234"}]), "needs 8"),
])
def test_malformed_payloads_name_the_problem(payload, message):
    with pytest.raises(WireError, match=message):
        unpack_tensors(payload)
