"""Small exact tests of the scoring functions."""

import dataclasses
import math
import random

import pytest
import torch

from neuron.engine.sampler import bits_int
from neuron.scoring import (
    PAST_STRICT_MARGIN,
    PROB_FLOOR,
    Evidence,
    GenSpec,
    Thresholds,
    counted,
    ema_update,
    nucleus_bounds,
    quality_loss,
    reset_uids,
    reward,
    token_margins,
    update_evidence,
    verify_forward,
    verify_generation,
    weights_from_scores,
)

TH = Thresholds()
PROBS = [0.5, 0.3, 0.15, 0.05]


def ref_from(rows):
    return torch.tensor(rows, dtype=torch.float64).log().float()


def honest(ref, k):
    lp, ids = ref.topk(k, dim=-1)
    return ids, lp, 1 - lp.double().exp().sum(-1).float()


def answer(ids, probs, rest):
    return (
        torch.tensor(ids),
        torch.tensor(probs, dtype=torch.float64).log().float(),
        torch.tensor(rest, dtype=torch.float32),
    )


# verify_forward


def test_forward_honest_passes_with_exact_metrics():
    ref = torch.log_softmax(torch.randn(5, 50, generator=torch.Generator().manual_seed(0)), -1)
    v = verify_forward(ref, *honest(ref, 8), TH)
    assert v.ok and v.reason == ""
    assert v.metrics["topk_overlap"] == 1.0
    assert v.metrics["ref_argmax_rank"] == 0.0
    assert v.metrics["prob_distance"] == pytest.approx(0, abs=1e-6)
    assert v.metrics["logprob_error"] == 0.0
    assert v.metrics["rest_mass_error"] == pytest.approx(0, abs=1e-6)


def test_forward_distance_counts_only_what_the_report_forces():
    # Miner left out id 1 (p=0.3); it may hold at most the miner's k-th probability (0.15).
    ref = ref_from([PROBS])
    v = verify_forward(ref, *answer([[0, 2]], [[0.5, 0.15]], [0.35]), TH)
    assert v.metrics["topk_overlap"] == 0.5
    assert v.metrics["ref_argmax_rank"] == 0.0
    assert v.metrics["prob_distance"] == pytest.approx(0.15, abs=1e-6)
    assert not v.ok and v.reason == "top-k overlap 0.50 < 0.75 at position 0"


@pytest.mark.parametrize(
    "ref_probs, ids, probs, rest, distance",
    [
        # Honest with k=1: the rest block holds exactly the reference's remaining mass.
        ([0.4, 0.35, 0.2, 0.05], [[0]], [[0.4]], [0.6], 0.0),
        # Left-out id 1 (0.35) is capped by the miner's k-th probability, 0.05.
        ([0.4, 0.35, 0.2, 0.05], [[0, 3]], [[0.9, 0.05]], [0.05], 0.5),
        # Left-out ids 0 and 1 could hold 0.45 each, but the stated rest mass is only 0.05.
        ([0.35, 0.3, 0.25, 0.1], [[3, 2]], [[0.5, 0.45]], [0.05], 0.6),
    ],
)
def test_forward_distance_is_least_consistent_total_variation(ref_probs, ids, probs, rest, distance):
    v = verify_forward(ref_from([ref_probs]), *answer(ids, probs, rest), Thresholds(min_topk_overlap=0))
    assert v.metrics["prob_distance"] == pytest.approx(distance, abs=1e-6)


def test_forward_wrong_probabilities_measured_exactly():
    ref = ref_from([PROBS, PROBS])
    ids, lp, rest = answer([[0, 1], [0, 1]], [[0.5, 0.3], [0.6, 0.3]], [0.2, 0.1])
    v = verify_forward(ref, ids, lp, rest, TH)
    assert v.metrics["prob_distance"] == pytest.approx(0.1, abs=1e-6)
    assert v.metrics["logprob_error"] == pytest.approx(math.log(0.6 / 0.5), abs=1e-6)
    assert v.metrics["rest_mass_error"] == pytest.approx(0.1, abs=1e-6)
    assert v.reason == "probability distance 0.1000 > 0.0500 at position 1"
    loose = Thresholds(max_prob_distance=1, max_logprob_error=1)
    v = verify_forward(ref, ids, lp, rest, loose)
    assert v.reason == "rest mass error 0.1000 > 0.0200 at position 1"


