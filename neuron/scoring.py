"""Pure scoring: check miners' answers against reference log-probabilities, reward, average, weigh."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

# Any probability the loss needs is at least this, so one target a miner gave no mass costs
# -log(1e-9) ~ 20.7 nats instead of inf, and a mean over positions stays a number.
PROB_FLOOR = 1e-9

FINISH_REASONS = ("length", "stop", "stop_sequence")

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class Thresholds:
    """What an honest miner stays within: the worst honest noise measured by scripts/calibrate.py
    (float32 and float16 miners, batches of 1 to 16, on SmolLM2-135M and the tiny model) plus
    headroom. docs/calibration.md has the numbers, the margins to dishonest miners, and why
    bfloat16 miners are not let through.
    """

    # Worst position: fraction of the reference's top-k ids the miner also reports. float16
    # near-ties at the k-th place cost an honest miner one id of 16; this allows four.
    min_topk_overlap: float = 0.75
    # Worst position: the least total-variation distance between the reference and any full
    # distribution consistent with the miner's report (see `verify_forward`). Honest worst 0.027.
    max_prob_distance: float = 0.05
    # Worst position: rank of the reference's argmax among the miner's ids (0 = first; k when
    # absent). float16 reaches 2 where three tokens nearly tie, and so does bfloat16.
    max_ref_argmax_rank: int = 3
    # Worst |miner logprob - reference logprob| over positions and the miner's own ids, in nats.
    # float16 has rare outlier positions (one in ~1,000 above 0.1, worst seen 0.22).
    max_logprob_error: float = 0.4
    # Median over positions of each position's worst logprob error: a cheat's error is at every
    # position, float16's outliers are not. Honest worst 0.03; int8 weights or logit noise of 0.1
    # nats give at least 0.15.
    max_median_logprob_error: float = 0.1
    # Worst |stated rest mass - reference mass outside the miner's ids|. Honest worst 0.007.
    max_rest_mass_error: float = 0.02
    # Positions with this many tokens of context or fewer (the second and third of a prompt) are judged at
    # early_scale times the probability-distance, logprob-error and rest-mass limits: float16's outliers sit
    # there. SmolLM2 float16 at every position of 375 prompts (docs/calibration.md): worst logprob error 0.50
    # and 0.41 there against 0.11 anywhere else, rest mass 0.017 against 0.007; vLLM float16, 0.64.
    early_context: int = 3
    early_scale: float = 3.0
    # Format slack: sum(exp(topk_logprobs)) + rest_mass must be 1 within this, and reported
    # logprobs at most this above 0 (rounding of a probability of ~1).
    format_tol: float = 1e-3
    # Seeded generation (docs/sampling.md), in logit units (nats of raw logit): the most the
    # reference's perturbed score of its own choice may exceed that of the miner's token, times the
    # temperature (the raw logit gap for greedy). An honest miner's margin is at most twice its
    # logit noise near the top of the distribution; float16 logits near 20 are rounded to 1/64, so a
    # few steps of that apart is honest: worst 0.075 (SmolLM2 float16, batch 16, in 59,181 float16
    # tokens; 0.058 in an earlier 48,680) and 0.031 (tiny float16). docs/calibration.md has the cheats' side.
    max_token_margin: float = 0.1
    # Top-k / top-p boundary tolerance, in logit units: an id whose logit is within this of the k-th
    # (near-ties at the k-th place), or which an honest miner's logit noise of this much could move into
    # or out of the top-p nucleus (the odds of the mass before it, within exp(+-2 * this / T), and ids
    # within 2 * this / T of it reordered: `nucleus_bounds`), may be in or out of an honest miner's
    # allowed set, so a miner's token there is not "outside", and the reference's own choice there is
    # not held against the miner. The furthest an honest token lay past the reference's strict set, on
    # this rule, was 0.0054 (tiny float16) and 0.0008 (SmolLM2 float16) in 55,352 honest tokens, every one
    # sampled and half with top-p (docs/calibration.md); boundary events are rare (6 of 2,656 checks).
    boundary_tol: float = 0.04
    # Worst |reported - reference| logprob of a generated token, in nats. Honest worst 0.051
    # (SmolLM2 float16, 59,181 tokens; 0.057 in an earlier 48,680).
    max_gen_logprob_error: float = 0.1
    # Evidence across rounds: a one-sided CUSUM over every checked token's margin,
    # S <- max(0, S + min(counted(margin), evidence_cap) - evidence_drift) (`counted`: evidence_bands
    # below); a miner whose S reaches evidence_limit is flagged.
    # The limit keeps honest alarms under 3.3e-7 per miner per day (a third of 1e-6: the logprob and the
    # disagreement evidence have the rest) at 1e6 checked tokens a day, by Lundberg's bound over the measured rates of
    # honest margins in three bands up to max_token_margin, for each accepted precision (neuron/
    # calibration.py `evidence_limit`, `honest_levels`; docs/calibration.md).
    evidence_drift: float = 0.001
    evidence_limit: float = 0.51
    # The most one token adds. Honest margins stay under max_token_margin (0.075 at worst); a token far
    # past it (a steered one: several logits) fails its round, and adds this much: alone it never
    # flags a miner for good, a second within (2 * cap - limit) / drift = 310 tokens does. A token outside
    # every allowed set (`token_margins`) counts as at least this margin.
    evidence_cap: float = 0.41
    # The honest margins' bands below max_token_margin: (0, 0.025], (0.025, 0.05], (0.05, 0.1]. The
    # false-alarm bound counts every honest margin at the top of its band; the CUSUM counts a margin
    # of the first band as it is and one of a higher band at that band's top, which costs the bound
    # nothing (honest float16: 2 of 59,181 tokens above 0.025) and weighs a steady cheat's mid-sized
    # margins more (int8 weights with exact logprobs: flagged after a median of 162 tokens instead of
    # 175, within 300 in 85% of orders instead of 80.5%; docs/calibration.md).
    evidence_bands: tuple[float, ...] = (0.025, 0.05)
    # Evidence from the reported logprobs: a second one-sided CUSUM, over every token's |reported -
    # reference| logprob error, L <- max(0, L + min(error, max_gen_logprob_error) - lp_evidence_drift);
    # a miner whose L reaches lp_evidence_limit is flagged. Honest float16 errors average 0.0036 nats
    # (SmolLM2); a miner serving int8 weights reports what its weights give, 0.063 on average. The
    # limit is set like evidence_limit's, over nine bands of honest errors up to max_gen_logprob_error
    # (the three statistics share the false-alarm rate): 0.26 derived, 0.4 in use, headroom for a GPU's
    # float16 kernels, which no calibration has measured yet.
    lp_evidence_drift: float = 0.02
    lp_evidence_limit: float = 0.4
    # Evidence from how often a miner's token is not the reference sampler's choice (a "disagreement": margin
    # > 0, an outside token included), however small the margin: a third one-sided CUSUM over the indicator,
    # D <- max(0, D + [margin > 0] - disagreement_drift), flagged at disagreement_limit. It is the Bernoulli
    # log-likelihood-ratio CUSUM of p1 = 3 p0 against p0 = 0.006, divided by ln(p1 (1 - p0) / (p0 (1 - p1))):
    # drift = ln((1 - p0) / (1 - p1)) over that. Honest float16 disagrees at 0.0026 (SmolLM2, 70,703 tokens) and
    # 0.0033 (tiny, 125,781), the same at every batch size, greedy and sampled (Poisson: dispersion index 1.0);
    # float32 never did. p0 is 1.9x SmolLM2's 99.9% bound and 1.6x tiny's; p1 = 0.018 is the rate of the margin
    # evidence's blind spot (`nudge0.05`, swaps within 0.05 of the sampler's choice: 0.019). The limit keeps
    # honest alarms under 1e-6 / 3 per miner per day at 1e6 tokens a day for any rate up to p0, by the same
    # Lundberg bound as the other two (neuron/harness/disagreements.py; docs/calibration.md).
    disagreement_drift: float = 0.011
    disagreement_limit: float = 26.0


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: ok, or the first failure in words, and the measured worst values."""

    ok: bool
    reason: str  # "" when ok
    metrics: dict[str, float] = field(default_factory=dict)


