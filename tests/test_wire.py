import pytest
import torch

from neuron import wire
from neuron.errors import InvalidArgument
from neuron.pb.neuron.v1 import axon_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_keeps_values_dtype_and_shape(dtype):
    t = (torch.randn(3, 4, 5) * 100).to(dtype)
    back = wire.from_pb(wire.to_pb(t), name="t")
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_bytes_are_little_endian():
    msg = wire.to_pb(torch.tensor([1, 256], dtype=torch.int64))
    assert msg.data == (1).to_bytes(8, "little") + (256).to_bytes(8, "little")


@pytest.mark.parametrize(
    "msg, needle",
    [
        (pb.Tensor(dtype="pickle", shape=[1], data=b"x"), "unknown dtype"),
        (pb.Tensor(dtype="int64", shape=[2, 2], data=b"\0" * 24), "needs 32 bytes, got 24"),
        (pb.Tensor(dtype="int64", shape=[], data=b""), "dimensions"),
        (pb.Tensor(dtype="int64", shape=[1, 1, 1, 1, 1], data=b"\0" * 8), "dimensions"),
        (pb.Tensor(dtype="int64", shape=[-1, -8], data=b"\0" * 64), "negative"),
        (pb.Tensor(dtype="float32", shape=[2], data=b"\0" * 8), "dtype must be int64"),
    ],
)
def test_malformed_tensors_are_refused_with_a_reason(msg, needle):
    with pytest.raises(InvalidArgument, match=needle):
        wire.from_pb(msg, name="t", dtype="int64" if "must be" in needle else None)


def test_element_limit_is_checked_before_the_bytes():
    huge = pb.Tensor(dtype="int64", shape=[1 << 20, 1 << 20], data=b"")
    with pytest.raises(InvalidArgument, match="exceed the limit"):
        wire.from_pb(huge, name="input_ids", max_elements=1000)


def test_a_shape_with_millions_of_entries_is_refused_by_its_count():
    """The number of dimensions is checked before the shape becomes a list (a list of 1M ints is ~36 MB)."""
    import tracemalloc

    msg = pb.Tensor(dtype="int64", shape=[1] * 1_000_000, data=b"")
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument, match="dimensions"):
            wire.from_pb(msg, name="input_ids", max_elements=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} bytes allocated to refuse it"