def test_forward_median_logprob_error_ignores_one_outlier_position():
    ref = ref_from([PROBS, PROBS, PROBS])
    loose = Thresholds(max_prob_distance=1, max_rest_mass_error=1)
    outlier = 0.5 * math.exp(0.3)
    v = verify_forward(ref, *answer([[0, 1]] * 3, [[0.5, 0.3], [0.5, 0.3], [outlier, 0.3]],
                                    [0.2, 0.2, 0.7 - outlier]), loose)
    assert v.ok
    assert v.metrics["logprob_error"] == pytest.approx(0.3, abs=1e-6)
    assert v.metrics["median_logprob_error"] == pytest.approx(0, abs=1e-6)
    v = verify_forward(ref, *answer([[0, 1]] * 3, [[0.5, 0.3], [0.6, 0.3], [0.6, 0.3]], [0.2, 0.1, 0.1]), loose)
    assert v.metrics["median_logprob_error"] == pytest.approx(math.log(1.2), abs=1e-6)
    assert v.reason == "median logprob error 0.1823 > 0.1000 over 3 positions"


def test_forward_limits_widen_only_where_the_context_is_short():
    """float16's outliers sit at the second and third positions (docs/calibration.md): a 0.6-nat error is honest
    noise there, judged at early_scale x the limit, and a rejection anywhere else or past the widened limit."""
    ref = ref_from([PROBS] * 5)
    loose = Thresholds(max_prob_distance=1, max_rest_mass_error=1)

    def with_error_at(row, nats):
        probs, rest = [[0.5, 0.3]] * 5, [0.2] * 5
        probs[row], rest[row] = [0.5, 0.3 * math.exp(-nats)], 0.5 - 0.3 * math.exp(-nats)
        return answer([[0, 1]] * 5, probs, rest)

    early = torch.tensor([1, 2, 3, 4, 5])  # rows 0 and 1 have 2 and 3 tokens of context
    assert verify_forward(ref, *with_error_at(1, 0.6), loose, positions=early).ok
    assert verify_forward(ref, *with_error_at(1, 0.6), loose).reason == "logprob error 0.6000 > 0.4000 at position 1"
    assert verify_forward(ref, *with_error_at(2, 0.6), loose, positions=early).reason == \
        "logprob error 0.6000 > 0.4000 at position 2"
    assert verify_forward(ref, *with_error_at(0, 1.3), loose, positions=early).reason == \
        "logprob error 1.3000 > 1.2000 at position 0"
    rest_off = answer([[0, 1]] * 5, [[0.5, 0.25]] + [[0.5, 0.3]] * 4, [0.25, 0.2, 0.2, 0.2, 0.2])  # 0.05 off
    assert verify_forward(ref, *rest_off, Thresholds(max_prob_distance=1), positions=early).ok
    assert not verify_forward(ref, *rest_off, Thresholds(max_prob_distance=1), positions=early + 10).ok


def test_forward_random_ids_fail_overlap():
    ref = ref_from([PROBS])
    v = verify_forward(ref, *answer([[3, 2]], [[0.5, 0.3]], [0.2]), TH)
    assert v.reason == "top-k overlap 0.00 < 0.75 at position 0"
    assert v.metrics["ref_argmax_rank"] == 2.0


def test_forward_argmax_rank():
    ref = ref_from([PROBS])
    ids, lp, rest = answer([[1, 2, 0]], [[0.3, 0.15, 0.05]], [0.5])
    th = Thresholds(min_topk_overlap=0.0, max_ref_argmax_rank=1)
    assert verify_forward(ref, ids, lp, rest, th).reason == "reference argmax rank 2 > 1 at position 0"


@pytest.mark.parametrize(
    "ids, probs, rest, reason",
    [
        ([[0, 4]], [[0.5, 0.3]], [0.2], "token id outside [0, 4)"),
        ([[-1, 0]], [[0.5, 0.3]], [0.2], "token id outside [0, 4)"),
        ([[0, 0]], [[0.5, 0.3]], [0.2], "duplicate token id in a row"),
        ([[0, 1]], [[0.3, 0.5]], [0.2], "top-k logprobs not sorted in descending order"),
        ([[0, 1]], [[0.5, 0.3]], [1.5], "rest mass outside [0, 1]"),
        ([[0, 1]], [[0.5, 0.3]], [-0.1], "rest mass outside [0, 1]"),
        ([[0, 1]], [[0.5, 0.3]], [0.5], "top-k mass + rest mass = 1.3000, not 1, at position 0"),
        ([[0, 1]], [[1.5, 0.3]], [0.0], "positive logprob 0.4055"),
    ],
)
def test_forward_malformed(ids, probs, rest, reason):
    v = verify_forward(ref_from([PROBS]), *answer(ids, probs, rest), TH)
    assert (v.ok, v.reason, v.metrics) == (False, reason, {})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_forward_non_finite(bad):
    ids, lp, rest = answer([[0, 1]], [[0.5, 0.3]], [0.2])
    lp[0, 1] = bad
    assert verify_forward(ref_from([PROBS]), ids, lp, rest, TH).reason == "non-finite logprob or rest mass"
    ids, lp, rest = answer([[0, 1]], [[0.5, 0.3]], [0.2])
    rest[0] = bad
    assert verify_forward(ref_from([PROBS]), ids, lp, rest, TH).reason == "non-finite logprob or rest mass"


