"""Tensors to and from protobuf: raw little-endian bytes with dtype and shape, checked before use."""

from __future__ import annotations

import math

import numpy as np
import torch

from neuron.errors import InvalidArgument
from neuron.pb.neuron.v1 import axon_pb2 as pb

# bfloat16 has no numpy dtype: it travels as its raw 16-bit pattern.
_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "int64": (torch.int64, np.dtype("<i8")),
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),
}
_NAMES = {t: name for name, (t, _) in _DTYPES.items()}
MAX_DIMS = 4


def to_pb(tensor: torch.Tensor) -> pb.Tensor:
    """Encode a tensor; the bytes are little-endian whatever the host."""
    name = _NAMES.get(tensor.dtype)
    if name is None:
        raise TypeError(f"no wire dtype for {tensor.dtype}")
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    array = t.numpy().astype(_DTYPES[name][1], copy=False)
    return pb.Tensor(dtype=name, shape=list(tensor.shape), data=array.tobytes())


def from_pb(msg: pb.Tensor, *, name: str, dtype: str | None = None, max_elements: int | None = None) -> torch.Tensor:
    """Decode a tensor, raising InvalidArgument (naming the field) unless dtype, shape and bytes agree."""
    if msg.dtype not in _DTYPES:
        raise InvalidArgument(f"{name}: unknown dtype {msg.dtype[:32]!r} (expected one of {', '.join(_DTYPES)})")
    if dtype is not None and msg.dtype != dtype:
        raise InvalidArgument(f"{name}: dtype must be {dtype}, got {msg.dtype}")
    if not 1 <= len(msg.shape) <= MAX_DIMS:  # the count before the list: a shape may have millions of entries
        raise InvalidArgument(f"{name}: expected 1 to {MAX_DIMS} dimensions, got {len(msg.shape)}")
    shape = list(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{name}: negative dimension in shape {shape}")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise InvalidArgument(f"{name}: {count} elements exceed the limit of {max_elements}")
    torch_dtype, np_dtype = _DTYPES[msg.dtype]
    if len(msg.data) != count * np_dtype.itemsize:
        raise InvalidArgument(
            f"{name}: shape {shape} of {msg.dtype} needs {count * np_dtype.itemsize} bytes, got {len(msg.data)}"
        )
    array = np.frombuffer(msg.data, dtype=np_dtype).reshape(shape)
    tensor = torch.from_numpy(array.astype(np_dtype.newbyteorder("="), copy=True))
    return tensor.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else tensor
