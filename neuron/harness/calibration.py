"""Measure the verification metrics for honest and dishonest miners, so Thresholds come from data.

The reference is the validator's computation, the model in float32: Forward one unpadded sequence at a
time, generations teacher-forced in one padded batch (neuron/validator/reference.py). Honest miners compute the
same thing another way (float16 weights, left-padded Forward batches, seeded generation through the HF
engine with sequences joining). Cheats serve another model or rewrite the logits (Forward), or choose
their generated tokens another way than the seeded sampler (neuron/harness/cheats/). Every check is one
`verify_forward` or `verify_generation` call on one sequence, as the validator makes it; its metrics (and
a generation's per-token margins, for the evidence limit) are kept whatever the verdict.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass, field

import torch

from neuron import scoring
from neuron.validator.challenge import Challenge, ChallengeConfig, make_challenge
from neuron.dataset import PromptSource
from neuron.harness.cheats import MODEL, cheat_model, generation_cheat, lookup, names
from neuron.harness.decode import Generated, decode, engine_decode, reported_by
from neuron.model import ForwardJob, LoadedModel, forward_batch, forward_logprobs
from neuron.validator.reference import Reference as BatchedReference

FORWARD_METRICS = ("topk_overlap", "prob_distance", "ref_argmax_rank", "logprob_error", "median_logprob_error",
                   "rest_mass_error")
# Seeded generation: the largest token margin, how far outside the reference's top-k/top-p boundary a
# token lay (logit units; 0 when inside), and the reported logprob error.
GENERATION_METRICS = ("token_margin", "boundary_excess", "gen_logprob_error")
METRICS = FORWARD_METRICS + GENERATION_METRICS
# For these a smaller value is the more suspicious one; for the rest a larger value is.
LOWER_IS_WORSE = frozenset({"topk_overlap"})
# The threshold each metric is checked against (Thresholds field names).
THRESHOLD_OF = {
    "topk_overlap": "min_topk_overlap",
    "prob_distance": "max_prob_distance",
    "ref_argmax_rank": "max_ref_argmax_rank",
    "logprob_error": "max_logprob_error",
    "median_logprob_error": "max_median_logprob_error",
    "rest_mass_error": "max_rest_mass_error",
    "token_margin": "max_token_margin",
    "boundary_excess": "boundary_tol",
    "gen_logprob_error": "max_gen_logprob_error",
}
# The precisions an honest miner may serve in; bfloat16 is measured but not among them (see docs/calibration.md).
ACCEPTED_DTYPES = ("float32", "float16")
# The model cheats whose Forward is measured: every one of the registry's, and logit noise at three more levels.
# Files stored before the registry (docs/calibration/*.json.gz) label quantized_int8's Forward checks "int8",
# beside the generation cheat int8's: a rescore keeps their labels, so their tables show one int8 row for both.
FORWARD_CHEATS = (*names(MODEL), "noise0.1", "noise0.3", "noise1.0")


def _sampled(c: "Check") -> bool:
    return c.kind == "sampled"


# Generation cheats that differ from the honest sampler only on some requests (the rest they answer honestly),
# so their catch rate is over the challenges they apply to: sampled ones, or those that use the parameter
# they ignore (a check from before checks kept their parameters counts as using it).
APPLIES_TO = {
    **{kind: _sampled for kind in ("greedy", "cold", "hot", "least_likely")},
    "ignore_top_p": lambda c: _sampled(c) and (c.top_p is None or c.top_p < 1.0),
    "ignore_top_k": lambda c: _sampled(c) and (c.top_k is None or c.top_k > 0),
}


@dataclass(frozen=True)
class Check:
    """One verification check: one verify_forward or verify_generation call over one sequence."""

    model: str  # which model the reference runs: "tiny", "smollm2", ...
    miner: str  # how the miner computed: a dtype name (honest) or a dishonest kind
    honest: bool
    kind: str  # "forward", "greedy" or "sampled"
    batch: int  # sequences in the miner's batch
    ok: bool  # the verdict under the thresholds the check ran with
    reason: str  # "" when ok
    metrics: dict[str, float] = field(default_factory=dict)
    margins: list[float] = field(default_factory=list)  # generation: every token's margin, in order
    errors: list[float] = field(default_factory=list)  # generation: every token's reported logprob error
    changed: bool = True  # generation cheat: its tokens differ from the honest sampler's
    top_k: int | None = None  # generation: the request's top_k and top_p (None: a check stored before they were)
    top_p: float | None = None

    @property
    def accepted(self) -> bool:
        """Honest, in a precision that the thresholds must let through."""
        return self.honest and self.miner in ACCEPTED_DTYPES


def challenges(lm: LoadedModel, source: PromptSource, rng: random.Random, n: int, cfg: ChallengeConfig,
               vary_length: bool = True) -> list[Challenge]:
    """n challenges built as the validator builds them; with vary_length, Forward prompts of random
    length between about seq_len / 2 and seq_len, so a batch of them is left-padded."""
    out = []
    for _ in range(n):
        seq_len = rng.randint(max(cfg.seq_len // 2, cfg.positions + 8), cfg.seq_len) if vary_length else cfg.seq_len
        out.append(make_challenge(lm, source, rng, dataclasses.replace(cfg, seq_len=seq_len)))
    return out


class Reference:
    """The validator's computation: log-softmax of one unpadded sequence at a time, in the model's
    precision (float32 on a CPU). Memoised, because honest miners often send the same tokens."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self._memo: dict[tuple, torch.Tensor] = {}
        self.batched = BatchedReference(lm)  # generation: judged as the validator judges, batched

    def rows(self, ids: list[int], rows: list[int]) -> torch.Tensor:
        """[len(rows), V] float32: the distributions predicting ids[r + 1] for r in rows."""
        key = (tuple(ids), tuple(rows))
        if key not in self._memo:
            full, _ = forward_logprobs(self.lm, torch.tensor([ids]))
            self._memo[key] = full[0, rows].float().cpu()
        return self._memo[key]

    def forget(self) -> None:
        self._memo.clear()


