"""Measure the verification metrics for honest and dishonest miners, so Thresholds come from data.

The reference is the validator's computation: the model in float32, one unpadded sequence at a
time. Honest miners compute the same thing another way (float16 or bfloat16 weights, in left-padded
batches, generation in a batched decoder that sequences join). Dishonest miners serve another
model (perturbed, truncated, int8-quantized weights) or rewrite the logits (Gaussian noise, random).
Every check is one `verify_forward` or `verify_generation` call on one sequence, as the validator
makes it; its metrics are kept whatever the verdict, so worst and best values can be compared.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import re
from dataclasses import dataclass, field

import torch

from neuron import scoring
from neuron.adversaries import LogitsFilter, cheat_model, quantize_
from neuron.challenge import Challenge, ChallengeConfig, make_challenge
from neuron.dataset import PromptSource
from neuron.generation import EOS, Decoder, GenParams
from neuron.model import ForwardJob, LoadedModel, forward_batch, forward_logprobs

FORWARD_METRICS = ("topk_overlap", "prob_distance", "ref_argmax_rank", "logprob_error", "median_logprob_error",
                   "rest_mass_error")
GENERATION_METRICS = ("token_rank_greedy", "token_rank_sampled", "gen_logprob_error", "eos_prob")
# Measured on honest forward answers, checked in generation: how far past its top-k a sample can go.
SAMPLE_TOPK_RANK = "sample_topk_rank"
METRICS = FORWARD_METRICS + GENERATION_METRICS + (SAMPLE_TOPK_RANK,)
# For these a smaller value is the more suspicious one; for the rest a larger value is.
LOWER_IS_WORSE = frozenset({"topk_overlap", "eos_prob"})
# The threshold each metric is checked against (Thresholds field names).
THRESHOLD_OF = {
    "topk_overlap": "min_topk_overlap",
    "prob_distance": "max_prob_distance",
    "ref_argmax_rank": "max_ref_argmax_rank",
    "logprob_error": "max_logprob_error",
    "median_logprob_error": "max_median_logprob_error",
    "rest_mass_error": "max_rest_mass_error",
    "token_rank_greedy": "max_token_rank_greedy",
    "token_rank_sampled": "max_token_rank_sampled",
    "gen_logprob_error": "max_gen_logprob_error",
    "eos_prob": "min_eos_prob",
}
# The precisions an honest miner may serve in; bfloat16 is measured but not among them (see docs/calibration.md).
ACCEPTED_DTYPES = ("float32", "float16")
# Reference P(eos) levels at which the chance of an honest early stop below the level is measured.
EOS_LEVELS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
DISHONEST = ("different", "truncated", "int8", "noise0.1", "noise0.3", "noise1.0", "random", "early_stop")


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
                   model: str, label: str, honest: bool, sample_top_k: int = 0) -> list[Check]:
    """One check per challenge: the miner runs all of them as one left-padded batch.

    With sample_top_k, the check also records `sample_topk_rank`: the largest reference rank among
    the miner's top sample_top_k ids, the furthest down an honest top-k sample can land.
    """
    jobs = [ForwardJob(torch.tensor([c.forward_ids]), c.positions, max(c.topk, sample_top_k)) for c in chs]
    checks = []
    for c, out in zip(chs, forward_batch(miner, jobs)):
        ref_rows = ref.rows(c.forward_ids, c.positions)
        k = c.topk
        v = scoring.verify_forward(ref_rows, out.topk_ids[0, :, :k], out.topk_logprobs[0, :, :k],
                                   (1 - out.topk_logprobs[0, :, :k].exp().sum(-1)).clamp(min=0), th)
        metrics = dict(v.metrics)
        if sample_top_k:
            metrics["sample_topk_rank"] = float(ranks(ref_rows, out.topk_ids[0, :, :sample_top_k]).max())
        checks.append(Check(model, label, honest, "forward", len(chs), v.ok, v.reason, metrics))
    return checks


def ranks(ref_rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[P, n] rank of each id under ref_rows [P, V] (0 = argmax; ties share the better rank)."""
    ascending = ref_rows.sort(dim=-1).values
    return ref_rows.shape[1] - torch.searchsorted(ascending, ref_rows.gather(1, ids), right=True)


