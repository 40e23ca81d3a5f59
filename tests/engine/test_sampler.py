"""The seeded sampler against its spec: a plain-Python reference, the JSON test vectors, fabricated logits."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from neuron.engine import sampler as S

VECTORS = json.loads((Path(__file__).resolve().parents[2] / "docs" / "sampling_vectors.json").read_text())


def reference_choice(logits: list[float], t: float, k: int, p: float, seed: int, step: int) -> tuple[int, list[int]]:
    """docs/sampling.md, written as plainly as possible: one row, Python floats, no torch."""
    x = [float(torch.tensor(v, dtype=torch.float32)) for v in logits]  # the row as the engine holds it
    if t == 0:
        best = max(x)
        return x.index(best), list(range(len(x)))
    scaled = [v / t for v in x]
    order = sorted(range(len(x)), key=lambda i: (-scaled[i], i))
    if k > 0:
        order = order[:k]
    if p < 1:
        top = max(scaled[i] for i in order)
        w = [math.exp(scaled[i] - top) for i in order]
        total, before, kept = sum(w), 0.0, []
        for i, wi in zip(order, w):
            if before < p:
                kept.append(i)
            before += wi / total
        order = kept
    allowed = sorted(order)
    score = {i: scaled[i] - math.log(-math.log((S.bits_int(seed, step, i) + 0.5) / 2 ** 32)) for i in allowed}
    best = max(score.values())
    return min(i for i in allowed if score[i] == best), allowed


def test_hash_vectors():
    seeds = torch.tensor([int(v["seed"]) for v in VECTORS["hash"]])
    steps = torch.tensor([v["step"] for v in VECTORS["hash"]])
    ids = torch.tensor([[v["id"]] for v in VECTORS["hash"]])
    got = S.mix32(S.step_keys(seeds, steps).unsqueeze(1) ^ S._id_hashes(50272, "cpu")[ids]).squeeze(1)
    assert got.tolist() == [v["bits"] for v in VECTORS["hash"]]
    assert [S.bits_int(int(v["seed"]), v["step"], v["id"]) for v in VECTORS["hash"]] == got.tolist()
    assert all(0 < v["u"] < 1 and v["u"] == (v["bits"] + 0.5) / 2 ** 32 for v in VECTORS["hash"])


@pytest.mark.parametrize("v", VECTORS["tokens"], ids=lambda v: f"T{v['temperature']}-k{v['top_k']}-p{v['top_p']}")
def test_token_vectors(v):
    seed = int(v["seed"])
    rp = S.RowParams.build([(v["temperature"], v["top_k"], v["top_p"], seed, v["step"])])
    row = torch.tensor([v["logits"]], dtype=torch.float32)
    assert int(S.choose(row, rp)[0]) == v["token"]
    _, allowed = S.perturbed_scores(row, rp)
    assert allowed[0].nonzero().flatten().tolist() == v["allowed"]
    assert reference_choice(v["logits"], v["temperature"], v["top_k"], v["top_p"], seed, v["step"]) == \
        (v["token"], v["allowed"])


def test_batched_rows_equal_each_row_alone_and_the_plain_reference():
    rng = random.Random(3)
    V = 300
    logits = torch.randn(24, V, generator=torch.Generator().manual_seed(1)) * 3
    logits[5, :10] = 4.0  # exact ties
    rows = [(rng.choice([0.0, 0.5, 1.0, 1.7]), rng.choice([0, 1, 5, 40]), rng.choice([1.0, 0.9, 0.3]),
             rng.getrandbits(63), rng.randrange(100)) for _ in range(24)]
    batched = S.choose(logits, S.RowParams.build(rows))
    for i, r in enumerate(rows):
        alone = S.choose(logits[i:i + 1], S.RowParams.build([r]))
        assert int(batched[i]) == int(alone[0])
        assert int(batched[i]) == reference_choice(logits[i].tolist(), *r)[0]


def test_sampling_follows_the_softmax_at_the_temperature():
    V, N = 6, 20000
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0, 2.0, 0.3]])
    rows = [(0.8, 0, 1.0, seed, 0) for seed in range(N)]
    freq = torch.bincount(S.choose(logits.expand(N, V), S.RowParams.build(rows)), minlength=V).double() / N
    want = torch.softmax(logits[0].double() / 0.8, 0)
    assert (freq - want).abs().max() < 0.015  # binomial std at N=20000 is <= 0.0036


def test_greedy_ignores_noise_and_filters():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0]])
    rp = S.RowParams.build([(0.0, 1, 0.1, 99, 3)])
    assert int(S.choose(logits, rp)[0]) == 1
    scores, allowed = S.perturbed_scores(logits, rp)
    assert torch.equal(scores, logits.double()) and bool(allowed.all())


def test_top_k_keeps_exactly_k_even_through_ties():
    logits = torch.zeros(1, 50)
    for k in (1, 7, 49):
        _, allowed = S.perturbed_scores(logits, S.RowParams.build([(1.0, k, 1.0, 0, 0)]))
        assert allowed[0].nonzero().flatten().tolist() == list(range(k))


def test_noise_differs_by_seed_step_and_id_and_is_stable():
    a = S.gumbel(S.step_keys(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0])), 1000)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    b = S.gumbel(S.step_keys(torch.tensor([1]), torch.tensor([0])), 1000)
    assert torch.equal(a[0], b[0])
    assert bool(torch.isfinite(a).all())


def test_large_vocabularies_take_the_short_nucleus_path_and_still_match_the_reference():
    """Above 1,024 ids a peaked row's nucleus is found among its likeliest ids; a flat row falls back to the
    whole vocabulary. Both give the plain reference's choice and allowed set."""
    V = 5000
    gen = torch.Generator().manual_seed(7)
    peaked = torch.randn(6, V, generator=gen) * 4
    flat = torch.randn(6, V, generator=gen) * 0.01
    rows = [(1.0, 0, 0.9, 11, 3), (0.7, 0, 0.5, 12, 0), (1.3, 40, 0.95, 13, 9), (0.8, 0, 0.99, 14, 2),
            (1.0, 2000, 0.9, 15, 1), (0.5, 0, 0.3, 16, 5)]
    for logits in (peaked, flat):
        got = S.choose(logits, S.RowParams.build(rows))
        _, allowed = S.perturbed_scores(logits, S.RowParams.build(rows))
        for i, r in enumerate(rows):
            token, want_allowed = reference_choice(logits[i].tolist(), *r)
            assert int(got[i]) == token
            assert allowed[i].nonzero().flatten().tolist() == want_allowed
