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


# The ways the top-p rows can go: the CPU's bins (default), each row sorted whole (the GPU's path, no host
# read), bins that hold exactly the estimated top-p mass, too little of it (every row falls back to its
# whole row sorted), and every id of every row as a candidate.
NUCLEUS_PATHS = [{}, {"sort_nucleus": True}, {"slack": 0.0}, {"slack": -0.5}, {"slack": math.inf}]


@pytest.mark.parametrize("path", NUCLEUS_PATHS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "bins")
@pytest.mark.parametrize("seed", range(12))
def test_candidates_give_the_samplers_token_on_random_batches(seed, path):
    """The fast path against sampler.choose over many random batches: ties, -inf, top-k 0/1/V, top-p 1.0 and
    near 0, tiny and huge temperatures, and every way the top-p rows can go."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(6):
        V = rng.choice([2, 7, 64, 300, 5000])
        B = rng.choice([1, 3, 8])
        x = _random_logits(g, rng, B, V)
        rows = _random_rows(rng, B, V)
        want = S.choose(x, S.RowParams.build(rows))
        got = VS.choose(x.clone(), rows, **path)
        assert got.tolist() == want.tolist(), (V, rows)
        if V <= 300:
            assert got.tolist() == [reference_choice(x[i].tolist(), *rows[i])[0] for i in range(B)]


def _spec_masses(x: torch.Tensor, t: float, k: int) -> torch.Tensor:
    """The spec's mass before each id of each row in its order (top-k applied), as sampler.choose computes it."""
    scaled = x.double() / t
    if k:
        kth = scaled.sort(dim=1, descending=True, stable=True)
        scaled = torch.full_like(scaled, -math.inf).scatter(1, kth.indices[:, :k], kth.values[:, :k])
    vals = scaled.sort(dim=1, descending=True, stable=True).values
    probs = (vals - torch.logsumexp(scaled, dim=1, keepdim=True)).exp()
    return probs.cumsum(1) - probs


def _at_and_around(p: float) -> list[float]:
    """p and the floats either side of it, those in (0, 1)."""
    return [q for q in (p, math.nextafter(p, 0.0), math.nextafter(p, 1.0)) if 0.0 < q < 1.0]


def _seed_where_last_wins(row: torch.Tensor, t: float, ids: torch.Tensor) -> int | None:
    """A seed under which, at step 3, the last of `ids` has the best score among them: with the nucleus ending
    at it or just before it, the token then says which."""
    seeds = torch.arange(1, 5001)
    noise = S.gumbel(S.step_keys(seeds, torch.full_like(seeds, 3)), row.numel(), ids.expand(seeds.numel(), -1))
    wins = ((row.double()[ids] / t + noise).argmax(dim=1) == ids.numel() - 1).nonzero()
    return int(seeds[wins[0, 0]]) if wins.numel() else None


def _boundary_rows(x: torch.Tensor, t: float, k: int, where: dict[int, list[int]]) -> tuple[torch.Tensor, list]:
    """For each row i of x and position n in where[i]: rows with top_p at and around the spec's own mass before
    the n-th id in its order (at it, that id is out by a hair), under a seed that picks that id when it is in."""
    before = _spec_masses(x, t, k)
    order = (x.double() / t).sort(dim=1, descending=True, stable=True).indices
    batch, rows = [], []
    for i, positions in where.items():
        for n in positions:
            seed = _seed_where_last_wins(x[i], t, order[i, :n + 1])
            for p in _at_and_around(float(before[i, n])) if seed is not None else ():
                batch.append(x[i])
                rows.append((t, k, p, seed, 3))
    return torch.stack(batch), rows


def _same_tokens_every_path(x: torch.Tensor, rows: list) -> None:
    want = S.choose(x, S.RowParams.build(rows)).tolist()
    for path in NUCLEUS_PATHS:
        assert VS.choose(x, rows, **path).tolist() == want, path