@dataclass
class Generated:
    """What a miner answered to one Generate request."""

    tokens: list[int]
    logprobs: list[float]  # reported: raw log_softmax of the miner's model
    finish_reason: str  # as the validator reads it: "length" or "stop"


def params_of(c: Challenge) -> GenParams:
    return GenParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k, seed=c.seed)


def decode(miner: LoadedModel, chs: list[Challenge], join_after: int = 2) -> list[Generated]:
    """Generate for every challenge in one batched decoder, as a miner's batcher does: half the
    sequences start, the other half join after `join_after` steps; finished ones leave."""
    dec = Decoder(miner)
    seqs = [dec.new_sequence(c.prompt_ids, params_of(c)) for c in chs]
    answers = {id(s): Generated([], [], "length") for s in seqs}
    first, later = seqs[: (len(seqs) + 1) // 2], seqs[(len(seqs) + 1) // 2:]

    def record(seq, step):
        answers[id(seq)].tokens.append(step.token_id)
        answers[id(seq)].logprobs.append(step.logprob)
        if step.finish_reason == EOS:
            answers[id(seq)].finish_reason = "stop"

    for s, st in zip(first, dec.add(first)):
        record(s, st)
    n_steps = 0
    while len(dec) or later:
        dec.remove([s for s in dec.seqs if s.finished])
        stepped = dec.step() if len(dec) else []
        n_steps += 1
        for s, st in stepped:
            record(s, st)
        if later and (n_steps >= join_after or not len(dec)):
            for s, st in zip(later, dec.add(later)):
                record(s, st)
            later = []
    return [answers[id(s)] for s in seqs]


def eos_stop_chance(ref_rows: torch.Tensor, c: Challenge, eos: int, level: float) -> float:
    """The chance that an honest miner, sampling like the reference, stops by EOS at one of these
    steps where the reference P(eos) is below `level` (an early stop the check would reject)."""
    logits = ref_rows.double()
    if c.temperature == 0.0:
        picked = (logits.argmax(-1) == eos).double()
    else:
        filtered = logits / c.temperature
        if 0 < c.top_k < filtered.shape[-1]:
            kth = filtered.topk(c.top_k, dim=-1).values[:, -1:]
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        picked = filtered.softmax(-1)[:, eos]
    return float((picked * (logits[:, eos].exp() < level)).sum())


def generation_checks(ref: Reference, chs: list[Challenge], answers: list[Generated], th: scoring.Thresholds, *,
                      model: str, label: str, honest: bool, batch: int) -> list[Check]:
    """One check per generation: the reference teacher-forced over the miner's tokens, batch 1."""
    checks, eos = [], ref.lm.eos_token_id
    for c, a in zip(chs, answers):
        n, T = len(c.prompt_ids), len(a.tokens)
        rows = ref.rows(c.prompt_ids + a.tokens, list(range(n - 1, n - 1 + T)))
        greedy = c.temperature == 0.0
        v = scoring.verify_generation(rows, torch.tensor(a.tokens), torch.tensor(a.logprobs), greedy=greedy,
                                      finish_reason=a.finish_reason, eos_token_id=eos,
                                      max_new_tokens=c.max_new_tokens, th=th, top_k=c.top_k)
        metrics = {k: x for k, x in v.metrics.items() if k != "token_rank"}
        if "token_rank" in v.metrics:
            metrics["token_rank_greedy" if greedy else "token_rank_sampled"] = v.metrics["token_rank"]
        if honest and eos is not None:
            for level in EOS_LEVELS:
                metrics[f"eos_stop_chance@{level:g}"] = eos_stop_chance(rows, c, eos, level)
        checks.append(Check(model, label, honest, "greedy" if greedy else "sampled", batch, v.ok, v.reason, metrics))
    return checks


# Dishonest miners. Each returns a LoadedModel whose `model` computes the cheat; all run in float32.


def _with_model(lm: LoadedModel, model: torch.nn.Module) -> LoadedModel:
    return dataclasses.replace(lm, model=model)


def perturbed(lm: LoadedModel, relative: float, seed: int) -> LoadedModel:
    """Another model of the same architecture: every weight plus noise of `relative` x its tensor's std."""
    model = copy.deepcopy(lm.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = float(p.float().std()) if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=gen).to(p) * relative * scale)
    return _with_model(lm, model)