def test_forward_shapes_and_dtypes():
    ref = ref_from([PROBS, PROBS])
    ids, lp, rest = answer([[0, 1]], [[0.5, 0.3]], [0.2])
    assert verify_forward(ref, ids, lp, rest, TH).reason.startswith("topk_ids must be integer [2, k]")
    ref = ref_from([PROBS])
    assert verify_forward(ref, ids.float(), lp, rest, TH).reason.startswith("topk_ids must be integer")
    v = verify_forward(ref, ids, lp[:, :1], rest, TH)
    assert v.reason.startswith("topk_logprobs must be float [1, 2]")
    assert verify_forward(ref, ids, lp, rest[None], TH).reason.startswith("rest_mass must be float [1]")
    too_many = torch.zeros(1, 5, dtype=torch.long)
    assert verify_forward(ref, too_many, lp, rest, TH).reason.startswith("topk_ids")
    with pytest.raises(ValueError):
        verify_forward(ref[0], ids, lp, rest, TH)


# verify_generation (seeded, docs/sampling.md)

GEN_REF = ref_from([[0.7, 0.2, 0.09, 0.01], [0.1, 0.6, 0.25, 0.05], [0.2, 0.3, 0.1, 0.4]])
EOS = 3
GREEDY = GenSpec(max_new_tokens=3)


def g(seed, step, v):
    """The spec's Gumbel noise, from the plain-Python hash (independent of the batched code)."""
    u = (bits_int(seed, step, v) + 0.5) / 2**32
    return -math.log(-math.log(u))


def gen(tokens, reported=None, spec=GREEDY, **kw):
    args = dict(spec=spec, finish_reason="length", eos_token_id=EOS, th=TH)
    args.update(kw)
    t = torch.tensor(tokens)
    ref_lp = GEN_REF[: len(tokens)]
    if reported is None:
        rep = ref_lp.gather(1, t[:, None]).squeeze(1)
    else:
        rep = torch.tensor(reported)
    # Logits with an arbitrary per-row offset: only differences matter.
    return verify_generation(ref_lp + 5.0, t, rep, **args)


def test_generation_honest_greedy():
    v = gen([0, 1, 3], finish_reason="stop")
    assert v.ok and v.metrics["token_margin"] == 0.0 and v.metrics["gen_logprob_error"] == pytest.approx(0, abs=1e-6)
    assert v.metrics["n_tokens"] == 3.0 and v.metrics["margins"] == [0.0, 0.0, 0.0]


def test_generation_greedy_margin_is_the_logit_gap():
    v = gen([0, 2, 3], finish_reason="stop", th=Thresholds(max_token_margin=1.0))
    assert v.ok and v.metrics["margins"][1] == pytest.approx(math.log(0.6 / 0.25), abs=1e-6)
    v = gen([0, 2, 3], finish_reason="stop", th=Thresholds(max_token_margin=0.5))
    assert v.reason == "token margin 0.8755 > 0.5000 at step 1"


def sampled_choice(logits, temp, seed, step, allowed):
    scores = {v: logits[v] / temp + g(seed, step, v) for v in allowed}
    return max(scores, key=scores.get), scores


def test_generation_sampled_margin_uses_the_seeded_noise():
    seed, temp = 12345, 0.7
    spec = GenSpec(max_new_tokens=3, temperature=temp, seed=seed)
    logits = GEN_REF.double()
    chosen, worst, margins = [], [], []
    for t in range(3):
        c, scores = sampled_choice(logits[t].tolist(), temp, seed, t, range(4))
        chosen.append(c)
        w = min((v for v in scores if v != EOS), key=scores.get)
        worst.append(w)
        margins.append(temp * (scores[c] - scores[w]))
    chosen[-1] = chosen[-1] if chosen[-1] != EOS else 0  # keep it a "length" generation
    worst[-1] = worst[-1] if worst[-1] != EOS else 0
    v = gen(chosen, spec=spec, th=Thresholds(max_token_margin=100.0))
    assert v.ok and v.metrics["margins"][:2] == [0.0, 0.0]
    v = gen(worst[:2] + [chosen[2]], spec=spec, th=Thresholds(max_token_margin=100.0))
    assert v.metrics["margins"][:2] == pytest.approx(margins[:2], abs=1e-6)


