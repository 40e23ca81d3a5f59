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
from tests.engine.test_sampler import reference_choice

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


def _random_rows(rng: random.Random, n: int, V: int) -> list[tuple[float, int, float, int, int]]:
    return [(rng.choice([0.0, 0.01, 0.3, 0.7, 1.0, 1.5, 100.0]), rng.choice([0, 0, 1, 2, 5, 50, V, V + 7]),
             rng.choice([1.0, 1.0, 0.9, 0.5, 0.99, 1e-9, 0.999999]), rng.getrandbits(63), rng.randrange(1 << 20))
            for _ in range(n)]


def _random_logits(g: torch.Generator, rng: random.Random, B: int, V: int) -> torch.Tensor:
    kind = rng.choice(["normal", "peaky", "flat", "ties", "inf", "zeros"])
    x = torch.randn(B, V, generator=g) * rng.choice([0.3, 1.0, 3.0, 8.0])
    if kind == "peaky":
        x[:, torch.randint(V, (4,), generator=g)] += 15.0
    elif kind == "flat":
        x = x * 0.01
    elif kind == "ties":
        x = (x * 2).round() / 2  # many exact ties, at every cut
    elif kind == "inf":
        x[torch.rand(B, V, generator=g) < 0.3] = -math.inf
        x[:, 0] = 1.0  # at least one finite logit per row
    elif kind == "zeros":
        x = torch.zeros(B, V)
        x[:, rng.randrange(V)] = -0.0
    return x


@pytest.mark.parametrize("tiers", [None, (4, 16), (1,), (3, 7, 30), (10 ** 9,)])
@pytest.mark.parametrize("seed", range(12))
def test_candidates_give_the_samplers_token_on_random_batches(seed, tiers):
    """The fast path against sampler.choose over many random batches: ties, -inf, top-k 0/1/V, top-p 1.0 and
    near 0, tiny and huge temperatures, and small tiers so that every widening and the fallback run (the
    last tier, past any vocabulary, is the GPU's path: the nucleus over the whole row, nothing read back)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(6):
        V = rng.choice([2, 7, 64, 300, 5000])
        B = rng.choice([1, 3, 8])
        x = _random_logits(g, rng, B, V)
        rows = _random_rows(rng, B, V)
        want = S.choose(x, S.RowParams.build(rows))
        got = VS.choose(x.clone(), rows, tiers)
        assert got.tolist() == want.tolist(), (V, rows)
        if V <= 300:
            assert got.tolist() == [reference_choice(x[i].tolist(), *rows[i])[0] for i in range(B)]


def test_smollm2_sized_rows_of_every_setting_match_the_sampler():
    """8 rows of SmolLM2's vocabulary, the bench's settings and a mixed batch, with the default tiers."""
    V = 49152
    g = torch.Generator().manual_seed(9)
    settings = [(0.8, 50, 1.0), (1.0, 0, 1.0), (1.0, 0, 0.9), (0.7, 0, 0.95), (0.0, 0, 1.0), (1.0, 40, 0.9),
                (1.5, 0, 0.9), (0.3, 0, 0.5)]
    for scale in (3.0, 8.0):
        x = torch.randn(8, V, generator=g) * scale
        for t, k, p in settings:
            rows = [(t, k, p, 1000 + i, 17) for i in range(8)]
            assert VS.choose(x, rows).tolist() == S.choose(x, S.RowParams.build(rows)).tolist()
        mixed = [(*settings[i], 5 + i, 3) for i in range(8)]
        assert VS.choose(x, mixed).tolist() == S.choose(x, S.RowParams.build(mixed)).tolist()


def test_half_precision_logits_and_the_order_keys():
    x = torch.tensor([[0.0, -0.0, 1.5, -1.5, math.inf, -math.inf, 1e-45, -1e-45, 3.0, 3.0]])
    order = VS._ids_of(VS.order_keys(x).sort(dim=1, descending=True).values)[0].tolist()
    assert order == sorted(range(10), key=lambda i: (-float(x[0, i]), i))
    h = (torch.randn(4, 500, generator=torch.Generator().manual_seed(4)) * 4).half()
    rows = [(1.0, 0, 0.9, 1, 2), (0.7, 20, 1.0, 3, 4), (1.2, 0, 1.0, 5, 6), (0.0, 0, 1.0, 7, 8)]
    assert VS.choose(h, rows).tolist() == S.choose(h, S.RowParams.build(rows)).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_cpus_tokens():
    rng = random.Random(1)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        V = rng.choice([300, 5000, 49152])
        x = _random_logits(g, rng, 8, V)
        rows = _random_rows(rng, 8, V)
        assert VS.choose(x.cuda(), rows).tolist() == VS.choose(x, rows).tolist() == \
            S.choose(x, S.RowParams.build(rows)).tolist()


def test_batches_past_the_kept_buffers_and_after_them_again():
    rng = random.Random(8)
    g = torch.Generator().manual_seed(8)
    for B in (70, 3, 65, 8):  # more rows than VS._Workspace.MAX_ROWS get plain tensors
        x = torch.randn(B, 300, generator=g) * 3
        rows = _random_rows(rng, B, 300)
        assert VS.choose(x, rows, (4, 16)).tolist() == S.choose(x, S.RowParams.build(rows)).tolist()
