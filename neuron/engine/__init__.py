"""The engine boundary: the axon, the bench and the harnesses talk to an `Engine` (types.py) only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from neuron.engine.types import Engine

if TYPE_CHECKING:
    from neuron.config import MinerConfig

BACKENDS = ("hf", "vllm")


def open_engine(config: "MinerConfig") -> Engine:
    """Load the model and build the engine `config.engine.backend` names (blocking: minutes for a large model)."""
    backend = config.engine.backend
    if backend == "hf":
        from neuron.engine.hf import HFEngine
        from neuron.model import load_model

        lm = load_model(config.model.name, config.model.device, config.model.dtype)
        return HFEngine(lm, config.batching, config.limits.max_seq_len)
    if backend == "vllm":
        from neuron.engine.vllm import VllmEngine

        return VllmEngine(config.model.name, config.engine.vllm, queue_size=config.batching.queue_size,
                          stall_timeout_s=config.batching.stall_timeout_s)
    raise ValueError(f"unknown engine backend {backend!r}: expected one of {', '.join(BACKENDS)}")
