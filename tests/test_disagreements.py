"""The disagreement evidence's calibration (neuron/harness/disagreements.py): its fast walk is the validator's
CUSUM, its figures are what the constants give, and the stored nudge cheats are flagged with no honest alarm."""

from __future__ import annotations

import random

import pytest

from neuron import scoring
from neuron.harness.calibration import Check, evidence_limit
from neuron.harness import disagreements as dis

TH = scoring.Thresholds()


def test_the_walk_is_the_validators_cusum():
    rng = random.Random(1)
    for rate in (0.003, 0.02, 0.3):
        margins = [0.01 if rng.random() < rate else 0.0 for _ in range(5000)]
        th = scoring.Thresholds(disagreement_drift=0.011, disagreement_limit=4.0)
        blocks = iter([(100, [i for i in range(100) if margins[k + i] > 0]) for k in range(0, 5000, 100)])
        n, top = dis.walk(lambda: next(blocks), th.disagreement_drift, th.disagreement_limit, 5000)
        s, first, worst = 0.0, None, 0.0
        for i, m in enumerate(margins):
            s = scoring.cusum_step(s, scoring.counted("disagreements", m, th), 1.0, th.disagreement_drift)
            worst = max(worst, s)
            if s >= th.disagreement_limit and first is None:
                first = i + 1
                break
        assert n == first and top == pytest.approx(worst), rate


def test_the_tolerated_rate_is_where_the_limit_holds_the_budget():
    p = dis.tolerated_rate(TH.disagreement_drift, TH.disagreement_limit, 1e6, 1e-6 / 3)
    assert evidence_limit([(p, 1.0)], TH.disagreement_drift, 1e6, 1e-6 / 3) == pytest.approx(TH.disagreement_limit,
                                                                                            rel=1e-6)
    # The constants hold honest float16's measured rates (SmolLM2 0.0026, tiny 0.0033) with room: p0 = 0.006.
    assert 0.006 <= p < TH.disagreement_drift


def test_honest_streams_never_flag_and_a_five_times_stream_does():
    rng = random.Random(0)
    honest = dis.flag_figures([dis.bernoulli(0.0033, rng) for _ in range(200)], TH, 1_000_000)
    assert honest["flagged"] == 0 and honest["max_cusum"] < TH.disagreement_limit / 2
    five = dis.flag_figures([dis.bernoulli(5 * 0.00256, rng) for _ in range(200)], TH, 1_000_000)
    assert five["flagged"] == 1 and five["p99"] <= 34_447  # docs/calibration.md's 99th percentile


def _checks(miner: str, honest: bool, rate: float, n: int, rng: random.Random) -> list[Check]:
    return [Check("smollm2", miner, honest, "sampled", 16, True, "",
                  margins=[0.02 if rng.random() < rate else 0.0 for _ in range(16)], errors=[0.0] * 16)
            for _ in range(n)]


def test_the_summary_replays_honest_and_cheating_generations():
    rng = random.Random(3)
    honest = _checks("float16", True, 0.0026, 2000, rng) + _checks("float32", True, 0.0, 500, rng)
    cheats = {"nudge0.05": _checks("nudge0.05", False, 0.019, 160, rng)}
    s = dis.disagreement_summary(honest, cheats, TH, 1e6, 1e-6, "smollm2", streams=100)
    r = s["rates"]["smollm2"]["float16"]
    assert r["tokens"] == 32_000 and r["rate"] == r["disagreements"] / 32_000 and r["bound"] > r["rate"]
    assert s["rates"]["smollm2"]["float32"]["disagreements"] == 0
    assert all(h["days"]["flagged"] == 0 and not h["stored_order_flagged"] for h in s["honest"].values())
    assert s["multiples"][2]["flagged"] == 0 and s["multiples"][10]["flagged"] == 1
    assert s["cheats"]["nudge0.05"]["flagged"] == 1 and s["cheats"]["nudge0.05"]["worst"] < dis.CHEAT_HORIZON