def forward_checks(ref: Reference, miner: LoadedModel, chs: list[Challenge], th: scoring.Thresholds, *,
                   model: str, label: str, honest: bool) -> list[Check]:
    """One check per challenge: the miner runs all of them as one left-padded batch."""
    jobs = [ForwardJob(torch.tensor([c.forward_ids]), c.positions, c.topk) for c in chs]
    checks = []
    for c, out in zip(chs, forward_batch(miner, jobs)):
        ref_rows = ref.rows(c.forward_ids, c.positions)
        v = scoring.verify_forward(ref_rows, out.topk_ids[0], out.topk_logprobs[0], out.rest_mass[0], th,
                                   torch.tensor(c.positions))  # as the validator judges them
        checks.append(Check(model, label, honest, "forward", len(chs), v.ok, v.reason, dict(v.metrics)))
    return checks


def specs_of(chs: list[Challenge]) -> list[scoring.GenSpec]:
    return [c.spec for c in chs]


def _nucleus_excess(scaled: torch.Tensor, strict: torch.Tensor, ids: torch.Tensor, top_p: float) -> torch.Tensor:
    """[n] the least tolerance per scaled logit under which each row's id, outside the strict nucleus, is
    possibly in it (`scoring.nucleus_bounds`), by bisection: the bounds widen monotonically with the tolerance."""
    def inside(tol: torch.Tensor) -> torch.Tensor:
        return scoring.nucleus_bounds(scaled, strict, top_p, tol[:, None])[1].gather(1, ids[:, None])[:, 0]

    lo, hi = torch.zeros(len(ids), dtype=torch.float64), torch.ones(len(ids), dtype=torch.float64)
    while not bool(inside(hi).all()):
        hi = torch.where(inside(hi), hi, 2 * hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        ok = inside(mid)
        lo, hi = torch.where(ok, lo, mid), torch.where(ok, mid, hi)
    return hi


def boundary_excess(ref_logits: torch.Tensor, tokens: list[int], spec: scoring.GenSpec) -> float:
    """How far (logit units) the furthest token lies outside the reference's strict top-k / top-p set: the
    least boundary tolerance of `scoring.token_margins` under which no token is outside (0: all inside)."""
    if spec.temperature <= 0:
        return 0.0
    T, V = ref_logits.shape
    x = ref_logits.double()
    ids = torch.tensor(tokens)
    own = x.gather(1, ids[:, None])[:, 0]
    excess = torch.zeros(T, dtype=torch.float64)
    strict = torch.ones_like(x, dtype=torch.bool)
    if 0 < spec.top_k < V:
        kth = x.topk(spec.top_k, dim=1).values[:, -1]
        excess = (kth - own).clamp(min=0)
        strict = x >= kth[:, None]
    if spec.top_p < 1.0:
        scaled = x / spec.temperature
        out = ~scoring.nucleus_bounds(scaled, strict, spec.top_p, 0.0)[1].gather(1, ids[:, None])[:, 0]
        if bool(out.any()):
            rows = out.nonzero()[:, 0]
            tol = _nucleus_excess(scaled[rows], strict[rows], ids[rows], spec.top_p)
            excess[rows] = torch.maximum(excess[rows], spec.temperature * tol)
    return float(excess.max())


def generation_checks(ref: Reference, chs: list[Challenge], answers: list[Generated], th: scoring.Thresholds, *,
                      model: str, label: str, honest: bool, batch: int,
                      honest_answers: list[Generated] | None = None) -> list[Check]:
    """One check per generation, judged as the validator judges it: the batched reference teacher-forced
    over every miner's tokens at once, then verify_generation."""
    eos = ref.lm.eos_token_id
    logits = ref.batched.generation_logits([c.prompt_ids for c in chs], [a.tokens for a in answers])
    checks = []
    for i, (c, a, rows) in enumerate(zip(chs, answers, logits)):
        v = scoring.verify_generation(rows, torch.tensor(a.tokens), torch.tensor(a.logprobs, dtype=torch.float64),
                                      spec=c.spec, finish_reason=a.finish_reason, eos_token_id=eos, th=th)
        metrics = {k: x for k, x in v.metrics.items() if k not in ("margins", "errors")}
        if metrics:
            metrics["boundary_excess"] = boundary_excess(rows, a.tokens, c.spec)
        changed = honest_answers is None or honest_answers[i].tokens != a.tokens
        kind = "greedy" if c.temperature == 0 else "sampled"
        checks.append(Check(model, label, honest, kind, batch, v.ok, v.reason, metrics,
                            list(v.metrics.get("margins", [])), list(v.metrics.get("errors", [])), changed,
                            c.top_k, c.top_p))
    return checks


# Running and summarising.


def honest_run(ref: Reference, miners: dict[str, LoadedModel], source: PromptSource, rng: random.Random,
               batch_sizes: list[int], cfg: ChallengeConfig, th: scoring.Thresholds, *, model: str,
               generate: bool = True, rounds: int = 1, forward: bool = True) -> list[Check]:
    """For each round and batch size, one batch of fresh challenges sent to each honest miner."""
    checks = []
    for _ in range(rounds):
        for b in batch_sizes:
            chs = challenges(ref.lm, source, rng, b, cfg)
            ref.forget()
            for label, miner in miners.items():
                if forward:
                    checks += forward_checks(ref, miner, chs, th, model=model, label=label, honest=True)
                if generate:
                    answers = engine_decode(miner, [c.prompt_ids for c in chs], specs_of(chs))
                    checks += generation_checks(ref, chs, answers, th, model=model, label=label, honest=True, batch=b)
    return checks


def dishonest_run(ref: Reference, kinds: tuple[str, ...], source: PromptSource, rng: random.Random, n: int,
                  cfg: ChallengeConfig, th: scoring.Thresholds, *, model: str, seed: int = 0) -> list[Check]:
    """n Forward challenges to each model cheat of the registry named in `kinds` (built in turn from the float32
    reference), one at a time (batch 1, float32: the cheat's best case)."""
    chs = challenges(ref.lm, source, rng, n, cfg)
    ref.forget()
    checks = []
    for label in kinds:
        cheat = cheat_model(label, ref.lm, seed)
        for c in chs:
            checks += forward_checks(ref, cheat, [c], th, model=model, label=label, honest=False)
    return checks


# A calibration-only variant of a generation cheat ("int8_exact"): the same tokens, reported with exact
# logprobs from one teacher-forced pass of the real model, so only its tokens can give it away. It costs
# the cheat a full-precision copy of the model and a prefill pass per answer on top of its cheap decode.
EXACT = "_exact"


def generation_cheat_run(ref: Reference, kinds: tuple[str, ...], source: PromptSource, rng: random.Random, n: int,
                         cfg: ChallengeConfig, th: scoring.Thresholds, *, model: str, batch: int = 48) -> list[Check]:
    """n seeded sampled challenges (half with top-p) to each generation cheat (neuron.harness.cheats), in
    batches, reporting logprobs as the cheat does (exact ones for teacher-forced cheats and "<kind>_exact"
    variants: only the tokens can show those). Sampled only: on a greedy request most of these cheats are
    the honest answer."""
    chs = challenges(ref.lm, source, rng, n, dataclasses.replace(cfg, sampled_fraction=1.0))
    groups = [chs[i:i + batch] for i in range(0, n, batch)]
    honest = [a for g in groups for a in decode(ref.lm, [c.prompt_ids for c in g], specs_of(g))]
    checks = []
    for kind in kinds:
        base = kind.removesuffix(EXACT)
        policy, chooser = generation_cheat(base, ref.lm)
        exact = lookup(base)[0].teacher_forced or kind != base
        answers = []
        for g in groups:
            prompts = [c.prompt_ids for c in g]
            mine = decode(chooser, prompts, specs_of(g), policy)
            answers += reported_by(ref.batched, prompts, mine) if exact else mine
        checks += generation_checks(ref, chs, answers, th, model=model, label=kind, honest=False, batch=batch,
                                    honest_answers=honest)
    return checks


# Evidence across rounds: one-sided CUSUMs over token margins and logprob errors (scoring.update_evidence).


def poisson_upper(count: int, n: int, alpha: float = 1e-3) -> float:
    """An upper confidence bound (1 - alpha) on a per-token rate seen `count` times in n tokens."""
    lo, hi = count / n, (count + 10 + 10 * math.sqrt(count + 1)) / n
    for _ in range(100):
        lam = (lo + hi) / 2 * n
        cdf = sum(math.exp(-lam + k * math.log(lam) - math.lgamma(k + 1)) for k in range(count + 1))
        lo, hi = ((lo + hi) / 2, hi) if cdf > alpha else (lo, (lo + hi) / 2)
    return hi


def evidence_limit(levels: list[tuple[float, float]], drift: float, tokens_per_day: float, false_alarm: float) -> float:
    """The CUSUM limit h with at most `false_alarm` honest alarms a day.

    `levels` are (p, b) pairs: an honest token's increment is at most b with probability p (from
    `honest_levels`), and 0 with the rest; no accepted value exceeds the top b (larger ones fail the
    round). So the honest increment X is dominated by Y = b_i with probability p_i. With theta > 0 solving
    E exp(theta (Y - drift)) = 1, the walk from any start reaches h with probability at most
    exp(-theta h) (Lundberg), so over N tokens S >= h with probability at most N exp(-theta h):
    h = ln(N / false_alarm) / theta. Needs drift > E Y (the honest walk drifts down).
    """
    mean = sum(p * b for p, b in levels)
    if drift <= mean:
        raise ValueError(f"drift {drift} must exceed the honest mean bound {mean}")
    rest = 1 - sum(p for p, _ in levels)
    f = lambda th: rest * math.exp(-th * drift) + sum(p * math.exp(th * (b - drift)) for p, b in levels) - 1  # noqa: E731
    lo, hi = 1e-9, 1.0
    while f(hi) < 0:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return math.log(tokens_per_day / false_alarm) / hi


def honest_levels(values: list[float], edges: tuple[float, ...]) -> list[tuple[float, float]]:
    """(p, b) for `evidence_limit`: a distribution that dominates these honest values with 99.9% confidence
    at every edge. P(Y > e) is the upper bound on P(X > e) for each edge e below the top one, so
    Y = b_i (the band's top edge) with the difference of its two tails. Values above the top edge fail
    their round and are no honest noise (none in the calibration)."""
    n = max(len(values), 1)
    tails = [min(1.0, poisson_upper(sum(v > e for v in values), n)) for e in (0.0,) + tuple(edges[:-1])] + [0.0]
    return [(tails[i] - tails[i + 1], b) for i, b in enumerate(edges)]


# The bands honest logprob errors are counted in, up to max_gen_logprob_error (fractions of it), finer where
# honest values lie. Margins use the validator's own bands (scoring.margin_bands).
ERROR_BANDS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)
ORDERS = 200  # random orders of a cheat's generations, for how soon its evidence crosses the limit
WITHIN = 300  # the bar: a steady cheat is flagged within this many generated tokens


