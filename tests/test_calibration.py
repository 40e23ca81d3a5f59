"""The default Thresholds against measured noise: no honest miner rejected, every cheat caught.

Honest: over 1,000 checks (one verify_forward or verify_generation call over one sequence) by miners in
float32 and float16, Forward in left-padded batches of 1 to 16, seeded generation through the HF engine
with sequences joining, on the tiny model and on SmolLM2. Dishonest: the Forward model cheats and every
generation cheat on SmolLM2, whose real weights are what thresholds are set on. The full measurement is
scripts/calibrate.py (docs/calibration.md).
"""

from __future__ import annotations

import gzip
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMOLLM2

from neuron.harness import calibration as cal
from neuron import scoring
from neuron.validator.challenge import ChallengeConfig
from neuron.dataset import PromptSource
from neuron.harness.cheats import GENERATION, names
from neuron.model import load_model
from neuron.scoring import Thresholds

TH = Thresholds()
# float16 on this CPU is slow, so SmolLM2 gets short prompts; the tiny model gets the validator's.
TINY = ChallengeConfig()
SMALL = ChallengeConfig(seq_len=24, max_new_tokens=12)


@pytest.fixture(scope="module")
def honest_checks(tiny, smollm2):
    source = PromptSource.default()
    tiny16 = load_model("tiny", device="cpu", dtype="float16")
    checks = cal.honest_run(cal.Reference(tiny), {"float32": tiny, "float16": tiny16}, source, random.Random(1),
                            list(range(1, 17)), TINY, TH, model="tiny", rounds=2)
    smol16 = load_model(str(SMOLLM2), device="cpu", dtype="float16")
    checks += cal.honest_run(cal.Reference(smollm2), {"float32": smollm2, "float16": smol16}, source,
                             random.Random(2), [1, 16], SMALL, TH, model="smollm2")
    return checks


def test_no_honest_miner_is_rejected(honest_checks):
    assert len(honest_checks) >= 1000
    assert {(c.model, c.miner) for c in honest_checks} == {
        (m, d) for m in ("tiny", "smollm2") for d in ("float32", "float16")}
    assert {c.batch for c in honest_checks if c.model == "tiny"} == set(range(1, 17))
    assert {c.batch for c in honest_checks if c.model == "smollm2"} == {1, 16}
    assert {c.kind for c in honest_checks} == {"forward", "greedy", "sampled"}
    rejected = [(c.model, c.miner, c.kind, c.batch, c.reason) for c in honest_checks if not c.ok]
    assert rejected == []


def test_honest_margins_stay_within_the_thresholds(honest_checks):
    gen = [c for c in honest_checks if c.kind != "forward"]
    assert sum(len(c.margins) for c in gen) >= 8000
    assert max(c.metrics["token_margin"] for c in gen) <= TH.max_token_margin
    assert max(c.metrics["boundary_excess"] for c in gen) <= TH.boundary_tol
    # The honest evidence never comes near its limits.
    for name, (cap, drift, limit) in scoring.evidence_params(TH).items():
        s = 0.0
        for x in (x for c in gen for x in getattr(c, scoring.EVIDENCE_STREAMS[name])):
            s = scoring.cusum_step(s, scoring.counted(name, x, TH), cap, drift)
            assert s < limit / 4, name


@pytest.fixture(scope="module")
def cheat_checks(smollm2):
    ref = cal.Reference(smollm2)
    source = PromptSource.default()
    checks = cal.dishonest_run(ref, cal.FORWARD_CHEATS, source, random.Random(3), 2, SMALL, TH, model="smollm2", seed=3)
    return checks + cal.generation_cheat_run(ref, names(GENERATION) + ("int8" + cal.EXACT,), source,
                                             random.Random(4), 6, SMALL, TH, model="smollm2")


def test_every_forward_cheat_is_caught_on_smollm2(cheat_checks):
    for kind in cal.FORWARD_CHEATS:
        mine = [c for c in cheat_checks if c.miner == kind and c.kind == "forward"]
        assert mine and all(not c.ok for c in mine), (kind, [c.metrics for c in mine if c.ok])


@pytest.mark.parametrize("kind", names(GENERATION))
def test_every_generation_cheat_is_caught_on_smollm2(cheat_checks, kind):
    mine = [c for c in cheat_checks if c.miner == kind and c.kind != "forward"]
    changed = [c for c in mine if c.changed]
    assert len(mine) == 6 and changed, kind
    if kind == "int8":  # a small, steady deviation: it shows in its logprobs and in more disagreements
        assert sum(m > 0 for c in mine for m in c.margins) > 0
        assert cal.tokens_to_flag([m for c in mine for m in c.margins], [e for c in mine for e in c.errors], TH)
    else:
        assert sum(not c.ok for c in changed) >= len(changed) - 1, (kind, [c.metrics for c in changed if c.ok])


