"""The vLLM backend's knobs (`--engine.vllm.*`), kept apart from neuron/engine/vllm.py so config loads without vLLM."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VllmConfig:
    """vLLM's own settings, under the names vLLM gives them (used with --engine.backend vllm)."""

    max_model_len: int = 0  # longest prompt + generation per sequence; 0: the model's own limit
    kv_cache_memory_bytes: int = 0  # KV cache to allocate; 0: sized from gpu_memory_utilization (set it on CPU, e.g. 536870912)
    gpu_memory_utilization: float = 0.9  # share of device memory vLLM may use (on CPU: of host memory; use ~0.1 there)
    tensor_parallel_size: int = 1  # GPUs one model is split over (tensor parallelism); 1 on CPU
    enforce_eager: bool = False  # skip CUDA graphs and compilation: faster start, slower steps (always on for CPU)
    dtype: str = "auto"  # "auto" (float16 on CUDA, float32 on CPU), "float32", "float16", "bfloat16"
    max_num_seqs: int = 16  # sequences decoded together; more wait in vLLM's queue
    max_logprobs: int = 64  # largest top-k / top-n a request may ask for: at least limits.max_topk and max_logprobs_topn
