"""Calibration of the disagreement evidence: honest miners' rate of tokens that are not the reference sampler's
choice, the rate the validator's constants tolerate, and how soon a miner that disagrees more is flagged.

A disagreement is a token whose margin is above 0 (scoring.counted("disagreements", ...)); the statistic is the
third evidence CUSUM of scoring.update_evidence, D <- max(0, D + [margin > 0] - drift), flagged at the limit. Its
walk only rises at a disagreement, so it is run here gap by gap (a run of k agreements drains k drift at once),
which makes millions of simulated or replayed tokens cheap; `walk` equals the validator's per-token CUSUM.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from neuron import scoring
from neuron.harness.calibration import Check, evidence_limit, poisson_upper

MULTIPLES = (2, 5, 10)  # the question: tokens to flag a miner disagreeing at these times the honest rate
STREAMS = 1000  # simulated streams behind each figure of MULTIPLES
CHEAT_STREAMS = 200  # streams of a cheat's stored generations, drawn with replacement (calibration.ORDERS)
CHEAT_HORIZON = 100_000  # tokens a cheat's stream runs for at most (a tenth of a day's)
HONEST_DAYS = 20  # honest streams of a day's tokens each, resampled from the stored generations
Block = tuple[int, list[int]]  # tokens in a block, and the (ascending) positions of its disagreements


def blocks_of(checks: list[Check]) -> list[Block]:
    """Each generation check's tokens as a block: its length and where its margins are above 0."""
    return [(len(c.margins), [i for i, m in enumerate(c.margins) if m > 0]) for c in checks if c.margins]


def walk(draw: Callable[[], Block], drift: float, limit: float, most: int) -> tuple[int | None, float]:
    """Run the disagreement CUSUM over blocks from draw() until it reaches `limit` or `most` tokens have
    passed: (tokens when it reached the limit, or None; the largest value it took)."""
    s = top = 0.0
    t = 0
    while t < most:
        n, hits = draw()
        last = 0
        for i in hits:
            s = max(0.0, s - (i - last) * drift) + 1.0 - drift
            last, top = i + 1, max(top, s)
            if s >= limit:
                return t + i + 1, top
        s = max(0.0, s - (n - last) * drift)
        t += n
    return None, top


def bernoulli(rate: float, rng: random.Random) -> Callable[[], Block]:
    """Blocks of a stream that disagrees independently at `rate`: a geometric gap, then one disagreement."""
    log_q = math.log1p(-rate)

    def draw() -> Block:
        gap = int(math.log(1.0 - rng.random()) / log_q)
        return gap + 1, [gap]
    return draw


def resampled(blocks: list[Block], rng: random.Random) -> Callable[[], Block]:
    """Blocks drawn with replacement from stored generations (a bootstrap: a stream as long as needed)."""
    return lambda: rng.choice(blocks)


