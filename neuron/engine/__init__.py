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
        import os

        from neuron.model import locate

        # The same model checks as the HF backend's load: a missing model fails in seconds, with the fix.
        source, offline = locate(config.model.name)
        if offline:  # cached and no hub (or HF_HUB_OFFLINE=1): vLLM and its processes stay off the hub too
            os.environ["HF_HUB_OFFLINE"] = "1"
        from neuron.engine.vllm import VllmEngine

        return VllmEngine(source, config.engine.vllm, queue_size=config.batching.queue_size, model_id=config.model.name,
                          stall_timeout_s=config.batching.stall_timeout_s, max_seq_len=config.limits.max_seq_len)
    raise ValueError(f"unknown engine backend {backend!r}: expected one of {', '.join(BACKENDS)}")