def _fail(reason: str, metrics: dict[str, float] | None = None) -> Verdict:
    return Verdict(False, reason, metrics or {})


def _is_int(t: Tensor) -> bool:
    return t.dtype in _INT_DTYPES


def _has_duplicates(ids: Tensor) -> bool:
    s = ids.sort(dim=-1).values
    return bool((s[..., 1:] == s[..., :-1]).any())


def _check_ref(ref_logprobs: Tensor) -> None:
    # The reference is the validator's own: a bad one is a bug here, not a dishonest miner.
    if ref_logprobs.dim() != 2 or not ref_logprobs.is_floating_point():
        raise ValueError(f"ref_logprobs must be a 2-D float tensor, got {tuple(ref_logprobs.shape)}")


def _forward_format(ref: Tensor, ids: Tensor, lp: Tensor, rest: Tensor, tol: float) -> str:
    P, V = ref.shape
    if not _is_int(ids) or ids.dim() != 2 or ids.shape[0] != P or not 1 <= ids.shape[1] <= V:
        return f"topk_ids must be integer [{P}, k] with 1 <= k <= {V}, got {tuple(ids.shape)} {ids.dtype}"
    k = ids.shape[1]
    if not lp.is_floating_point() or tuple(lp.shape) != (P, k):
        return f"topk_logprobs must be float [{P}, {k}], got {tuple(lp.shape)} {lp.dtype}"
    if not rest.is_floating_point() or tuple(rest.shape) != (P,):
        return f"rest_mass must be float [{P}], got {tuple(rest.shape)} {rest.dtype}"
    if bool(((ids < 0) | (ids >= V)).any()):
        return f"token id outside [0, {V})"
    if _has_duplicates(ids):
        return "duplicate token id in a row"
    if not bool(torch.isfinite(lp).all()) or not bool(torch.isfinite(rest).all()):
        return "non-finite logprob or rest mass"
    if float(lp.max()) > tol:
        return f"positive logprob {float(lp.max()):.4f}"
    if bool((lp[:, 1:] > lp[:, :-1]).any()):
        return "top-k logprobs not sorted in descending order"
    if bool(((rest < 0) | (rest > 1)).any()):
        return "rest mass outside [0, 1]"
    total = lp.double().exp().sum(-1) + rest.double()
    worst = int((total - 1).abs().argmax())
    if abs(float(total[worst]) - 1) > tol:
        return f"top-k mass + rest mass = {float(total[worst]):.4f}, not 1, at position {worst}"
    return ""