def int8_quantized(lm: LoadedModel) -> LoadedModel:
    """Every Linear weight rounded to int8 per output row (symmetric, absmax scale) and dequantized."""
    model = copy.deepcopy(lm.model)
    quantize_(model, bits=8)
    return _with_model(lm, model)


def noisy(lm: LoadedModel, std: float, seed: int) -> LoadedModel:
    """Honest logits plus Gaussian noise of `std` (in logit units, i.e. nats)."""
    gen = torch.Generator().manual_seed(seed)
    return _with_model(lm, LogitsFilter(lm.model, lambda x: x + std * torch.randn(x.shape, generator=gen).to(x)))


def random_logits(lm: LoadedModel, seed: int) -> LoadedModel:
    """Standard normal logits, nothing computed."""
    gen = torch.Generator().manual_seed(seed)
    return _with_model(lm, LogitsFilter(lm.model, lambda x: torch.randn(x.shape, generator=gen).to(x)))


def dishonest_models(ref: LoadedModel, seed: int = 0, different_relative: float = 0.1) -> dict[str, LoadedModel]:
    """Every model-level cheat of DISHONEST, built from the float32 reference."""
    return {
        "different": perturbed(ref, different_relative, seed),
        "truncated": cheat_model("truncated", ref),
        "int8": int8_quantized(ref),
        "noise0.1": noisy(ref, 0.1, seed),
        "noise0.3": noisy(ref, 0.3, seed),
        "noise1.0": noisy(ref, 1.0, seed),
        "random": random_logits(ref, seed),
    }


def early_stopped(answers: list[Generated], ref: Reference, chs: list[Challenge], after: int = 2) -> list[Generated]:
    """The early-stop cheat: honest tokens cut after `after`, then EOS, reported with the reference's
    own logprob for it, so only the P(eos) check can catch it."""
    out, eos = [], ref.lm.eos_token_id
    for c, a in zip(chs, answers):
        head = [(t, lp) for t, lp in zip(a.tokens[:after], a.logprobs[:after]) if t != eos]
        tokens = [t for t, _ in head] + [eos]
        eos_lp = float(ref.rows(c.prompt_ids + tokens, [len(c.prompt_ids) + len(head) - 1])[0, eos])
        out.append(Generated(tokens, [lp for _, lp in head] + [eos_lp], "stop"))
    return out


# Running and summarising.


def honest_run(ref: Reference, miners: dict[str, LoadedModel], source: PromptSource, rng: random.Random,
               batch_sizes: list[int], cfg: ChallengeConfig, th: scoring.Thresholds, *, model: str,
               generate: bool = True, rounds: int = 1) -> list[Check]:
    """For each round and batch size, one batch of fresh challenges sent to each honest miner."""
    checks = []
    for _ in range(rounds):
        for b in batch_sizes:
            chs = challenges(ref.lm, source, rng, b, cfg)
            ref.forget()
            for label, miner in miners.items():
                checks += forward_checks(ref, miner, chs, th, model=model, label=label, honest=True,
                                         sample_top_k=cfg.sample_top_k)
                if generate:
                    checks += generation_checks(ref, chs, decode(miner, chs), th, model=model, label=label,
                                                honest=True, batch=b)
    return checks


def dishonest_run(ref: Reference, cheats: dict[str, LoadedModel], source: PromptSource, rng: random.Random,
                  n: int, cfg: ChallengeConfig, th: scoring.Thresholds, *, model: str) -> list[Check]:
    """n challenges to each cheat, one at a time (batch 1, float32: the cheat's best case), plus the
    early-stop cheat on honest float32 generations."""
    chs = challenges(ref.lm, source, rng, n, cfg)
    ref.forget()
    checks = []
    for label, cheat in cheats.items():
        for c in chs:
            checks += forward_checks(ref, cheat, [c], th, model=model, label=label, honest=False)
        checks += generation_checks(ref, chs, [decode(cheat, [c])[0] for c in chs], th, model=model,
                                    label=label, honest=False, batch=1)
    stopped = early_stopped([decode(ref.lm, [c])[0] for c in chs], ref, chs)
    checks += generation_checks(ref, chs, stopped, th, model=model, label="early_stop", honest=False, batch=1)
    return checks


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


