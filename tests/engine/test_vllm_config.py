"""The vLLM backend's start-up sizing and model checks, which run without vLLM."""

import time

import pytest

from neuron.config import ConfigError, MinerConfig, load, parse_dotted, with_overrides
from neuron.engine import open_engine
from neuron.engine.vllm_config import HOST_MEMORY_SHARE, VllmConfig, cpu_kv_cache_bytes, kv_bytes_per_token
from neuron.model import ModelNotFound

def test_kv_bytes_per_token_of_each_architecture(tiny, smollm2):
    # OPT (tiny): 2 layers x (key + value) x 4 heads x 16 dims x float32
    assert kv_bytes_per_token(tiny.model.config.to_dict(), 4) == 2 * 2 * 4 * 16 * 4
    # Llama with grouped-query attention (SmolLM2-135M): 30 layers, 3 key-value heads of 64 dims
    assert kv_bytes_per_token(smollm2.model.config.to_dict(), 2) == 30 * 2 * 3 * 64 * 2
    # GPT-Neo names its sizes otherwise
    neo = {"model_type": "gpt_neo", "num_layers": 24, "num_heads": 16, "hidden_size": 2048}
    assert kv_bytes_per_token(neo, 2) == 24 * 2 * 16 * 128 * 2


def test_the_cpu_kv_cache_fits_the_limits_and_never_most_of_the_host(smollm2):
    hf = smollm2.model.config.to_dict()
    size, need = cpu_kv_cache_bytes(hf, 4, 512, 16, host_bytes=24 << 30)
    assert size == need and size % (1 << 20) == 0
    assert need >= kv_bytes_per_token(hf, 4) * 512 * 16  # room for every sequence at the limit
    size, need = cpu_kv_cache_bytes(hf, 4, 8192, 64, host_bytes=24 << 30)
    assert need > size == int((24 << 30) * HOST_MEMORY_SHARE)


def test_a_missing_model_fails_fast_on_the_vllm_backend_too(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    for name, says in ((str(tmp_path / "no-such-model"), "does not exist"),
                       ("someone/not-cached", "not in the Hugging Face cache")):
        config = with_overrides(MinerConfig(), **{"engine.backend": "vllm", "model.name": name})
        with pytest.raises(ModelNotFound, match=says):
            open_engine(config)  # before vLLM is imported: the same check and message as the HF backend
    assert time.monotonic() - start < 5


def test_pipeline_stages_and_the_executor_become_vllms_engine_args():
    flags = ["--engine.backend", "vllm", "--engine.vllm.tensor_parallel_size", "8",
             "--engine.vllm.pipeline_parallel_size", "2", "--engine.vllm.distributed_executor_backend", "ray"]
    knobs = load(MinerConfig, None, parse_dotted(flags)).engine.vllm
    kwargs = knobs.engine_kwargs(on_cpu=False, max_model_len=2048, auto_dtype="float16")
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (8, 2)
    assert kwargs["distributed_executor_backend"] == "ray" and kwargs["max_model_len"] == 2048
    assert kwargs["dtype"] == "float16"
    assert "distributed_executor_backend" not in VllmConfig().engine_kwargs(on_cpu=False, max_model_len=0, auto_dtype="float16")


@pytest.mark.parametrize("flag, value, says", [
    ("pipeline_parallel_size", "0", "--engine.vllm.pipeline_parallel_size 0: expected 1 or more"),
    ("tensor_parallel_size", "-1", "--engine.vllm.tensor_parallel_size -1: expected 1 or more"),
    ("distributed_executor_backend", "slurm", "--engine.vllm.distributed_executor_backend slurm: expected one of"),
])
def test_a_bad_parallel_knob_is_a_config_error_naming_its_flag(flag, value, says):
    with pytest.raises(ConfigError, match=says):
        load(MinerConfig, None, parse_dotted([f"--engine.vllm.{flag}", value]))