def verify_forward(
    ref_logprobs: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, rest_mass: Tensor, th: Thresholds,
    positions: Tensor | None = None,
) -> Verdict:
    """Check a miner's top-k next-token answer at P positions against the full reference.

    ref_logprobs [P, V] is the validator's log_softmax; topk_ids/topk_logprobs [P, k] and
    rest_mass [P] are the miner's. A malformed answer fails with no metrics; otherwise every
    metric is its worst value over positions, except median_logprob_error (the median over
    positions of each position's worst logprob error: the lower of the two middle values for an
    even P), and the first threshold broken is the reason. `positions` [P] (each row's index in its
    sequence) lets the limits widen where the context is short (`Thresholds.early_context`).

    The probability distance is the least total variation between the reference and any full
    distribution Q consistent with the report: Q equals the reported probabilities on the miner's
    ids; each id the miner left out gets at most the miner's k-th probability (the report claims
    to be the top k) and all of them together exactly rest_mass. Over the partition {each miner
    id, each reference top-k id the miner left out (M), everything else (R)}, with r the reference
    probabilities, cap the miner's smallest probability, and S = min(sum_M min(r, cap), rest_mass)
    (the most mass Q can move onto M), that least distance is

        0.5 * (sum_miner |p - r| + (sum_M r - S) + |rest_mass - S - r_R|).

    It never blames a miner for mass it did not have to report (a lower bound on the distance
    of its true distribution), yet reporting the wrong ids or the wrong probabilities shows.
    """
    _check_ref(ref_logprobs)
    problem = _forward_format(ref_logprobs, topk_ids, topk_logprobs, rest_mass, th.format_tol)
    if problem:
        return _fail(problem)

    ids = topk_ids.long()
    k = ids.shape[1]
    ref = ref_logprobs.double()
    lp, rest = topk_logprobs.double(), rest_mass.double()
    ref_p = ref.exp()

    ref_top = ref.topk(k, dim=-1).indices
    same = ids.unsqueeze(-1) == ref_top.unsqueeze(-2)  # [P, miner k, ref k]
    ref_found = same.any(-2)
    overlap = ref_found.double().mean(-1)

    is_argmax = ids == ref.argmax(-1, keepdim=True)
    argmax_rank = torch.where(is_argmax.any(-1), is_argmax.int().argmax(-1), k).double()

    ref_at = ref.gather(1, ids)
    logprob_error = (lp - ref_at).abs().amax(-1)
    median_logprob_error = logprob_error.median()
    r_own = ref_p.gather(1, ids)
    rest_error = (rest - (1 - r_own.sum(-1)).clamp(min=0)).abs()

    p_own = lp.exp()
    r_missing = ref_p.gather(1, ref_top) * ~ref_found
    cap = p_own.amin(-1, keepdim=True)
    movable = torch.minimum(r_missing.clamp(max=cap).sum(-1), rest)
    r_other = (1 - r_own.sum(-1) - r_missing.sum(-1)).clamp(min=0)
    distance = 0.5 * (
        (p_own - r_own).abs().sum(-1) + (r_missing.sum(-1) - movable) + (rest - movable - r_other).abs()
    )

    metrics = {
        "topk_overlap": float(overlap.min()),
        "ref_argmax_rank": float(argmax_rank.max()),
        "prob_distance": float(distance.max()),
        "logprob_error": float(logprob_error.max()),
        "median_logprob_error": float(median_logprob_error),
        "rest_mass_error": float(rest_error.max()),
    }
    # (values, sign, limit, text, whether the limit widens at short context)
    checks = [
        (overlap, -1, th.min_topk_overlap, "top-k overlap {:.2f} < {:.2f}", False),
        (argmax_rank, 1, th.max_ref_argmax_rank, "reference argmax rank {:.0f} > {:.0f}", False),
        (distance, 1, th.max_prob_distance, "probability distance {:.4f} > {:.4f}", True),
        (logprob_error, 1, th.max_logprob_error, "logprob error {:.4f} > {:.4f}", True),
        (rest_error, 1, th.max_rest_mass_error, "rest mass error {:.4f} > {:.4f}", True),
    ]
    scale = early_scale(positions, th, ids.shape[0]).double()
    for values, sign, limit, text, widens in checks:
        bound = limit * scale if widens else torch.full_like(values, limit)
        pos = int((sign * (values - bound)).argmax())
        if sign * float(values[pos] - bound[pos]) > 0:
            return _fail(text.format(float(values[pos]), float(bound[pos])) + f" at position {pos}", metrics)
    if float(median_logprob_error) > th.max_median_logprob_error:
        text = f"median logprob error {float(median_logprob_error):.4f} > {th.max_median_logprob_error:.4f}"
        return _fail(f"{text} over {ids.shape[0]} positions", metrics)
    return Verdict(True, "", metrics)