def test_an_exact_variant_reports_the_real_models_logprobs_for_the_same_tokens(cheat_checks):
    own = [c for c in cheat_checks if c.miner == "int8" and c.kind != "forward"]
    exact = [c for c in cheat_checks if c.miner == "int8_exact"]
    assert len(exact) == len(own) == 6
    assert [c.margins for c in exact] == [c.margins for c in own]  # the same tokens
    assert max(e for c in exact for e in c.errors) < 1e-4 < max(e for c in own for e in c.errors)


def test_the_evidence_limit_bounds_honest_false_alarms():
    # Lundberg: with Y = b_i with probability p_i, theta solves E exp(theta (Y - drift)) = 1, and the limit
    # is ln(N / false_alarm) / theta.
    levels, drift = [(0.004, 0.025), (0.0005, 0.05)], 0.001
    h = cal.evidence_limit(levels, drift, 1e6, 1e-6)
    theta = math.log(1e12) / h
    rest = 1 - sum(p for p, _ in levels)
    assert rest * math.exp(-theta * drift) + sum(p * math.exp(theta * (b - drift)) for p, b in levels) == \
        pytest.approx(1, abs=1e-9)
    # One band at the top is the cruder bound: a higher limit than two bands with the same total rate.
    assert cal.evidence_limit([(0.0045, 0.05)], drift, 1e6, 1e-6) > h
    # A walk of the worst honest kind, many times longer than the limit needs, stays below it.
    rng = random.Random(0)
    s, worst = 0.0, 0.0
    for _ in range(200_000):
        u = rng.random()
        s = max(0.0, s + (0.025 if u < 0.004 else 0.05 if u < 0.0045 else 0.0) - drift)
        worst = max(worst, s)
    assert worst < h
    with pytest.raises(ValueError):
        cal.evidence_limit([(0.04, 0.05)], drift, 1e6, 1e-6)


def test_honest_levels_dominate_the_values_at_every_edge():
    margins = [0.0] * 9_990 + [0.001] * 6 + [0.015] * 3 + [0.03]
    levels = cal.honest_levels(margins, (0.01, 0.02, 0.04))
    assert [top for _, top in levels] == [0.01, 0.02, 0.04]
    tails = [cal.poisson_upper(k, 10_000) for k in (10, 4, 1)]  # above 0, 0.01, 0.02
    assert [p for p, _ in levels] == pytest.approx([tails[0] - tails[1], tails[1] - tails[2], tails[2]])
    assert cal.poisson_upper(0, 10_000) == pytest.approx(math.log(1000) / 10_000, rel=1e-3)
    # Values that are nearly all above 0 (logprob errors): the lowest band takes the rest, never below 0.
    errors = [0.003] * 990 + [0.02] * 10
    levels = cal.honest_levels(errors, (0.005, 0.05))
    assert levels[0][0] >= 0 and sum(p for p, _ in levels) == pytest.approx(1.0)
    assert levels[1][0] == pytest.approx(cal.poisson_upper(10, 1000))


def test_tokens_to_flag_counts_either_statistic():
    th = scoring.Thresholds()
    assert cal.tokens_to_flag([0.0] * 100, [0.0] * 100, th) is None
    n = cal.tokens_to_flag([0.0] * 100, [0.05] * 100, th)  # 0.03 a token past the drift 0.02
    assert n == math.ceil(th.lp_evidence_limit / 0.03 - 1e-9)
    assert cal.tokens_to_flag([0.0] * 100, [0.05] * 100, th, ("token margins",)) is None
    # Disagreements alone: each adds 1 - 0.011; the 27th crosses 26 (26 x 0.989 = 25.7).
    assert cal.tokens_to_flag([0.001] * 100, [0.0] * 100, th, ("disagreements",)) == 27
    assert cal.tokens_to_flag([0.41] * 3, [], th) == 2  # an older file without errors: margins alone