def limit_of(metric: str, th: scoring.Thresholds, sample_top_k: int) -> float:
    """The threshold a metric is held to; sampled ranks by the sampling top-k every sampled challenge has."""
    if metric in (SAMPLE_TOPK_RANK, "token_rank_sampled"):
        return scoring.sampled_rank_limit(th, sample_top_k)
    return getattr(th, THRESHOLD_OF[metric])


def rescored(c: Check, th: scoring.Thresholds, sample_top_k: int) -> Check:
    """The check's verdict under other thresholds, from its metrics alone (a run need not be repeated
    to try thresholds). A failure with no metrics (a malformed answer) stays a failure."""
    if not c.ok and not c.metrics:
        return c
    for m in METRICS:
        if m == SAMPLE_TOPK_RANK or m not in c.metrics:
            continue
        limit, value = limit_of(m, th, sample_top_k), c.metrics[m]
        if (value < limit) if m in LOWER_IS_WORSE else (value > limit):
            return dataclasses.replace(c, ok=False, reason=f"{m.replace('_', ' ')} {value:.4g} beyond {limit:.4g}")
    return dataclasses.replace(c, ok=True, reason="")


def summarize(checks: list[Check], th: scoring.Thresholds, sample_top_k: int) -> dict:
    """Worst honest values per (model, miner, batch) and overall, cheats' best values and catch rates."""
    models = sorted({c.model for c in checks})
    out: dict = {"thresholds": dataclasses.asdict(th), "sample_top_k": sample_top_k,
                 "sampled_rank_limit": scoring.sampled_rank_limit(th, sample_top_k), "models": {}}
    for model in models:
        mine = [c for c in checks if c.model == model]
        honest = [c for c in mine if c.honest]
        accepted = [c for c in honest if c.accepted]
        by_cell: dict = {}
        for c in honest:
            by_cell.setdefault(c.miner, {}).setdefault(str(c.batch), []).append(c)
        eos_chance = {}
        gens = [c for c in accepted if c.kind != "forward"]
        for level in EOS_LEVELS:
            key = f"eos_stop_chance@{level:g}"
            eos_chance[f"{level:g}"] = sum(c.metrics.get(key, 0.0) for c in gens) / max(len(gens), 1)
        cheats: dict = {}
        for label in dict.fromkeys(c.miner for c in mine if not c.honest):
            theirs = [c for c in mine if not c.honest and c.miner == label]
            fwd = [c for c in theirs if c.kind == "forward"]
            gen = [c for c in theirs if c.kind != "forward"]
            cheats[label] = {
                "best": extreme(theirs, better),
                "forward_caught": _rate(fwd),
                "generation_caught": _rate(gen),
                "checks": len(theirs),
                "reasons": _reasons(theirs),
            }
        out["models"][model] = {
            "checks": len(mine),
            "honest_checks": len(accepted),
            "honest_false_rejections": [dataclasses.asdict(c) for c in accepted if not c.ok],
            "worst_honest": extreme(accepted),
            "worst_by_miner": {label: extreme(sum(cells.values(), [])) for label, cells in by_cell.items()},
            "worst_by_miner_batch": {label: {b: extreme(cs) for b, cs in cells.items()} for label, cells in by_cell.items()},
            "rejected_by_miner": {label: sum(not c.ok for cs in cells.values() for c in cs) for label, cells in by_cell.items()},
            "checks_by_miner": {label: sum(len(cs) for cs in cells.values()) for label, cells in by_cell.items()},
            "honest_eos_stop_chance_per_generation": eos_chance,
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
        limit = limit_of(m, scoring.Thresholds(**th), summary["sample_top_k"])
        rows.append((m, limit, s["worst_honest"].get(m), bf16, closest))
    return rows


def fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.2e}"