def early_scale(positions: Tensor | None, th: Thresholds, n: int) -> Tensor:
    """Each position's factor on the worst-position limits: th.early_scale where it has at most
    th.early_context tokens of context, else 1 (all 1 without positions)."""
    if positions is None:
        return torch.ones(n)
    return torch.where(positions.long() + 1 <= th.early_context, th.early_scale, 1.0)


@dataclass(frozen=True)
class GenSpec:
    """What a seeded generation was asked: the sampler's parameters and how it may end."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0


def nucleus_bounds(scaled: Tensor, strict: Tensor, top_p: float, tol: float | Tensor) -> tuple[Tensor, Tensor]:
    """Which ids lie surely inside (bool [T, V]), and which possibly inside (bool [T, V]), the top-p nucleus of
    every sampler whose scaled logits are within tol of `scaled` [T, V] (tol: a number, or one per row [T, 1]).

    The sampler (docs/sampling.md) keeps an id when the mass m of the ids before it (over the top-k ids,
    `strict`) is below top_p, i.e. when the odds m / (1 - m) are below odds(top_p). Noise of at most tol per
    logit moves the mass before an id and the mass of the rest each by a factor within exp(+-tol), so those
    odds by one within exp(+-2 tol); and it can reorder ids whose logits lie within 2 tol of each other. So an
    id is surely kept when even the ids possibly before it (every other id within 2 tol below it or above)
    have odds below odds(top_p) exp(-2 tol), and possibly kept when the ids surely before it (more than 2 tol
    above) have odds below odds(top_p) exp(+2 tol). Both bounds stay inside (0, 1) for 0 < top_p < 1: the
    first id is always possibly kept, and an id past the nucleus by more than the noise never is (a
    tolerance on the mass, top_p exp(2 tol), passes 1 for top_p 0.9 and would keep every id)."""
    masked = scaled.masked_fill(~strict, -math.inf)
    probs = torch.softmax(masked, dim=1)
    asc, order = masked.sort(dim=1)
    # at_or_above[:, j]: the mass of the ids from ascending position j up; 0 past the last one.
    at_or_above = torch.cat([probs.gather(1, order).flip(1).cumsum(1).flip(1), torch.zeros_like(probs[:, :1])], 1)
    surely_before = at_or_above.gather(1, torch.searchsorted(asc, scaled + 2 * tol, right=True))
    possibly_before = (at_or_above.gather(1, torch.searchsorted(asc, scaled - 2 * tol)) - probs).clamp(min=0)
    # odds(m) < r  <=>  m < r / (1 + r), for m in [0, 1] and r > 0.
    r_in, r_out = (top_p / (1 - top_p) * torch.exp(sign * torch.as_tensor(tol, dtype=scaled.dtype)) for sign in (-2, 2))
    return possibly_before < r_in / (1 + r_in), surely_before < r_out / (1 + r_out)


# The margin of a token past the reference's strict allowed set but within boundary_tol of it (`token_margins`).
PAST_STRICT_MARGIN = 1e-9


def token_margins(ref_logits: Tensor, tokens: Tensor, spec: GenSpec, boundary_tol: float) -> tuple[Tensor, Tensor]:
    """The seeded sampler's view of each token: its margin (float64 [T], logit units) and whether it lies
    outside every allowed set that logit noise of boundary_tol could give (bool [T]).

    ref_logits[t] [T, V] are the reference's raw logits predicting tokens[t]. With s the sampler's
    perturbed scores (docs/sampling.md: raw logits for greedy, logits / T + Gumbel noise otherwise),
    margin = T * max(0, max over A- of s - s(token)) where A- holds the ids allowed with room to spare
    (more than boundary_tol inside the top-k boundary, and inside the top-p nucleus under any noise of
    boundary_tol / T per scaled logit: `nucleus_bounds`); greedy has T = 1 and A- = every id.
    Scaling by T puts greedy and sampled margins in the same unit, the raw logit. A token that lies
    within the tolerance of a boundary is judged by its score like any other; one beyond it is outside.
    """
    from neuron.engine.sampler import RowParams, gumbel, step_keys

    T, V = ref_logits.shape
    x = ref_logits.double()
    ids = tokens.long().unsqueeze(1)
    if spec.temperature <= 0:
        margins = x.amax(1) - x.gather(1, ids).squeeze(1)
        return margins.clamp(min=0), torch.zeros(T, dtype=torch.bool)
    temp = spec.temperature
    scaled = x / temp
    tol = boundary_tol / temp
    inner = torch.ones_like(scaled, dtype=torch.bool)  # A-: surely allowed
    outer = torch.ones_like(scaled, dtype=torch.bool)  # A+: possibly allowed
    strict = torch.ones_like(scaled, dtype=torch.bool)
    if 0 < spec.top_k < V:
        kth = scaled.topk(spec.top_k, dim=1).values[:, -1:]
        inner, outer, strict = scaled > kth + tol, scaled >= kth - tol, scaled >= kth
    if spec.top_p < 1.0:
        surely, possibly = nucleus_bounds(scaled, strict, spec.top_p, tol)
        inner, outer = inner & surely, outer & possibly
        strict = strict & nucleus_bounds(scaled, strict, spec.top_p, 0.0)[1]
    rp = RowParams.build([(temp, spec.top_k, spec.top_p, spec.seed, t) for t in range(T)])
    scores = scaled + gumbel(step_keys(rp.seed, rp.step), V)
    best = scores.masked_fill(~inner, -math.inf).amax(1)
    own = scores.gather(1, ids).squeeze(1)
    margins = (temp * (best - own)).clamp(min=0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    # A token past the reference's own allowed set, though within the tolerance, is not the reference sampler's
    # choice: a disagreement, however its score compares (a sampler that ignores top-p picks it by the same
    # scores, from more ids). It gets a margin of PAST_STRICT_MARGIN, which the disagreement evidence counts
    # and the margin evidence, in logit units, does not feel.
    past = ~strict.gather(1, ids).squeeze(1)
    margins = torch.where(past, margins.clamp(min=PAST_STRICT_MARGIN), margins)
    outside = ~outer.gather(1, ids).squeeze(1)
    return margins, outside


def verify_generation(
    ref_logits: Tensor,
    tokens: Tensor,
    reported_logprobs: Tensor,
    *,
    spec: GenSpec,
    finish_reason: str,
    eos_token_id: int | None,
    th: Thresholds,
) -> Verdict:
    """Check a miner's seeded generation against the reference teacher-forced over its tokens.

    ref_logits[t] [T, V] are the reference's raw logits predicting tokens[t]. Every token must be the
    seeded sampler's choice within th.max_token_margin (`token_margins`), the EOS step included: a
    stop where the reference would not choose EOS, or going on where it would by more than the
    margin, fail the same way. Reported logprobs (raw log_softmax) must match the reference's. The
    metrics carry every token's margin ("margins") and logprob error ("errors") as lists, for the
    evidence across rounds.
    A "stop_sequence" finish is checked against the requested stop strings by the caller.
    """
    _check_ref(ref_logits)
    if spec.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {spec.max_new_tokens}")
    if not _is_int(tokens) or tokens.dim() != 1:
        return _fail(f"tokens must be a 1-D integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    T = tokens.shape[0]
    if not reported_logprobs.is_floating_point() or tuple(reported_logprobs.shape) != (T,):
        return _fail(f"reported logprobs must be float [{T}], got {tuple(reported_logprobs.shape)}")
    if T == 0:
        return _fail("empty generation")
    if ref_logits.shape[0] != T:
        raise ValueError(f"ref_logits has {ref_logits.shape[0]} rows for {T} tokens")
    V = ref_logits.shape[1]
    if T > spec.max_new_tokens:
        return _fail(f"{T} tokens > max_new_tokens {spec.max_new_tokens}")
    if finish_reason not in FINISH_REASONS:
        return _fail(f"unknown finish reason {finish_reason!r}")
    if bool(((tokens < 0) | (tokens >= V)).any()):
        return _fail(f"token id outside [0, {V})")
    if not bool(torch.isfinite(reported_logprobs).all()):
        return _fail("non-finite reported logprob")
    if float(reported_logprobs.max()) > th.format_tol:
        return _fail(f"positive logprob {float(reported_logprobs.max()):.4f}")

    ids = tokens.long()
    ends_with_eos = eos_token_id is not None and int(ids[-1]) == eos_token_id
    if eos_token_id is not None and bool((ids[:-1] == eos_token_id).any()):
        step = int((ids[:-1] == eos_token_id).int().argmax())
        return _fail(f"EOS at step {step} but generation went on")
    if finish_reason == "length" and T != spec.max_new_tokens:
        return _fail(f"finish 'length' after {T} of {spec.max_new_tokens} tokens")
    if finish_reason == "stop" and not ends_with_eos:
        return _fail("finish 'stop' without a final EOS token")
    if finish_reason != "stop" and ends_with_eos:
        return _fail(f"final EOS token but finish {finish_reason!r}")

    margins, outside = token_margins(ref_logits, ids, spec, th.boundary_tol)
    # A token no honest sampler could choose adds to the evidence as much as a far-off one (its own margin
    # can be 0: a sampler that ignores top-p chooses by the same scores, from more ids).
    margins = torch.where(outside, margins.clamp(min=th.evidence_cap), margins)
    ref_lp = torch.log_softmax(ref_logits.double(), dim=-1).gather(1, ids.unsqueeze(1)).squeeze(1)
    errors = (reported_logprobs.double() - ref_lp).abs()
    metrics = {
        "n_tokens": float(T),
        "token_margin": float(margins.max()),
        "disagreements": float((margins > 0).sum()),
        "gen_logprob_error": float(errors.max()),
        "margins": margins.tolist(),
        "errors": errors.tolist(),
    }
    if bool(outside.any()):
        step = int(outside.int().argmax())
        return _fail(f"token outside the top-k/top-p allowed set at step {step}", metrics)
    step = int(margins.argmax())
    if float(margins[step]) > th.max_token_margin:
        what = "EOS " if ends_with_eos and step == T - 1 else ""
        text = f"{what}token margin {float(margins[step]):.4f} > {th.max_token_margin:.4f}"
        return _fail(f"{text} at step {step}", metrics)
    step = int(errors.argmax())
    if float(errors[step]) > th.max_gen_logprob_error:
        text = f"logprob error {float(errors[step]):.4f} > {th.max_gen_logprob_error:.4f}"
        return _fail(f"{text} at step {step}", metrics)
    return Verdict(True, "", metrics)


@dataclass
class Evidence:
    """One miner's accumulated generation evidence: one-sided CUSUMs over its tokens' margins, over its
    reported logprobs' errors, and over its disagreements with the reference sampler."""

    cusum: float = 0.0  # the CUSUM over every checked token's margin, in order (cusum_step)
    tokens: int = 0  # tokens checked
    disagreements: int = 0  # tokens that were not the reference's choice
    margin_sum: float = 0.0  # sum of margins, logit units
    flagged: bool = False  # a CUSUM reached its limit once: stays until the uid changes hotkey
    lp_cusum: float = 0.0  # the CUSUM over every checked token's reported logprob error
    error_sum: float = 0.0  # sum of logprob errors, nats
    flagged_by: str = ""  # which statistic crossed first (a name of evidence_params; "" when not flagged)
    dis_cusum: float = 0.0  # the CUSUM over every checked token's disagreement (margin > 0), in order


