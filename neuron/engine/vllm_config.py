"""The vLLM backend's knobs (`--engine.vllm.*`), kept apart from neuron/engine/vllm.py so config loads without vLLM."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VllmConfig:
    # Longest prompt + generation per sequence; 0: the model's own limit. Bounds the KV cache per sequence.
    max_model_len: int = 0
    # Bytes of KV cache to allocate; 0: let vLLM size it from gpu_memory_utilization. On CPU set it
    # (e.g. 512 MiB for SmolLM2-135M): vLLM's CPU default takes a large share of host memory.
    kv_cache_memory_bytes: int = 0
    # Share of the device memory vLLM may use (on CPU: of host memory) for weights, activations and KV cache.
    gpu_memory_utilization: float = 0.9
    # GPUs one model is split over (tensor parallelism); 1 on CPU.
    tensor_parallel_size: int = 1
    # Skip CUDA graphs and compilation: slower steps, faster start, less memory. Always on for CPU here.
    enforce_eager: bool = False
    # "auto" (float16 on CUDA, float32 on CPU, as the HF backend), "float32", "float16", "bfloat16".
    dtype: str = "auto"
    # Sequences decoded together (vLLM's max_num_seqs); requests beyond wait in vLLM's queue.
    max_num_seqs: int = 16
    # Largest top-k / top-n of log-probabilities a request may ask for (vLLM's max_logprobs); at least
    # the axon's limits.max_topk and limits.max_logprobs_topn.
    max_logprobs: int = 64