def test_the_script_rescoring_its_own_gzipped_file_gives_the_same_figures(tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "calibrate.py"
    measured, again = tmp_path / "run.json.gz", tmp_path / "again.json"
    run = [sys.executable, str(script), "--model", "tiny", "--batch-sizes", "1,3", "--dishonest", "2",
           "--generation-cheats", "3", "--cheats", "greedy,int8,int8_exact", "--seed", "5", "--threads", "1"]
    subprocess.run(run + ["--json", str(measured)], capture_output=True, check=True)
    subprocess.run([sys.executable, str(script), "--rescore", str(measured), "--json", str(again)],
                   capture_output=True, check=True)
    first, second = json.loads(gzip.decompress(measured.read_bytes())), json.loads(again.read_text())
    assert {c["miner"] for c in first["checks"]} >= {"float32", "float16", "greedy", "int8", "int8_exact"}

    def figures(summary):  # the reasons' wording is the checks' own when measured, the metric's when rescored
        for s in summary["models"].values():
            for cheat in s["dishonest"].values():
                cheat.pop("reasons")
        return summary["models"], summary["evidence"]

    assert figures(first) == figures(second)
    used = {name: st["limit_used"] for name, st in second["evidence"]["statistics"].items()}
    assert used == {"token margins": TH.evidence_limit, "logprob errors": TH.lp_evidence_limit,
                    "disagreements": TH.disagreement_limit}
    assert second["disagreements"]["limit"] == TH.disagreement_limit  # the disagreement tables ran on the rescore


def test_a_nudge_stays_within_its_margin_and_inside_the_first_band_is_never_flagged(tiny):
    # The cheapest cheat against the margin checks (docs/calibration.md): the least likely token within delta
    # of the sampler's choice. Inside the first honest band it is what honest float16 noise looks like.
    checks = cal.generation_cheat_run(cal.Reference(tiny), ("nudge0.025", "nudge0.1"), PromptSource.default(),
                                      random.Random(6), 32, TINY, TH, model="tiny")
    for kind, delta in (("nudge0.025", 0.025), ("nudge0.1", 0.1)):
        mine = [c for c in checks if c.miner == kind]
        margins = [m for c in mine for m in c.margins]
        assert all(c.ok for c in mine) and 0 < max(margins) <= delta + 1e-6, kind
    small = [m for c in checks if c.miner == "nudge0.025" for m in c.margins]
    assert cal.tokens_to_flag(small, [0.0] * len(small), TH) is None


def test_the_boundary_excess_is_the_least_tolerance_that_keeps_every_token_inside():
    # Probabilities at T 0.7 with 0, 0.5, 0.8, 0.905, 0.965 before each id; top_p 0.9 keeps ids 0-2.
    logits = 0.7 * torch.tensor([[0.5, 0.3, 0.105, 0.06, 0.035]], dtype=torch.float64).log()
    spec = scoring.GenSpec(max_new_tokens=1, temperature=0.7, top_p=0.9, seed=1)
    odds = lambda m: m / (1 - m)  # noqa: E731
    assert cal.boundary_excess(logits, [2], spec) == 0.0
    # Id 3: the odds of the mass before it, 9.53 against 9, need a tolerance of T / 2 ln(9.53 / 9).
    excess = cal.boundary_excess(logits, [3], spec)
    assert excess == pytest.approx(0.35 * math.log(odds(0.905) / odds(0.9)), rel=1e-9)
    for tol, outside in ((excess * (1 - 1e-6), True), (excess * (1 + 1e-6), False)):
        assert bool(scoring.token_margins(logits, torch.tensor([3]), spec, tol)[1][0]) is outside
    # Id 4 (odds 27.6): before its odds come within reach, the noise may put it ahead of id 3, 0.54 above it
    # (scaled): a tolerance of 0.7 * 0.54 / 2.
    assert cal.boundary_excess(logits, [4], spec) == pytest.approx(0.35 * math.log(0.06 / 0.035), rel=1e-6)


def test_a_cheat_that_ignores_a_parameter_is_counted_where_the_request_uses_it():
    def check(top_k, top_p, ok, changed=True, excess=0.0):
        return cal.Check("m", "ignore_top_p", False, "sampled", 1, ok, "" if ok else "token outside",
                         {"token_margin": 0.0 if ok else 0.41, "boundary_excess": excess}, [0.0], [0.0], changed,
                         top_k, top_p)

    checks = [check(50, 1.0, True, changed=False), check(50, 0.9, False), check(50, 0.9, True, excess=0.01),
              check(50, 0.9, True, changed=False)]
    s = cal.summarize(checks, TH)["models"]["m"]["dishonest"]["ignore_top_p"]
    # Over the three top-p requests; of the two that changed, one within the boundary tolerance passed.
    assert (s["generations"], s["changed"], s["generation_caught_when_changed"]) == (3, 2, 0.5)