def cusum_step(s: float, x: float, cap: float, drift: float) -> float:
    """One token of an evidence CUSUM: S <- max(0, S + min(x, cap) - drift)."""
    return max(0.0, s + min(x, cap) - drift)


def margin_bands(th: Thresholds) -> tuple[float, ...]:
    """The top edges of the honest margins' bands: th.evidence_bands, then max_token_margin."""
    return tuple(th.evidence_bands) + (th.max_token_margin,)


def counted(name: str, x: float, th: Thresholds) -> float:
    """What one token adds to the named evidence statistic before the cap and the drift: a logprob
    error as it is; a margin as it is in the first band (margin_bands), at its band's top in a
    higher one up to max_token_margin, and as it is past that (a failed token; the cap bounds it);
    to "disagreements", 1 for a margin above 0 and 0 for none."""
    if name == "disagreements":
        return 1.0 if x > 0 else 0.0
    edges = margin_bands(th)
    if name != "token margins" or x <= edges[0] or x > edges[-1]:
        return x
    return next(top for top in edges if x <= top)


# Which per-token values each evidence statistic reads: "margins" or "errors" (update_evidence's lists).
EVIDENCE_STREAMS = {"token margins": "margins", "logprob errors": "errors", "disagreements": "margins"}


def evidence_params(th: Thresholds) -> dict[str, tuple[float, float, float]]:
    """(cap, drift, limit) of each evidence statistic, by name, in the order their crossings are named. A
    logprob error past max_gen_logprob_error fails its round and adds that much; a disagreement adds 1."""
    return {"token margins": (th.evidence_cap, th.evidence_drift, th.evidence_limit),
            "logprob errors": (th.max_gen_logprob_error, th.lp_evidence_drift, th.lp_evidence_limit),
            "disagreements": (1.0, th.disagreement_drift, th.disagreement_limit)}