def test_generation_top_k_boundary_tolerance():
    # Row 0: logits log(0.7), log(0.2), log(0.09), log(0.01); top_k 2 keeps ids 0 and 1.
    spec = GenSpec(max_new_tokens=1, temperature=1.0, top_k=2, seed=7)
    far = Thresholds(boundary_tol=0.1, max_token_margin=100.0)
    assert gen([2], spec=spec, th=far).reason == "token outside the top-k/top-p allowed set at step 0"
    # log(0.2 / 0.09) = 0.80: within a tolerance of 0.9, id 2 may be in an honest miner's top 2.
    near = Thresholds(boundary_tol=0.9, max_token_margin=100.0)
    v = gen([2], spec=spec, th=near)
    assert v.ok
    # With that tolerance id 1 is no longer surely allowed: the margin counts against id 0 only.
    expected = max(0.0, math.log(0.7) + g(7, 0, 0) - (math.log(0.09) + g(7, 0, 2)))
    assert v.metrics["margins"][0] == pytest.approx(expected, abs=1e-6)


def test_generation_top_p_boundary_tolerance():
    # Row 0 at top_p 0.65: only id 0 (mass before id 1 is 0.7).
    spec = GenSpec(max_new_tokens=1, temperature=1.0, top_p=0.65, seed=3)
    tight = Thresholds(boundary_tol=0.0, max_token_margin=100.0)
    assert gen([1], spec=spec, th=tight).reason.startswith("token outside")
    assert gen([0], spec=spec, th=tight).ok
    # On the odds: odds(0.7) / odds(0.65) = 1.256 = exp(2 * 0.114). At 0.12 id 1 may be in, id 2 (odds 9) may
    # not; at 0.11 id 1 may not either (on the mass, 0.65 * exp(0.22) = 0.81 would let it in).
    loose, less = (Thresholds(boundary_tol=tol, max_token_margin=100.0) for tol in (0.12, 0.11))
    assert gen([1], spec=spec, th=loose).ok
    v = gen([2], spec=spec, th=loose)
    assert v.reason.startswith("token outside")
    # A token outside counts at least at the evidence cap, whatever its own margin: the sampler's own choice
    # over every id (seed 10 picks id 2) has margin 0 against the allowed ids.
    assert v.metrics["margins"][0] > loose.evidence_cap
    wide = GenSpec(max_new_tokens=1, temperature=1.0, seed=10)
    assert gen([2], spec=wide, th=loose).metrics["margins"] == [0.0]
    assert gen([2], spec=dataclasses.replace(wide, top_p=0.65), th=loose).metrics["margins"] == [loose.evidence_cap]
    assert gen([1], spec=spec, th=less).reason.startswith("token outside")


# Probabilities at T 0.7 (logits = 0.7 log q): the mass before each id is 0, 0.5, 0.8, 0.905, 0.965.
NUCLEUS = [0.5, 0.3, 0.105, 0.06, 0.035]
TOP_P = GenSpec(max_new_tokens=1, temperature=0.7, top_p=0.9, seed=11)


def nucleus_outside(q, token, tol=0.04, spec=TOP_P):
    logits = 0.7 * torch.tensor([q], dtype=torch.float64).log()
    return bool(token_margins(logits, torch.tensor([token]), spec, tol)[1][0])


def test_a_token_past_the_nucleus_is_outside_and_one_within_the_noise_is_not():
    # tol 0.04 / 0.7: the odds may move by exp(2 * 0.0571) = 1.121, to at most 9 * 1.121 = 10.09 (mass 0.910).
    # On the mass, 0.9 * 1.121 = 1.009 > 1 kept every id.
    assert [nucleus_outside(NUCLEUS, v) for v in range(5)] == [False, False, False, False, True]
    assert [nucleus_outside(NUCLEUS, v, tol=0.0) for v in range(5)] == [False, False, False, True, True]
    # Id 3 (odds 9.53) is possibly but not surely in: the reference choosing it is not held against a miner.
    logits = 0.7 * torch.tensor([NUCLEUS], dtype=torch.float64).log()
    scaled = logits / 0.7
    surely, possibly = nucleus_bounds(scaled, torch.ones_like(scaled, dtype=torch.bool), 0.9, 0.04 / 0.7)
    assert surely[0].tolist() == [True, True, True, False, False]
    assert possibly[0].tolist() == [True, True, True, True, False]


def test_a_token_past_the_strict_nucleus_within_the_noise_counts_as_a_disagreement_only():
    # Id 3 of NUCLEUS (0.905 before it) is past the reference's nucleus but within the noise: not outside, and
    # no margin the margin evidence feels, but not the reference sampler's choice either.
    logits = 0.7 * torch.tensor([NUCLEUS], dtype=torch.float64).log()
    # A seed under which id 3 is the sampler's choice among ids 0-3 (a sampler that ignores top-p picks it).
    seed = next(s for s in range(1000) if float(token_margins(logits, torch.tensor([3]), GenSpec(
        max_new_tokens=1, temperature=0.7, top_k=4, seed=s), 0.04)[0][0]) == 0.0)
    margins, outside = token_margins(logits, torch.tensor([3]), dataclasses.replace(TOP_P, seed=seed), 0.04)
    assert not bool(outside[0]) and float(margins[0]) == PAST_STRICT_MARGIN
    th = Thresholds()
    ev = update_evidence(Evidence(), [float(margins[0])] * 100, [0.0] * 100, th)
    assert ev.disagreements == 100 and ev.dis_cusum > 0 and ev.cusum == 0.0
    # An id inside the strict nucleus keeps its own margin (0 when it is the sampler's choice over A-).
    inside = [token_margins(logits, torch.tensor([v]), TOP_P, 0.04)[0][0] for v in range(3)]
    assert all(float(m) == 0.0 or float(m) > 1e-6 for m in inside)