def bands_of(name: str, th: scoring.Thresholds) -> tuple[float, ...]:
    """The top edges of the bands an evidence statistic's honest values are counted in (a disagreement is one
    band: any margin above 0 counts 1)."""
    if name == "token margins":
        return scoring.margin_bands(th)
    if name == "disagreements":
        return (1.0,)
    return tuple(b * th.max_gen_logprob_error for b in ERROR_BANDS)


def tokens_to_flag(margins: list[float], errors: list[float], th: scoring.Thresholds,
                   statistics: tuple[str, ...] = tuple(scoring.EVIDENCE_STREAMS)) -> int | None:
    """How many tokens of this stream the validator's evidence needs to flag it (None: never), counting
    only the named statistics. A stream without errors (an older calibration file) counts its margins."""
    params = scoring.evidence_params(th)
    streams = {"margins": margins, "errors": errors}
    first = None
    for name in statistics:
        cap, drift, limit = params[name]
        s = 0.0
        for i, x in enumerate(streams[scoring.EVIDENCE_STREAMS[name]]):
            s = scoring.cusum_step(s, scoring.counted(name, x, th), cap, drift)
            if s >= limit:
                first = i + 1 if first is None else min(first, i + 1)
                break
    return first


def _flag_orders(checks: list["Check"], th: scoring.Thresholds, statistics: tuple[str, ...]) -> dict:
    """Over many orders of the same generations, how soon the evidence crosses, whatever comes first."""
    rng = random.Random(0)
    needs = []
    for _ in range(ORDERS):
        order = checks[:]
        rng.shuffle(order)
        needs.append(tokens_to_flag([m for c in order for m in c.margins], [e for c in order for e in c.errors],
                                    th, statistics))
    found = sorted(x for x in needs if x is not None)
    return {"flagged_within": sum(x <= WITHIN for x in found) / len(needs),
            "tokens_to_flag_worst": found[-1] if len(found) == len(needs) else None,
            "tokens_to_flag_median": found[len(found) // 2] if found else None}


def evidence_summary(honest: list["Check"], cheats: dict[str, list["Check"]], th: scoring.Thresholds,
                     tokens_per_day: float, false_alarm: float) -> dict:
    """Each statistic's honest bands and the limit they give (per honest precision, the largest used; the
    two statistics share the false-alarm rate), the honest CUSUMs' largest values, and each cheat's tokens
    to detection over its generations: by both statistics, and by margins alone (the same tokens with
    exact logprobs)."""
    params = scoring.evidence_params(th)
    out: dict = {"tokens_per_day": tokens_per_day, "false_alarm_per_day": false_alarm, "statistics": {}, "cheats": {}}
    for name, (cap, drift, limit) in params.items():
        field_ = scoring.EVIDENCE_STREAMS[name]
        by_dtype: dict = {}
        for c in honest:
            by_dtype.setdefault(c.miner, []).extend(getattr(c, field_))
        per = {}
        for dtype, values in by_dtype.items():
            if not values:
                continue
            levels = honest_levels(values, bands_of(name, th))
            s, worst = 0.0, 0.0
            for x in values:
                s = scoring.cusum_step(s, scoring.counted(name, x, th), cap, drift)
                worst = max(worst, s)
            try:
                derived = evidence_limit(levels, drift, tokens_per_day, false_alarm / len(params))
            except ValueError:  # too few honest tokens bound the bands' rates above the drift: no limit
                derived = None
            per[dtype] = {"tokens": len(values), "nonzero": sum(x > 0 for x in values), "mean": sum(values) / len(values),
                          "levels": levels, "limit": derived, "max_cusum": worst}
        out["statistics"][name] = {"drift": drift, "cap": cap, "limit_used": limit, "by_dtype": per,
                                   "limit_derived": None if any(d["limit"] is None for d in per.values())
                                   else max((d["limit"] for d in per.values()), default=None)}
    for kind, checks in cheats.items():
        margins = [m for c in checks for m in c.margins]
        errors = [e for c in checks for e in c.errors]
        out["cheats"][kind] = {"tokens": len(margins), "disagreement_rate": sum(m > 0 for m in margins) / max(len(margins), 1),
                               "mean_margin": sum(margins) / max(len(margins), 1),
                               "mean_error": sum(errors) / len(errors) if errors else None,
                               "both": _flag_orders(checks, th, tuple(params)),
                               "margins_alone": _flag_orders(checks, th, ("token margins",))}
    return out


def worse(metric: str, a: float, b: float) -> float:
    return min(a, b) if metric in LOWER_IS_WORSE else max(a, b)


def better(metric: str, a: float, b: float) -> float:
    return max(a, b) if metric in LOWER_IS_WORSE else min(a, b)


def extreme(checks: list[Check], pick=worse) -> dict[str, float]:
    """Each metric's most suspicious value over the checks (pick=better: least suspicious, a cheat's
    closest approach)."""
    out: dict[str, float] = {}
    for c in checks:
        for m in METRICS:
            if m in c.metrics:
                out[m] = pick(m, out[m], c.metrics[m]) if m in out else c.metrics[m]
    return out


def limit_of(metric: str, th: scoring.Thresholds) -> float:
    return getattr(th, THRESHOLD_OF[metric])


def rescored(c: Check, th: scoring.Thresholds) -> Check:
    """The check's verdict under other thresholds, from its metrics alone (a run need not be repeated
    to try thresholds). A failure with no metrics (a malformed answer) stays a failure."""
    if not c.ok and not c.metrics:
        return c
    if not c.ok and c.reason.startswith(("finish", "EOS at", "unknown", "empty", "token id")):
        return c
    for m in METRICS:
        if m not in c.metrics:
            continue
        limit, value = limit_of(m, th), c.metrics[m]
        if m == "boundary_excess":
            if value > limit:
                return dataclasses.replace(c, ok=False, reason=f"token outside the allowed set by {value:.4g}")
            continue
        if (value < limit) if m in LOWER_IS_WORSE else (value > limit):
            return dataclasses.replace(c, ok=False, reason=f"{m.replace('_', ' ')} {value:.4g} beyond {limit:.4g}")
    return dataclasses.replace(c, ok=True, reason="")


def summarize(checks: list[Check], th: scoring.Thresholds) -> dict:
    """Worst honest values per (model, miner, batch) and overall, cheats' best values and catch rates."""
    models = sorted({c.model for c in checks})
    out: dict = {"thresholds": dataclasses.asdict(th), "models": {}}
    for model in models:
        mine = [c for c in checks if c.model == model]
        honest = [c for c in mine if c.honest]
        accepted = [c for c in honest if c.accepted]
        by_cell: dict = {}
        for c in honest:
            by_cell.setdefault(c.miner, {}).setdefault(str(c.batch), []).append(c)
        cheats: dict = {}
        for label in dict.fromkeys(c.miner for c in mine if not c.honest):
            theirs = [c for c in mine if not c.honest and c.miner == label]
            fwd = [c for c in theirs if c.kind == "forward"]
            gen = [c for c in theirs if c.kind != "forward"]
            if label in APPLIES_TO:
                gen = [c for c in gen if APPLIES_TO[label](c)]
            # Changed: its tokens differ from the honest sampler's and are not, at every step, the reference
            # sampler's own choice (an answer with every margin 0 and every token inside the reference's strict
            # allowed set is what the validator itself would give: the honest float32 decode and the
            # teacher-forced reference can part at a near-tie). A token past the strict set's boundary, even
            # within boundary_tol, is a change (a sampler that ignores top-p or top-k chooses such tokens).
            changed = [c for c in gen if c.changed and (not c.ok or any(m > 0 for m in c.margins)
                                                        or c.metrics.get("boundary_excess", 0) > 0)]
            # What a validator does with one challenge to a fresh miner: the check, and that challenge's
            # margins alone as evidence.
            alone = [c for c in gen if not c.ok or tokens_to_flag(c.margins, c.errors, th)]
            cheats[label] = {
                "generation_caught_with_evidence": len(alone) / len(gen) if gen else None,
                "best": extreme(theirs, better),
                "forward_caught": _rate(fwd),
                "generation_caught": _rate(gen),
                "generation_caught_when_changed": _rate(changed),
                "generations": len(gen),
                "changed": len(changed),
                "checks": len(theirs),
                "reasons": _reasons(theirs),
            }
        gens = [c for c in accepted if c.kind != "forward"]
        out["models"][model] = {
            "checks": len(mine),
            "honest_checks": len(accepted),
            "honest_token_checks": sum(len(c.margins) for c in gens),
            "honest_false_rejections": [dataclasses.asdict(c) | {"margins": []} for c in accepted if not c.ok],
            "worst_honest": extreme(accepted),
            "worst_by_miner": {label: extreme(sum(cells.values(), [])) for label, cells in by_cell.items()},
            "worst_by_miner_batch": {label: {b: extreme(cs) for b, cs in cells.items()} for label, cells in by_cell.items()},
            "rejected_by_miner": {label: sum(not c.ok for cs in cells.values() for c in cs) for label, cells in by_cell.items()},
            "checks_by_miner": {label: sum(len(cs) for cs in cells.values()) for label, cells in by_cell.items()},
            "dishonest": cheats,
        }
    return out


def _rate(checks: list[Check]) -> float | None:
    return sum(not c.ok for c in checks) / len(checks) if checks else None


def _reasons(checks: list[Check]) -> dict[str, int]:
    """How often each check was the first to fail (the reason's leading words)."""
    counts: dict[str, int] = {}
    for c in checks:
        if not c.ok:
            key = f"{c.kind}: {re.match(r'[^0-9]*', c.reason).group().strip()}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def margin_rows(summary: dict, model: str) -> list[tuple]:
    """(metric, threshold, honest worst, bf16 worst, dishonest best and its kind) for a table."""
    s = summary["models"][model]
    th = summary["thresholds"]
    rows = []
    for m in METRICS:
        cheat_vals = [(c["best"][m], k) for k, c in s["dishonest"].items() if m in c["best"]]
        closest = None
        if cheat_vals:
            closest = min(cheat_vals, key=lambda vk: -vk[0] if m in LOWER_IS_WORSE else vk[0])
        bf16 = s["worst_by_miner"].get("bfloat16", {}).get(m)
        rows.append((m, limit_of(m, scoring.Thresholds(**th)), s["worst_honest"].get(m), bf16, closest))
    return rows


def fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.2e}"