def _check_evidence_params(th: Thresholds) -> None:
    params = evidence_params(th)
    for name, (cap, drift, limit) in params.items():
        if drift <= 0 or limit <= 0:
            raise ValueError(f"{name}: drift and limit must be > 0, got {drift}, {limit}")
        if not cap < limit:  # one token alone must never flag a miner for good
            raise ValueError(f"{name}: the most one token adds ({cap}) must be below the limit {limit}")
        if not drift < cap:  # a statistic that no token can raise watches nothing
            raise ValueError(f"{name}: the drift {drift} must be below the most one token adds ({cap})")
    if th.evidence_cap < th.max_token_margin:
        raise ValueError(f"the evidence cap {th.evidence_cap} must be >= max_token_margin {th.max_token_margin}")
    edges = margin_bands(th)
    if not (edges[0] > 0 and all(a < b for a, b in zip(edges, edges[1:]))):
        raise ValueError(f"evidence_bands {th.evidence_bands} must rise from above 0 to below max_token_margin "
                         f"{th.max_token_margin}")


def update_evidence(ev: Evidence, margins: list[float], errors: list[float], th: Thresholds) -> Evidence:
    """A new Evidence after more tokens' margins and logprob errors (in the order checked, one of each
    per token). A non-finite or negative value (which no check produces) flags the miner: a value that
    cannot be read is no honest noise."""
    _check_evidence_params(th)
    if len(margins) != len(errors):
        raise ValueError(f"{len(margins)} margins for {len(errors)} logprob errors")
    params = evidence_params(th)
    m_limit, e_limit = params["token margins"][2], params["logprob errors"][2]
    sums = {"token margins": ev.cusum, "logprob errors": ev.lp_cusum, "disagreements": ev.dis_cusum}
    by = ev.flagged_by
    total, err_total, disagree = ev.margin_sum, ev.error_sum, ev.disagreements
    for m, e in zip(margins, errors):
        if not (math.isfinite(m) and m >= 0 and math.isfinite(e) and e >= 0):
            by, m, e = by or "unreadable values", m_limit, e_limit
        values = {"margins": m, "errors": e}
        for name, (cap, drift, limit) in params.items():
            sums[name] = cusum_step(sums[name], counted(name, values[EVIDENCE_STREAMS[name]], th), cap, drift)
            if not by and sums[name] >= limit:
                by = name
        total, err_total, disagree = total + m, err_total + e, disagree + (m > 0)
    flagged = ev.flagged or bool(by)
    return Evidence(sums["token margins"], ev.tokens + len(margins), disagree, total, flagged, sums["logprob errors"],
                    err_total, by or ("token margins" if flagged else ""), sums["disagreements"])