def test_ids_within_the_noise_of_each_other_may_swap_places_in_the_nucleus():
    # Ids 3 and 4 are 0.021 apart (scaled): noise within 0.0571 may put id 4 first, with 0.905 before it.
    near_tie = [0.5, 0.3, 0.105, 0.048, 0.047]
    assert nucleus_outside(near_tie, 4) is False
    assert nucleus_outside(near_tie, 4, tol=0.0) is True
    # A larger gap (0.54 scaled, far beyond the noise) keeps its place: id 4 of NUCLEUS stays outside.
    assert nucleus_outside(NUCLEUS, 4) is True


def test_the_first_id_is_always_in_the_nucleus_and_top_p_1_keeps_every_id():
    tiny_p = GenSpec(max_new_tokens=1, temperature=0.7, top_p=0.01, seed=11)
    assert [nucleus_outside(NUCLEUS, v, spec=tiny_p) for v in range(5)] == [False, True, True, True, True]
    off = GenSpec(max_new_tokens=1, temperature=0.7, top_p=1.0, seed=11)
    assert [nucleus_outside(NUCLEUS, v, spec=off) for v in range(5)] == [False] * 5


def test_generation_eos_follows_the_sampler():
    # Step 1 of GEN_REF: greedy picks id 1; stopping there with EOS (logit gap log(0.6/0.05)) fails.
    v = gen([0, 3], finish_reason="stop")
    assert v.reason == "EOS token margin 2.4849 > 0.1000 at step 1"
    # Step 2: the greedy choice is EOS itself; going on with id 1 costs log(0.4 / 0.3).
    v = gen([0, 1, 1], th=Thresholds(max_token_margin=0.2))
    assert v.reason == "token margin 0.2877 > 0.2000 at step 2"
    assert gen([0, 1, 3], finish_reason="stop").ok


def test_generation_logprob_error():
    v = gen([0, 1, 2], reported=[math.log(0.7), math.log(0.6), math.log(0.2)], th=Thresholds(max_token_margin=10))
    assert v.metrics["gen_logprob_error"] == pytest.approx(math.log(2), abs=1e-6)
    assert v.reason == "logprob error 0.6931 > 0.1000 at step 2"


@pytest.mark.parametrize(
    "tokens, kw, reason",
    [
        ([], {}, "empty generation"),
        ([0, 1], {}, "finish 'length' after 2 of 3 tokens"),
        ([0, 1, 3], {"spec": GenSpec(max_new_tokens=2)}, "3 tokens > max_new_tokens 2"),
        ([0, 1], {"finish_reason": "stop"}, "finish 'stop' without a final EOS token"),
        ([0, 1, 3], {"finish_reason": "stop", "eos_token_id": None},
         "finish 'stop' without a final EOS token"),
        ([0, 1, 3], {}, "final EOS token but finish 'length'"),
        ([3, 1, 3], {"finish_reason": "stop"}, "EOS at step 0 but generation went on"),
        ([0, 1], {"finish_reason": "eos"}, "unknown finish reason 'eos'"),
        ([0, 4], {"finish_reason": "stop_sequence"}, "token id outside [0, 4)"),
    ],
)
def test_generation_malformed(tokens, kw, reason):
    t = torch.tensor(tokens, dtype=torch.long)
    ref = GEN_REF[: max(len(tokens), 1)] if tokens else GEN_REF[:0]
    args = dict(spec=GenSpec(max_new_tokens=3, temperature=0.7, seed=1), finish_reason="length",
                eos_token_id=EOS, th=TH) | kw
    v = verify_generation(ref, t, torch.full((len(tokens),), -1.0), **args)
    assert (v.ok, v.reason) == (False, reason)


def test_generation_stop_sequence_and_bad_values():
    assert gen([0, 1], finish_reason="stop_sequence").ok
    assert gen([0, 1], reported=[float("nan"), -1.0]).reason == "non-finite reported logprob"
    assert gen([0, 1], reported=[0.5, -1.0]).reason == "positive logprob 0.5000"
    assert gen([0, 1], reported=[-1.0]).reason.startswith("reported logprobs must be float [2]")
    t = torch.tensor([0.0, 1.0])
    v = verify_generation(GEN_REF[:2], t, t, spec=GenSpec(max_new_tokens=2), finish_reason="length",
                          eos_token_id=3, th=TH)
    assert v.reason.startswith("tokens must be a 1-D integer tensor")


