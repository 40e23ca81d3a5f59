"""The hook that sends `neuron bench --engine.backend vllm` to neuron/harness/bench/vllm.py (no vLLM needed)."""

from neuron.harness.bench.vllm import wants_vllm


def test_the_backend_flag_selects_the_vllm_bench():
    assert wants_vllm(["--engine.backend", "vllm", "--reps", "2"])
    assert wants_vllm(["--engine.backend=vllm"])
    assert not wants_vllm(["--engine.backend", "hf"])
    assert not wants_vllm(["--json", "x.json"])
    assert not wants_vllm(["--engine.backend"])