def quality_loss(
    topk_ids: Tensor, topk_logprobs: Tensor, rest_mass: Tensor, targets: Tensor, vocab_size: int
) -> float:
    """Mean negative log-likelihood, in nats, that the miner's reported distribution gives targets.

    A target outside the miner's top-k gets an equal share of the rest mass,
    rest_mass / (vocab_size - k): the most the report says about it. Every probability is
    floored at PROB_FLOOR.
    """
    if topk_ids.dim() != 2 or not _is_int(topk_ids):
        raise ValueError(f"topk_ids must be a 2-D integer tensor, got {tuple(topk_ids.shape)}")
    P, k = topk_ids.shape
    if tuple(topk_logprobs.shape) != (P, k) or tuple(rest_mass.shape) != (P,):
        raise ValueError("topk_logprobs must be [P, k] and rest_mass [P] like topk_ids")
    if not _is_int(targets) or tuple(targets.shape) != (P,) or P == 0:
        raise ValueError(f"targets must be integer [{P}] with P >= 1, got {tuple(targets.shape)}")
    if bool(((targets < 0) | (targets >= vocab_size)).any()) or k > vocab_size:
        raise ValueError(f"targets and top-k must fit a vocabulary of {vocab_size}")
    if not bool(torch.isfinite(topk_logprobs).all()) or not bool(torch.isfinite(rest_mass).all()):
        raise ValueError("non-finite logprob or rest mass")

    hit = topk_ids.long() == targets.long().unsqueeze(1)
    p_hit = topk_logprobs.double().exp().gather(1, hit.int().argmax(1, keepdim=True)).squeeze(1)
    share = rest_mass.double() / (vocab_size - k) if vocab_size > k else torch.zeros(P).double()
    p = torch.where(hit.any(1), p_hit, share).clamp(min=PROB_FLOOR)
    return float(-p.log().mean())