def test_generation_reference_mismatch_is_a_bug():
    with pytest.raises(ValueError):
        verify_generation(GEN_REF, torch.tensor([0, 1]), torch.zeros(2), spec=GREEDY,
                          finish_reason="length", eos_token_id=3, th=TH)


# update_evidence


def test_evidence_cusum_exact():
    th = Thresholds(evidence_drift=0.1, evidence_limit=1.0, evidence_cap=0.6)
    ev = update_evidence(Evidence(), [0.0, 0.5, 0.0, 0.3], [0.0] * 4, th)
    # 0 -> 0 -> 0.4 -> 0.3 -> 0.5
    assert ev.cusum == pytest.approx(0.5) and ev.tokens == 4 and ev.disagreements == 2
    assert ev.margin_sum == pytest.approx(0.8) and not ev.flagged and ev.flagged_by == ""
    ev = update_evidence(ev, [0.75], [0.0], th)  # adds the cap, 0.6, less the drift
    assert ev.cusum == pytest.approx(1.0) and ev.flagged and ev.margin_sum == pytest.approx(1.55)
    assert ev.flagged_by == "token margins"
    # Once flagged, it stays flagged even as the sum drains.
    assert update_evidence(ev, [0.0] * 50, [0.0] * 50, th).flagged


def test_logprob_error_evidence_exact():
    th = Thresholds(lp_evidence_drift=0.02, lp_evidence_limit=0.15)  # cap: max_gen_logprob_error, 0.1
    ev = update_evidence(Evidence(), [0.0] * 4, [0.05, 0.0, 0.5, 0.01], th)
    # 0 -> 0.03 -> 0.01 -> 0.09 (0.5 capped at 0.1) -> 0.08
    assert ev.lp_cusum == pytest.approx(0.08) and ev.error_sum == pytest.approx(0.56) and not ev.flagged
    assert ev.cusum == 0.0 and ev.disagreements == 0
    ev = update_evidence(ev, [0.0, 0.0], [0.06, 0.04], th)  # 0.08 -> 0.12 -> 0.14
    assert not ev.flagged
    ev = update_evidence(ev, [0.0], [0.03], th)  # 0.15: the limit
    assert ev.flagged and ev.flagged_by == "logprob errors"
    # Honest-sized errors (float16: 0.0035 on average) drain it; a steady 0.03 (int8-like) climbs.
    assert update_evidence(Evidence(), [0.0] * 1000, [0.0035] * 1000, th).lp_cusum == 0.0
    assert update_evidence(Evidence(), [0.0] * 15, [0.03] * 15, th).flagged
    with pytest.raises(ValueError):
        update_evidence(Evidence(), [0.0], [], th)  # one error per margin


def test_evidence_needs_two_far_off_tokens_within_the_window():
    th = Thresholds(evidence_drift=0.001, evidence_limit=0.51, evidence_cap=0.41)  # two within 310 tokens
    z = [0.0] * 400
    assert not update_evidence(Evidence(), [50.0], [0.0], th).flagged
    assert update_evidence(Evidence(), [50.0] + z[:300] + [50.0], z[:302], th).flagged
    assert not update_evidence(Evidence(), [50.0] + z[:320] + [50.0], z[:322], th).flagged
    # One far-off logprob (a failed round) never flags alone either.
    assert not update_evidence(Evidence(), [0.0], [50.0], Thresholds()).flagged
    with pytest.raises(ValueError):
        update_evidence(Evidence(), [0.0], [0.0], Thresholds(evidence_cap=Thresholds().evidence_limit))
    with pytest.raises(ValueError):
        update_evidence(Evidence(), [0.0], [0.0], Thresholds(lp_evidence_limit=Thresholds().max_gen_logprob_error))


def test_a_margin_above_the_first_band_counts_at_its_bands_top():
    th = Thresholds()  # bands (0, 0.025], (0.025, 0.05], (0.05, 0.1]; past 0.1 a failed token, capped later
    margins = (0.0, 0.01, 0.025, 0.03, 0.05, 0.07, 0.1, 0.3, 5.0)
    assert [counted("token margins", m, th) for m in margins] == [0.0, 0.01, 0.025, 0.05, 0.05, 0.1, 0.1, 0.3, 5.0]
    assert counted("logprob errors", 0.03, th) == 0.03
    # Each 0.03 adds 0.05 - 0.001: ten stay below the limit 0.51, the eleventh crosses it.
    ev = update_evidence(Evidence(), [0.03] * 10, [0.0] * 10, th)
    assert ev.cusum == pytest.approx(0.49) and not ev.flagged and ev.margin_sum == pytest.approx(0.3)
    assert update_evidence(ev, [0.03], [0.0], th).flagged
    assert update_evidence(Evidence(), [0.02] * 400, [0.0] * 400, th).cusum == pytest.approx(400 * 0.019)
    for bands in ((0.05, 0.025), (0.0, 0.05), (0.025, 0.1)):
        with pytest.raises(ValueError):
            update_evidence(Evidence(), [0.0], [0.0], Thresholds(evidence_bands=bands))


