"""The vLLM backend's knobs (`--engine.vllm.*`), kept apart from neuron/engine/vllm.py so config loads without vLLM."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VllmConfig:
    """vLLM's own settings, under the names vLLM gives them (used with --engine.backend vllm)."""

    max_model_len: int = 0  # longest prompt + generation per sequence; 0: the model's own limit
    kv_cache_memory_bytes: int = 0  # KV cache to allocate; 0: sized from gpu_memory_utilization (set it on CPU, e.g. 536870912)
    gpu_memory_utilization: float = 0.9  # share of device memory vLLM may use (on CPU: of host memory; use ~0.1 there)
    tensor_parallel_size: int = 1  # GPUs each layer is split over (tensor parallelism): one host's GPUs; 1 on CPU
    pipeline_parallel_size: int = 1  # stages the layers are split into, one per host: a model beyond one machine
    distributed_executor_backend: str = ""  # "mp" (one host), "ray" (a Ray cluster: docs/models.md); "": vLLM's choice
    enforce_eager: bool = False  # skip CUDA graphs and compilation: faster start, slower steps (always on for CPU)
    dtype: str = "auto"  # "auto" (float16 on CUDA, float32 on CPU and for GPT-Neo), "float32", "float16", "bfloat16"
    max_num_seqs: int = 16  # sequences decoded together; more wait in vLLM's queue
    max_logprobs: int = 64  # largest top-k / top-n a request may ask for: at least limits.max_topk and max_logprobs_topn

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--engine.vllm.{name} {getattr(self, name)}: expected 1 or more")
        if self.distributed_executor_backend not in EXECUTORS:
            raise ValueError(f"--engine.vllm.distributed_executor_backend {self.distributed_executor_backend}: "
                             f"expected one of {', '.join(repr(e) for e in EXECUTORS)}")

    def engine_kwargs(self, on_cpu: bool, max_model_len: int, auto_dtype: str) -> dict:
        """These knobs as vLLM's EngineArgs keywords (the rest: neuron/engine/vllm.py engine_args), "auto" served
        in `auto_dtype` (neuron/model.py's, not vLLM's own); here, so that what reaches vLLM is tested without it."""
        kwargs = dict(
            dtype=self.dtype if self.dtype != "auto" else auto_dtype,
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            enforce_eager=self.enforce_eager or on_cpu,
            max_num_seqs=self.max_num_seqs,
            max_logprobs=self.max_logprobs,
        )
        if self.distributed_executor_backend:
            kwargs["distributed_executor_backend"] = self.distributed_executor_backend
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if self.kv_cache_memory_bytes:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        return kwargs


# vLLM's executors for a model over several GPUs ("": vLLM's own choice).
EXECUTORS = ("", "mp", "ray")


# The most of the host's memory a KV cache sized here may take on a CPU (vLLM's own default there is its
# gpu_memory_utilization share of host memory: 19.75 GiB of a 24 GiB host once).
HOST_MEMORY_SHARE = 0.25


def kv_bytes_per_token(hf: dict, dtype_bytes: int) -> int:
    """Key and value bytes one token holds in every layer, from a Hugging Face config (OPT, GPT-Neo, Llama)."""
    layers = hf.get("num_hidden_layers") or hf.get("num_layers") or hf["n_layer"]
    heads = hf.get("num_attention_heads") or hf.get("num_heads") or hf["n_head"]
    head_dim = hf.get("head_dim") or (hf.get("hidden_size") or hf["n_embd"]) // heads
    return 2 * layers * (hf.get("num_key_value_heads") or heads) * head_dim * dtype_bytes


def cpu_kv_cache_bytes(hf: dict, dtype_bytes: int, max_model_len: int, max_num_seqs: int,
                       host_bytes: int) -> tuple[int, int]:
    """(bytes to give vLLM's CPU KV cache, bytes the miner's limits need): room for max_num_seqs sequences
    of max_model_len tokens, a quarter more for vLLM's block rounding, and never over HOST_MEMORY_SHARE."""
    need = kv_bytes_per_token(hf, dtype_bytes) * max_model_len * max_num_seqs * 5 // 4
    need = -(-need // (1 << 20)) << 20  # whole MiB
    return min(need, int(host_bytes * HOST_MEMORY_SHARE) >> 20 << 20), need