def reward(verified: bool, loss: float, latency_s: float, timeout_s: float, ref_loss: float) -> float:
    """The reward of one answer, in [0, 1]: verified (a hard gate) x quality x speed.

    quality = exp(-max(loss - ref_loss, 0)): 1 for a loss no worse than the reference model's on
    the same text, 1/e for one nat per token worse. speed = 1 - 0.5 * latency / timeout: from 1
    for an instant answer to 0.5 at the deadline, so correctness weighs at least as much as speed
    and a miner cannot win by answering fast and wrong. Late or non-finite answers earn 0.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if not verified or not all(math.isfinite(x) for x in (loss, latency_s, ref_loss)):
        return 0.0
    if latency_s > timeout_s:
        return 0.0
    quality = math.exp(-max(loss - ref_loss, 0.0))
    speed = 1.0 - 0.5 * max(latency_s, 0.0) / timeout_s
    return quality * speed


def _check_uids(scores: Tensor, uids: Tensor) -> Tensor:
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 1-D float tensor, got {tuple(scores.shape)}")
    if uids.dim() != 1 or not _is_int(uids):
        raise ValueError(f"uids must be a 1-D integer tensor, got {tuple(uids.shape)}")
    if bool(((uids < 0) | (uids >= scores.shape[0])).any()):
        raise ValueError(f"uid outside [0, {scores.shape[0]})")
    if _has_duplicates(uids):
        raise ValueError("duplicate uid")
    return uids.long()


def ema_update(scores: Tensor, uids: Tensor, rewards: Tensor, alpha: float) -> Tensor:
    """A new score vector: score <- alpha * reward + (1 - alpha) * score for the queried uids only.

    Non-finite rewards, and non-finite old scores, count as 0: one bad value must not poison a
    uid's average forever.
    """
    idx = _check_uids(scores, uids)
    if tuple(rewards.shape) != tuple(uids.shape):
        raise ValueError(f"{tuple(rewards.shape)} rewards for {tuple(uids.shape)} uids")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    out = scores.clone()
    r = torch.nan_to_num(rewards.to(scores.dtype), nan=0.0, posinf=0.0, neginf=0.0)
    old = torch.nan_to_num(out[idx], nan=0.0, posinf=0.0, neginf=0.0)
    out[idx] = alpha * r + (1 - alpha) * old
    return out


def reset_uids(scores: Tensor, uids: Tensor) -> Tensor:
    """A new score vector with these uids at 0: their hotkey changed, so their history is another's."""
    idx = _check_uids(scores, uids)
    out = scores.clone()
    out[idx] = 0
    return out


def weights_from_scores(scores: Tensor, max_weight: float) -> Tensor:
    """Float32 weights summing to 1 (or all 0), each at most max_weight where that is possible.

    Non-finite and negative scores count as 0. Weights are proportional to scores; any above the
    cap is set to it and the excess shared among the rest in proportion to their scores, repeated
    until none exceeds it. With n positive scores and max_weight * n <= 1, the cap cannot hold
    while summing to 1: the n get 1/n each, the smallest possible largest weight, and zero-score
    uids still get nothing, as they earned nothing.
    """
    if not 0 < max_weight <= 1:
        raise ValueError(f"max_weight must be in (0, 1], got {max_weight}")
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got {tuple(scores.shape)}")
    s = torch.nan_to_num(scores.double(), nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0)
    positive = s > 0
    n = int(positive.sum())
    if n == 0:
        return torch.zeros(s.shape, dtype=torch.float32)
    if max_weight * n <= 1:
        return (positive.double() / n).float()
    capped = torch.zeros_like(positive)
    w = s / s.sum()
    # Terminates: the uncapped share 1 - cap * |capped| < cap * |uncapped positive|, so each
    # round leaves at least one positive uid under the cap, and each round caps at least one.
    while bool((over := (w > max_weight * (1 + 1e-12)) & ~capped).any()):
        capped |= over
        free = s * ~capped
        w = torch.where(capped, max_weight, free * (1 - max_weight * int(capped.sum())) / free.sum())
    return w.float()