def test_evidence_treats_unreadable_values_as_flagged():
    th = Thresholds(evidence_drift=0.1, evidence_limit=1.0)
    for margins, errors in (([float("nan")], [0.0]), ([-1.0], [0.0]), ([0.0], [float("inf")]), ([0.0], [-0.1])):
        ev = update_evidence(Evidence(), margins, errors, th)
        assert ev.flagged and ev.flagged_by == "unreadable values"
    with pytest.raises(ValueError):
        update_evidence(Evidence(), [0.0], [0.0], Thresholds(evidence_drift=0.0))
    with pytest.raises(ValueError):
        update_evidence(Evidence(), [0.0], [0.0], Thresholds(lp_evidence_drift=0.0))


def test_evidence_from_an_older_state_file_keeps_its_flag():
    # A state saved before the logprob statistic existed: its fields take their defaults.
    ev = update_evidence(Evidence(cusum=0.2, tokens=9, flagged=True), [0.0], [0.0], Thresholds())
    assert ev.flagged and ev.flagged_by == "token margins" and ev.lp_cusum == 0.0


def test_disagreement_evidence_exact():
    # Margins this small never move the margin CUSUM (0.001 less the drift 0.001), so only the count speaks.
    th = Thresholds(disagreement_drift=0.25, disagreement_limit=2.0)
    ev = update_evidence(Evidence(), [0.0, 0.001, 0.001, 0.0, 0.0], [0.0] * 5, th)
    # 0 -> 0.75 -> 1.5 -> 1.25 -> 1.0
    assert ev.dis_cusum == pytest.approx(1.0) and ev.disagreements == 2 and ev.cusum == 0.0 and not ev.flagged
    assert [counted("disagreements", m, th) for m in (0.0, 1e-9, 0.05, 5.0)] == [0.0, 1.0, 1.0, 1.0]
    ev = update_evidence(ev, [0.001, 0.0], [0.0, 0.0], th)  # 1.75 -> 1.5: under the limit
    assert not ev.flagged and ev.dis_cusum == pytest.approx(1.5)
    ev = update_evidence(ev, [0.001], [0.0], th)  # 2.25: crossed
    assert ev.flagged and ev.flagged_by == "disagreements" and ev.tokens == 8 and ev.disagreements == 4
    # One disagreement alone never flags; a drift no token can outrun watches nothing.
    with pytest.raises(ValueError):
        update_evidence(Evidence(), [0.0], [0.0], Thresholds(disagreement_limit=1.0))
    with pytest.raises(ValueError):
        update_evidence(Evidence(), [0.0], [0.0], Thresholds(disagreement_drift=1.0))


