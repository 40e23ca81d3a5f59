"""The engine contract (tests/engine/test_contract.py) on CUDA in float32, decode steps replayed from CUDA graphs.

The same test functions, collected here over fixtures that put the models on the GPU: greedy equals
`model.generate`, the seeded sampler equals the spec over the model's own logits, joins, cancels at every
point of a step, deadlines and the queue bound. The HF backend only: vLLM's CUDA wheel cannot travel to a
lent GPU (docs/gpu.md). Float16 has its own tests (test_cuda_engine.py): there the spec is checked over
the engine's own logits, since another pass of the model in float16 may part from them at a near-tie.
"""

from __future__ import annotations

import pytest

from conftest import cuda_model, needs_cuda
from engine.test_contract import *  # noqa: F401,F403 -- the contract's tests, run here over the fixtures below

pytestmark = [pytest.mark.cuda, needs_cuda]

MODELS = ("tiny", "tiny-gpt-neo")  # what travels: the embedded models (a GPT-Neo with local attention layers)
@pytest.fixture
def backend():
    return "hf"


@pytest.fixture(params=MODELS)
def lm(request):
    return cuda_model(request.param)


@pytest.fixture
def small():
    return cuda_model("tiny")
