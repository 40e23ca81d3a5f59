"""gumbel-v1 through the vLLM logits processor's function: the spec's vectors, fabricated batches (no vLLM needed)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from neuron.engine import sampler as S
from neuron.engine import vllm_sampler as VS
from neuron.engine.types import Sampler, SamplingParams

VECTORS = json.loads((Path(__file__).resolve().parents[2] / "docs" / "sampling_vectors.json").read_text())


def greedy_pick(logits: torch.Tensor) -> list[int]:
    """What vLLM does with a greedy row after the processor: the argmax."""
    return logits.argmax(dim=1).tolist()


@pytest.mark.parametrize("v", VECTORS["tokens"], ids=lambda v: f"T{v['temperature']}-k{v['top_k']}-p{v['top_p']}")
def test_token_vectors_through_the_processor_function(v):
    row = torch.tensor([v["logits"]], dtype=torch.float32)
    before = row.clone()
    forced = VS.force_choice(row, {0: (v["temperature"], v["top_k"], v["top_p"], int(v["seed"]), v["step"])})
    assert greedy_pick(forced) == [v["token"]]
    assert int(torch.isfinite(forced[0]).sum()) == 1
    assert float(forced[0, v["token"]]) == float(before[0, v["token"]])  # the kept logit is the raw one


def test_only_the_seeded_rows_of_a_batch_change_and_each_gets_its_own_step():
    rng = random.Random(5)
    V = 500
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(2)) * 4
    rows = {i: (rng.choice([0.0, 0.7, 1.0, 1.5]), rng.choice([0, 1, 50]), rng.choice([1.0, 0.9]),
                rng.getrandbits(63), rng.randrange(64)) for i in (1, 4, 5, 7)}
    forced = VS.force_choice(logits.clone(), rows)
    for i in range(8):
        if i in rows:
            assert greedy_pick(forced[i:i + 1]) == S.choose(logits[i:i + 1], S.RowParams.build([rows[i]])).tolist()
        else:
            assert torch.equal(forced[i], logits[i])


def test_extra_args_round_trip():
    sp = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=(1 << 63) - 1, sampler=Sampler.GUMBEL_V1)
    assert VS.row_args(VS.extra_args(sp)) == (0.7, 50, 0.9, (1 << 63) - 1)
    assert VS.row_args(None) is None and VS.row_args({"other": 1}) is None
    assert json.loads(json.dumps(VS.extra_args(sp))) == VS.extra_args(sp)


def test_no_rows_leaves_the_logits_alone():
    x = torch.randn(3, 10)
    assert VS.force_choice(x, {}) is x
    assert not math.isinf(float(x.abs().max()))