def test_honest_disagreement_rates_never_flag_a_miner_over_a_day():
    # Tokens that disagree at tiny float16's measured 0.0033 (the highest honest rate measured), with honest-sized
    # margins and logprob errors, through the validator's own update: a day of tokens (1e6), in rounds of 96.
    rng = random.Random(20)
    ev = Evidence()
    top = 0.0
    for _ in range(1_000_000 // 96):
        margins = [0.01 if rng.random() < 0.0033 else 0.0 for _ in range(96)]
        ev = update_evidence(ev, margins, [0.004] * 96, TH)
        top = max(top, ev.dis_cusum)
    assert not ev.flagged and ev.tokens == 96 * (1_000_000 // 96)
    assert 3000 < ev.disagreements < 3600 and top < TH.disagreement_limit / 2


def test_a_miner_disagreeing_at_five_times_the_honest_rate_is_flagged_within_the_stated_count():
    # docs/calibration.md: at 5 x SmolLM2's honest rate (0.0128) 99% of streams are flagged within 34,447 tokens
    # (median 11,250), by disagreements alone: its margins (0.01) are what honest float16 gives.
    for seed in range(3):
        rng = random.Random(seed)
        ev, n = Evidence(), 0
        while not ev.flagged:
            ev = update_evidence(ev, [0.01 if rng.random() < 0.0128 else 0.0 for _ in range(96)], [0.004] * 96, TH)
            n += 96
        assert ev.flagged_by == "disagreements" and n <= 34_447 + 96, seed


# quality_loss



def test_quality_loss_exact():
    ids, lp, rest = answer([[0, 1], [2, 3]], [[0.5, 0.3], [0.6, 0.4]], [0.2, 0.0])
    loss = quality_loss(ids, lp, rest, torch.tensor([1, 5]), vocab_size=10)
    assert loss == pytest.approx((-math.log(0.3) - math.log(PROB_FLOOR)) / 2, rel=1e-6)
    loss = quality_loss(ids, lp, rest, torch.tensor([7, 2]), vocab_size=10)
    assert loss == pytest.approx((-math.log(0.2 / 8) - math.log(0.6)) / 2, rel=1e-6)


def test_quality_loss_rejects_bad_input():
    ids, lp, rest = answer([[0, 1]], [[0.5, 0.3]], [0.2])
    for targets, vocab in [(torch.tensor([10]), 10), (torch.tensor([-1]), 10), (torch.tensor([1, 2]), 10),
                           (torch.tensor([1.0]), 10), (torch.tensor([1]), 1)]:
        with pytest.raises(ValueError):
            quality_loss(ids, lp, rest, targets, vocab)
    with pytest.raises(ValueError):
        quality_loss(ids, torch.tensor([[float("nan"), -1.0]]), rest, torch.tensor([1]), 10)
    with pytest.raises(ValueError):
        quality_loss(ids, lp[:, :1], rest, torch.tensor([1]), 10)


# reward


def test_reward_formula():
    assert reward(True, 2.0, 0.0, 10.0, ref_loss=2.5) == 1.0
    assert reward(True, 3.0, 5.0, 10.0, ref_loss=2.0) == pytest.approx(math.exp(-1) * 0.75)
    assert reward(True, 2.0, 10.0, 10.0, ref_loss=2.0) == 0.5
    assert reward(False, 2.0, 0.0, 10.0, ref_loss=2.0) == 0.0
    assert reward(True, 2.0, 10.5, 10.0, ref_loss=2.0) == 0.0
    assert reward(True, float("nan"), 1.0, 10.0, ref_loss=2.0) == 0.0
    assert reward(True, float("inf"), 1.0, 10.0, ref_loss=2.0) == 0.0
    with pytest.raises(ValueError):
        reward(True, 2.0, 1.0, 0.0, ref_loss=2.0)


# moving averages and weights


def test_ema_update_only_queried_uids():
    scores = torch.tensor([0.5, 0.5, 0.5, float("nan")])
    out = ema_update(scores, torch.tensor([0, 2, 3]), torch.tensor([1.0, float("nan"), 1.0]), alpha=0.1)
    assert torch.allclose(out, torch.tensor([0.55, 0.5, 0.45, 0.1]))
    assert scores[0] == 0.5  # the input is left alone


def test_ema_update_rejects_bad_input():
    scores = torch.zeros(3)
    for uids, rewards, alpha in [([3], [1.0], 0.1), ([-1], [1.0], 0.1), ([0, 0], [1.0, 1.0], 0.1),
                                 ([0, 1], [1.0], 0.1), ([0], [1.0], 0.0), ([0], [1.0], 1.5)]:
        with pytest.raises(ValueError):
            ema_update(scores, torch.tensor(uids), torch.tensor(rewards), alpha)
    with pytest.raises(ValueError):
        ema_update(scores, torch.tensor([0.0]), torch.tensor([1.0]), 0.1)


def test_reset_uids():
    scores = torch.tensor([0.3, 0.4, 0.5])
    assert reset_uids(scores, torch.tensor([1])).tolist() == pytest.approx([0.3, 0.0, 0.5])
    with pytest.raises(ValueError):
        reset_uids(scores, torch.tensor([3]))


def test_weights_proportional_without_cap():
    w = weights_from_scores(torch.tensor([3.0, 1.0, 0.0, float("nan"), -2.0]), max_weight=1.0)
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([0.75, 0.25, 0.0, 0.0, 0.0])


def test_weights_iterative_cap():
    w = weights_from_scores(torch.tensor([10.0, 4.0, 1.0, 1.0]), max_weight=0.35)
    assert w.tolist() == pytest.approx([0.35, 0.35, 0.15, 0.15])
    assert float(w.sum()) == pytest.approx(1.0)


def test_weights_cap_impossible_gives_uniform_over_earners():
    w = weights_from_scores(torch.tensor([5.0, 1.0, 0.0, float("nan")]), max_weight=0.4)
    assert w.tolist() == [0.5, 0.5, 0.0, 0.0]


def test_weights_all_zero_and_bad_cap():
    assert weights_from_scores(torch.tensor([0.0, float("nan")]), 0.5).tolist() == [0.0, 0.0]
    for cap in (0.0, 1.5):
        with pytest.raises(ValueError):
            weights_from_scores(torch.ones(3), cap)
    with pytest.raises(ValueError):
        weights_from_scores(torch.ones(2, 2), 0.5)