def test_top_p_exactly_at_a_rows_cumulative_mass():
    """top_p at the spec's own mass before an id, and the floats either side: the boundary is decided with the
    spec's bits (its log-sum-exp over the whole row, top-k or not, and its cumulative sum), every path."""
    g = torch.Generator().manual_seed(11)
    V = 5000
    for scale, t, k in ((3.0, 0.7, 0), (8.0, 1.3, 0), (3.0, 1.0, 40), (3.0, 0.9, 700), (1.0, 0.2, 0)):
        x = torch.randn(12, V, generator=g) * scale
        _same_tokens_every_path(*_boundary_rows(x, t, k, {i: [1 + i % 3, 4 + 2 * i] for i in range(12)}))


def test_top_p_at_the_mass_of_whole_bins():
    """top_p at the exact mass of a row's ids in its likeliest bins: the bins then hold top_p and no more, which
    the exact check must not take for enough (the next id's mass before it may be below top_p)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(8, 20000, generator=g) * 3
    scaled = x.double()
    bins = (scaled - scaled.amax(dim=1, keepdim=True)).exp().view(torch.int64) >> VS.BIN_SHIFT
    order = scaled.sort(dim=1, descending=True, stable=True).indices
    where = {}
    for i in range(8):
        sorted_bins = bins[i, order[i]]
        # the first id of each of the next bins, whose mass before it is that of the bins above it
        where[i] = [int((sorted_bins >= j).sum()) for j in sorted_bins.unique().flip(0)[:10].tolist()]
    _same_tokens_every_path(*_boundary_rows(x, 1.0, 0, where))


@pytest.mark.parametrize("path", NUCLEUS_PATHS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "bins")
def test_degenerate_rows_in_one_mixed_batch(path):
    """All-equal logits (one bin holds the whole row), one dominant id, a single finite id, rows all -inf but
    two, exact ties, +inf, probabilities that underflow; each under top-p, top-k, top-k with top-p, the whole
    vocabulary and greedy, all in one batch and each row alone."""
    V = 3000
    g = torch.Generator().manual_seed(13)
    rows_by_name = {name: torch.full((V,), fill) for name, fill in
                    (("equal", 0.0), ("single", -math.inf), ("two", -math.inf), ("tiny", -1e4))}
    rows_by_name["dominant"] = torch.randn(V, generator=g)
    rows_by_name["dominant"][1234] = 40.0
    rows_by_name["single"][2999] = 0.0
    rows_by_name["two"][[17, 2500]] = 1.5
    rows_by_name["tiny"][[3, 4]] = 0.0
    rows_by_name["ties"] = (torch.randn(V, generator=g) * 2).round()
    rows_by_name["plus_inf"] = torch.randn(V, generator=g)
    rows_by_name["plus_inf"][99] = math.inf
    settings = [(1.0, 0, 0.9), (0.7, 0, 0.5), (1.0, 0, 1e-9), (1.0, 5, 0.9), (1.0, 0, 1.0), (0.0, 0, 0.9),
                (2.0, 0, 0.999999), (1.0, V, 0.3)]
    x = torch.stack([row for row in rows_by_name.values() for _ in settings])
    rows = [(t, k, p, 900 + n, n) for n, (t, k, p) in enumerate(settings * len(rows_by_name))]
    assert VS.choose(x, rows, **path).tolist() == S.choose(x, S.RowParams.build(rows)).tolist()
    for name, row in rows_by_name.items():
        for t, k, p in settings:
            one = [(t, k, p, 5, 6)]
            got = VS.choose(row[None], one, **path).tolist()
            assert got == S.choose(row[None], S.RowParams.build(one)).tolist(), (name, one)
            if name == "equal":  # ties across the sampler's 1,024-id cut: ordered as the spec says
                assert got == [reference_choice(row.tolist(), *one[0])[0]]


def test_smollm2_sized_rows_of_every_setting_match_the_sampler():
    """8 rows of SmolLM2's vocabulary, the bench's settings and a mixed batch, by the default path."""
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
        for path in NUCLEUS_PATHS:
            assert VS.choose(x, rows, **path).tolist() == S.choose(x, S.RowParams.build(rows)).tolist()