def flag_figures(draws: list[Callable[[], Block]], th: scoring.Thresholds, most: int) -> dict:
    """Over independent streams: the share flagged within `most` tokens, and the median, 99th percentile and
    largest tokens to flag (None where not every stream was flagged), and the largest CUSUM of any stream."""
    results = [walk(d, th.disagreement_drift, th.disagreement_limit, most) for d in draws]
    found = sorted(n for n, _ in results if n is not None)
    every = len(found) == len(results)
    return {"streams": len(results), "flagged": len(found) / len(results),
            "median": found[len(found) // 2] if len(found) * 2 > len(results) else None,
            "p99": found[math.ceil(0.99 * len(results)) - 1] if len(found) >= math.ceil(0.99 * len(results)) else None,
            "worst": found[-1] if every else None, "max_cusum": max(top for _, top in results)}


def tolerated_rate(drift: float, limit: float, tokens_per_day: float, false_alarm: float) -> float:
    """The largest honest disagreement rate p under which the CUSUM (drift, limit) keeps false alarms within
    `false_alarm` a day at `tokens_per_day` tokens (evidence_limit with one band: 1 with probability p)."""
    lo, hi = 0.0, drift
    for _ in range(60):
        mid = (lo + hi) / 2
        try:
            ok = evidence_limit([(mid, 1.0)], drift, tokens_per_day, false_alarm) <= limit
        except ValueError:  # a rate at the drift: no limit holds it
            ok = False
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo


def _chi2(counts: list, rate: float) -> float:
    """Sum over (disagreements, tokens) pairs of (observed - expected)^2 / expected under one common rate."""
    return sum((x - rate * y) ** 2 / (rate * y) for x, y in counts) if rate > 0 else 0.0


def honest_rates(checks: list[Check]) -> dict:
    """Per model and honest precision: tokens, disagreements, the rate and its 99.9% bound, the index of
    dispersion of the per-generation counts (1 for independent tokens), and the same per batch size and kind
    with a chi-square of the cells against one common rate (degrees of freedom: cells - 1)."""
    groups: dict = {}
    for c in checks:
        if c.honest and c.kind != "forward" and c.margins:
            groups.setdefault(c.model, {}).setdefault(c.miner, []).append(c)
    out: dict = {}
    for model, miners in groups.items():
        for miner, cs in miners.items():
            counts = [(sum(m > 0 for m in c.margins), len(c.margins)) for c in cs]
            k, n = sum(x for x, _ in counts), sum(y for _, y in counts)
            rate = k / n
            cells: dict = {}
            for c, (x, y) in zip(cs, counts):
                cell = cells.setdefault(f"{c.kind} {c.batch}", [0, 0])
                cell[0], cell[1] = cell[0] + x, cell[1] + y
            out.setdefault(model, {})[miner] = {
                "tokens": n, "disagreements": k, "rate": rate, "bound": poisson_upper(k, n),
                "dispersion": _chi2(counts, rate) / max(len(counts) - 1, 1),
                "cells": {key: {"tokens": y, "disagreements": x} for key, (x, y) in sorted(cells.items())},
                "chi2": _chi2(list(cells.values()), rate), "df": len(cells) - 1}
    return out


def disagreement_summary(honest: list[Check], cheats: dict[str, list[Check]], th: scoring.Thresholds,
                         tokens_per_day: float, false_alarm: float, reference_model: str, seed: int = 0,
                         streams: int = STREAMS) -> dict:
    """The disagreement evidence on stored checks: honest rates (every model), the rate the constants tolerate
    at this statistic's share of the false-alarm budget, the tokens to flag simulated miners disagreeing at
    MULTIPLES of `reference_model`'s largest honest rate (`streams` each), honest generations replayed for a
    day of tokens per stream (none may be flagged), and each cheat's generations replayed until flagged."""
    share = false_alarm / len(scoring.evidence_params(th))
    rates = honest_rates(honest)
    measured = max((r["rate"] for r in rates.get(reference_model, {}).values()), default=0.0)
    rng = random.Random(seed)
    most = int(tokens_per_day)
    out: dict = {"drift": th.disagreement_drift, "limit": th.disagreement_limit, "false_alarm_per_day": share,
                 "tokens_per_day": tokens_per_day, "rates": rates, "reference_model": reference_model,
                 "measured": measured,
                 "tolerated": tolerated_rate(th.disagreement_drift, th.disagreement_limit, tokens_per_day, share),
                 "limit_at_bound": {f"{model} {miner}": evidence_limit([(r["bound"], 1.0)], th.disagreement_drift,
                                                                       tokens_per_day, share)
                                    for model, miners in rates.items() for miner, r in miners.items()
                                    if r["bound"] < th.disagreement_drift},
                 "multiples": {}, "honest": {}, "cheats": {}}
    for m in MULTIPLES if measured > 0 else ():  # no honest disagreement measured: no rate to multiply
        draws = [bernoulli(m * measured, rng) for _ in range(streams)]
        out["multiples"][m] = {"rate": m * measured, **flag_figures(draws, th, most)}
    by_miner: dict = {}
    for c in honest:
        if c.honest and c.kind != "forward" and c.margins:
            by_miner.setdefault(f"{c.model} {c.miner}", []).append(c)
    for key, cs in by_miner.items():
        blocks = blocks_of(cs)
        in_order = iter(blocks)
        stored = walk(lambda: next(in_order), th.disagreement_drift, th.disagreement_limit, sum(n for n, _ in blocks))
        days = flag_figures([resampled(blocks, rng) for _ in range(HONEST_DAYS)], th, most)
        out["honest"][key] = {"tokens": sum(n for n, _ in blocks), "stored_order_max": stored[1],
                              "stored_order_flagged": stored[0] is not None, "days": days}
    for kind, cs in cheats.items():
        blocks = blocks_of(cs)
        n = sum(b[0] for b in blocks)
        draws = [resampled(blocks, rng) for _ in range(CHEAT_STREAMS)]
        out["cheats"][kind] = {"tokens": n, "rate": sum(len(h) for _, h in blocks) / max(n, 1),
                               **flag_figures(draws, th, CHEAT_HORIZON)}
    return out

