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
    # Format slack: sum(exp(topk_logprobs)) + rest_mass must be 1 within this, and reported
    # logprobs at most this above 0 (rounding of a probability of ~1).
    format_tol: float = 1e-3
    # Greedy generation: each token's rank under the reference (0 = argmax). float16 flips
    # near-ties, rarely three-way ones (rank 2); bfloat16, with 5-10x its noise, never went past 2.
    max_token_rank_greedy: int = 3
    # Sampled generation without a top-k: no useful bound, because an honest sample at
    # temperature 1 lands past rank 20,000 of SmolLM2's 49,152 in ~1% of 16-token generations.
    max_token_rank_sampled: int = 1 << 30
    # Sampled with a top-k: ranks past k - 1 an honest token may have under the reference, because
    # near-ties at the k-th place make the miner's top k differ from the reference's (float16:
    # 6 past the 50th).
    sampled_rank_slack: int = 16
    # Worst |reported - reference| logprob of a generated token, in nats. Honest worst 0.04;
    # int8 weights give at least 0.075.
    max_gen_logprob_error: float = 0.08
    # A stop by EOS before max_new_tokens needs at least this reference P(eos) at that step, so
    # a miner cannot save work by stopping where the model would not. An honest miner stops
    # below it in fewer than 1e-6 of generations.
    min_eos_prob: float = 1e-3


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
    ref_logprobs: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, rest_mass: Tensor, th: Thresholds
) -> Verdict:
    """Check a miner's top-k next-token answer at P positions against the full reference.

    ref_logprobs [P, V] is the validator's log_softmax; topk_ids/topk_logprobs [P, k] and
    rest_mass [P] are the miner's. A malformed answer fails with no metrics; otherwise every
    metric is its worst value over positions, except median_logprob_error (the median over
    positions of each position's worst logprob error: the lower of the two middle values for an
    even P), and the first threshold broken is the reason.

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
    checks = [
        (overlap, -1, th.min_topk_overlap, "top-k overlap {:.2f} < {:.2f}"),
        (argmax_rank, 1, th.max_ref_argmax_rank, "reference argmax rank {:.0f} > {:.0f}"),
        (distance, 1, th.max_prob_distance, "probability distance {:.4f} > {:.4f}"),
        (logprob_error, 1, th.max_logprob_error, "logprob error {:.4f} > {:.4f}"),
        (rest_error, 1, th.max_rest_mass_error, "rest mass error {:.4f} > {:.4f}"),
    ]
    for values, sign, limit, text in checks:
        pos = int((sign * values).argmax())
        if sign * float(values[pos]) > sign * limit:
            return _fail(text.format(float(values[pos]), limit) + f" at position {pos}", metrics)
    if float(median_logprob_error) > th.max_median_logprob_error:
        text = f"median logprob error {float(median_logprob_error):.4f} > {th.max_median_logprob_error:.4f}"
        return _fail(f"{text} over {ids.shape[0]} positions", metrics)
    return Verdict(True, "", metrics)


def verify_generation(
    ref_logprobs: Tensor,
    tokens: Tensor,
    reported_logprobs: Tensor,
    *,
    greedy: bool,
    finish_reason: str,
    eos_token_id: int | None,
    max_new_tokens: int,
    th: Thresholds,
    top_k: int = 0,
) -> Verdict:
    """Check a miner's generated tokens against the reference teacher-forced over them.

    ref_logprobs[t] [T, V] is the reference log_softmax that predicts tokens[t]. The miner reports
    logprobs of the unmodified model distribution (raw log_softmax, before temperature, top-k,
    top-p or repetition penalty), so they compare with the reference whatever the sampling was.
    Ranks are also taken under the raw distribution, which is why greedy verification is only
    tight without a repetition penalty. top_k is the request's sampling top-k (0: none): a sampled
    token ranked past top_k - 1 + th.sampled_rank_slack cannot have been sampled honestly. A
    "stop_sequence" finish is checked against the requested stop strings by the caller, who holds
    the tokenizer.
    """
    _check_ref(ref_logprobs)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not _is_int(tokens) or tokens.dim() != 1:
        return _fail(f"tokens must be a 1-D integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    T = tokens.shape[0]
    if not reported_logprobs.is_floating_point() or tuple(reported_logprobs.shape) != (T,):
        return _fail(f"reported logprobs must be float [{T}], got {tuple(reported_logprobs.shape)}")
    if T == 0:
        return _fail("empty generation")
    if ref_logprobs.shape[0] != T:
        raise ValueError(f"ref_logprobs has {ref_logprobs.shape[0]} rows for {T} tokens")
    V = ref_logprobs.shape[1]
    if T > max_new_tokens:
        return _fail(f"{T} tokens > max_new_tokens {max_new_tokens}")
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
    if finish_reason == "length" and T != max_new_tokens:
        return _fail(f"finish 'length' after {T} of {max_new_tokens} tokens")
    if finish_reason == "stop" and not ends_with_eos:
        return _fail("finish 'stop' without a final EOS token")
    if finish_reason != "stop" and ends_with_eos:
        return _fail(f"final EOS token but finish {finish_reason!r}")

    ref = ref_logprobs.double()
    ref_at = ref.gather(1, ids.unsqueeze(1))
    # Strictly greater, so a token tied with the argmax counts as rank 0.
    ranks = (ref > ref_at).sum(-1).double()
    errors = (reported_logprobs.double() - ref_at.squeeze(1)).abs()
    metrics = {
        "n_tokens": float(T),
        "token_rank": float(ranks.max()),
        "gen_logprob_error": float(errors.max()),
    }
    if ends_with_eos:
        metrics["eos_prob"] = math.exp(float(ref[-1, eos_token_id]))

    max_rank = th.max_token_rank_greedy if greedy else sampled_rank_limit(th, top_k)
    step = int(ranks.argmax())
    if float(ranks[step]) > max_rank:
        return _fail(f"token rank {float(ranks[step]):.0f} > {max_rank} at step {step}", metrics)
    step = int(errors.argmax())
    if float(errors[step]) > th.max_gen_logprob_error:
        text = f"logprob error {float(errors[step]):.4f} > {th.max_gen_logprob_error:.4f}"
        return _fail(f"{text} at step {step}", metrics)
    if ends_with_eos and metrics["eos_prob"] < th.min_eos_prob:
        text = f"P(eos) {metrics['eos_prob']:.2e} < {th.min_eos_prob:.2e}"
        return _fail(f"{text} at step {T - 1}", metrics)
    return Verdict(True, "", metrics)


def sampled_rank_limit(th: Thresholds, top_k: int) -> int:
    """The largest reference rank of an honestly sampled token, for a sampling top-k (0: none)."""
    if top_k > 0:
        return min(th.max_token_rank_sampled, top_k - 1 + th.sampled_rank_slack)
    return th.max_token_rank_sampled


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
