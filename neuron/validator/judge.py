"""The round's judgement: typed answers checked against the validator's reference, one verdict per miner.

Judging is batched: the reference runs once for all miners' Forward prompts and once for all their
teacher-forced generations, then the pure checks of neuron/scoring.py run per miner.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import grpc
import torch

from neuron import protocol, scoring
from neuron.dendrite import PeerResult
from neuron.engine.types import FinishReason
from neuron.errors import NeuronError
from neuron.logs import clip
from neuron.model import LoadedModel
from neuron.validator.challenge import Challenge, FwdCheck, GenCheck
from neuron.validator.reference import Reference

# The checks take typed answers, decoded by the same codec the miner encodes with (neuron/protocol.py).
FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop_sequence"}


class Outcome(enum.Enum):
    """What an operator does about a verdict: nothing, a miner that refused us, one we could not reach, a wrong answer,
    one that serves another model than ours (neuron/validator/declared.py)."""

    VERIFIED = "verified"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    WRONG = "wrong answer"
    OTHER_MODEL = "another model"


REFUSED_CODES = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                           grpc.StatusCode.RESOURCE_EXHAUSTED})
UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                               grpc.StatusCode.CANCELLED})


@dataclass
class Judgement:
    """The verdict on one miner's answers (a round's challenge, or one user answer)."""

    verified: bool
    reason: str  # "" when verified
    loss: float = float("nan")  # quality loss of its forward answer on the true next tokens
    ref_loss: float = float("nan")  # the reference's loss on the same positions
    latency_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    margins: list[float] = field(default_factory=list)  # every checked generated token's margin (evidence)
    errors: list[float] = field(default_factory=list)  # and its reported logprob's error (evidence)
    outcome: Outcome | None = None  # None: VERIFIED when verified, else WRONG

    def __post_init__(self):
        if self.outcome is None:
            self.outcome = Outcome.VERIFIED if self.verified else Outcome.WRONG


def transport_failure(what: str, r: PeerResult, require_signature: bool) -> Judgement | None:
    """The verdict on a call that failed or came back unsigned; None when it came back signed."""
    if not r.ok:
        outcome = (Outcome.REFUSED if r.code in REFUSED_CODES else
                   Outcome.UNREACHABLE if r.code in UNREACHABLE_CODES else Outcome.WRONG)
        return Judgement(False, f"{what}: {r.code.name.lower()}: {clip(r.message, 200)}", latency_s=r.latency_s,
                         outcome=outcome)
    if require_signature and not r.signed:
        return Judgement(False, f"{what}: the answer is not signed by the miner's hotkey", latency_s=r.latency_s)
    return None


def stop_problem(check: GenCheck, a: protocol.GenerateAnswer, tokenizer) -> str:
    """What is wrong with a generation's text and stop strings ("" when nothing): the text is the tokens' text
    cut before the first stop string; a stop-string finish ends at the token that completes the first one, and
    any other finish has none in its text (a miner that ignores stop strings goes on past them)."""
    def decode(ids) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    full = decode(a.token_ids)
    first = min((c for c in (full.find(s) for s in check.stop) if c != -1), default=-1)
    if a.text != (full[:first] if first != -1 else full):
        return "the text does not spell the tokens"
    if a.finish_reason is FinishReason.STOP_SEQUENCE:
        if first == -1:
            return "finish 'stop_sequence' but no stop string in the text"
        if any(s in decode(a.token_ids[:-1]) for s in check.stop):
            return "a stop string was complete before the last token but the generation went on"
    elif first != -1:
        return f"a stop string appeared at character {first} but the generation went on"
    return ""


def generation_shape(check: GenCheck, a: protocol.GenerateAnswer, lm: LoadedModel) -> str:
    """What is wrong with a generation before any model work ("" when nothing)."""
    T, n = len(a.token_ids), check.spec.max_new_tokens
    if not 1 <= T <= n:
        return f"{T} tokens for max_new_tokens {n}"
    if len(a.logprobs) != T:
        return f"{len(a.logprobs)} logprobs for {T} tokens"
    if any(not 0 <= t < lm.vocab_size for t in a.token_ids):
        return "a generated token is outside the vocabulary"
    if a.finish_reason is None or (a.finish_reason is FinishReason.STOP_SEQUENCE and not check.stop):
        return f"unexpected finish reason {a.finish_reason}"
    return stop_problem(check, a, lm.tokenizer)


def judge_round(ref: Reference, chs: list[Challenge], fwds: list[PeerResult], gens: list[PeerResult],
                th: scoring.Thresholds, require_signature: bool) -> list[Judgement]:
    """Every miner's verdict on its challenge: transport and shape first, then one reference batch for all
    Forward answers and one for all generations. Runs on a worker thread (model work)."""
    lm = ref.lm
    out: list[Judgement | None] = [None] * len(chs)
    fa: dict[int, protocol.ForwardAnswer] = {}
    ga: dict[int, protocol.GenerateAnswer] = {}
    for i, (ch, f, g) in enumerate(zip(chs, fwds, gens)):
        latency = max(f.latency_s, g.latency_s)
        failed = transport_failure("forward", f, require_signature) or transport_failure("generate", g, require_signature)
        if failed is not None:
            failed.latency_s = latency
            out[i] = failed
            continue
        try:
            fa[i] = protocol.decode_forward(f.response, 1, ch.positions, ch.topk, want_token_logprobs=True)
        except NeuronError as exc:  # a malformed answer: the miner's fault, not a validator crash
            out[i] = Judgement(False, f"forward: malformed answer: {exc}", latency_s=latency)
            continue
        try:
            ga[i] = (protocol.decode_stream(g.response, ch.max_new_tokens) if isinstance(g.response, list)
                     else protocol.decode_generate(g.response, ch.max_new_tokens))
        except NeuronError as exc:
            out[i] = Judgement(False, f"generate: malformed answer: {exc}", latency_s=latency)
            continue
        if problem := generation_shape(ch.check, ga[i], lm):
            out[i] = Judgement(False, f"generate: {problem}", latency_s=latency)
    todo = [i for i in range(len(chs)) if out[i] is None]
    if not todo:
        return out
    fwd_ref = ref.logits_at([chs[i].forward_ids for i in todo], [chs[i].positions for i in todo])
    gen_ref = ref.generation_logits([chs[i].prompt_ids for i in todo], [list(ga[i].token_ids) for i in todo])
    for i, fr, gr in zip(todo, fwd_ref, gen_ref):
        latency = max(fwds[i].latency_s, gens[i].latency_s)
        out[i] = _judge_one(chs[i], fa[i], ga[i], fr, gr, th, lm, latency)
    return out


def _check_generation(check: GenCheck, ga: protocol.GenerateAnswer, logits: torch.Tensor, th: scoring.Thresholds,
                      lm: LoadedModel) -> tuple[scoring.Verdict, list[float], list[float]]:
    gv = scoring.verify_generation(logits, torch.tensor(ga.token_ids), torch.tensor(ga.logprobs, dtype=torch.float64),
                                   spec=check.spec, finish_reason=FINISH[ga.finish_reason],
                                   eos_token_id=lm.eos_token_id, th=th)
    return gv, list(gv.metrics.pop("margins", [])), list(gv.metrics.pop("errors", []))


def _check_forward(check: FwdCheck, fa: protocol.ForwardAnswer, logits: torch.Tensor,
                   th: scoring.Thresholds) -> scoring.Verdict:
    ref = torch.log_softmax(logits.double(), dim=-1)
    positions = torch.tensor(check.positions)
    verdict = scoring.verify_forward(ref, fa.topk_ids[0], fa.topk_logprobs[0], fa.rest_mass[0], th, positions)
    if not verdict.ok or fa.token_logprobs is None:
        return verdict
    # The next input tokens' logprobs (users' echoed prompt logprobs): the same per-position logprob bound as
    # the top-k's (max_logprob_error: one kind of number, one calibrated threshold, widened at short context).
    nxt = torch.tensor(check.ids)[positions + 1]
    errors = (fa.token_logprobs[0].double() - ref.gather(1, nxt[:, None]).squeeze(1)).abs().nan_to_num(1e9)
    bound = th.max_logprob_error * scoring.early_scale(positions, th, len(positions)).double()
    if bool((errors > bound).any()):
        at = int((errors - bound).argmax())
        return scoring.Verdict(False, f"token logprob error {float(errors[at]):.4f} > {float(bound[at]):.4f} at "
                                      f"position {at}", verdict.metrics)
    return verdict


def judge_users(ref: Reference, checks: list[GenCheck | FwdCheck],
                answers: list[protocol.GenerateAnswer | protocol.ForwardAnswer], latencies: list[float],
                th: scoring.Thresholds) -> list[Judgement]:
    """The verdict on each user answer alone (the gateway already checked signatures and shapes), by the same
    checks as a challenge's generation or Forward; one reference batch for each kind. Runs on a worker thread."""
    out: list[Judgement | None] = [None] * len(checks)
    for i, (c, a, t) in enumerate(zip(checks, answers, latencies)):
        if isinstance(c, GenCheck) and (problem := generation_shape(c, a, ref.lm)):
            out[i] = Judgement(False, f"generate: {problem}", latency_s=t)
    gens = [i for i in range(len(checks)) if out[i] is None and isinstance(checks[i], GenCheck)]
    fwds = [i for i in range(len(checks)) if isinstance(checks[i], FwdCheck)]
    logits = ref.generation_logits([list(checks[i].prompt_ids) for i in gens], [list(answers[i].token_ids) for i in gens])
    for i, gr in zip(gens, logits):
        gv, margins, errors = _check_generation(checks[i], answers[i], gr, th, ref.lm)
        out[i] = Judgement(gv.ok, "" if gv.ok else f"generate: {gv.reason}", latency_s=latencies[i],
                           metrics=gv.metrics, margins=margins, errors=errors)
    logits = ref.logits_at([list(checks[i].ids) for i in fwds], [list(checks[i].positions) for i in fwds])
    for i, fr in zip(fwds, logits):
        v = _check_forward(checks[i], answers[i], fr, th)
        out[i] = Judgement(v.ok, "" if v.ok else f"forward: {v.reason}", latency_s=latencies[i], metrics=v.metrics)
    return out


def _judge_one(ch: Challenge, fa: protocol.ForwardAnswer, ga: protocol.GenerateAnswer, fwd_logits: torch.Tensor,
               gen_logits: torch.Tensor, th: scoring.Thresholds, lm: LoadedModel, latency: float) -> Judgement:
    fc = ch.fwd_check
    verdict = _check_forward(fc, fa, fwd_logits, th)
    if not verdict.ok:
        return Judgement(False, f"forward: {verdict.reason}", latency_s=latency, metrics=verdict.metrics)
    gv, margins, errors = _check_generation(ch.check, ga, gen_logits, th, lm)
    if not gv.ok:
        return Judgement(False, f"generate: {gv.reason}", latency_s=latency, metrics=gv.metrics, margins=margins,
                         errors=errors)
    ref = torch.log_softmax(fwd_logits.double(), dim=-1)
    nxt = torch.tensor(fc.ids)[torch.tensor(fc.positions) + 1]
    ref_lp, ref_ids = ref.topk(fc.topk, dim=-1)
    ref_rest = (1 - ref_lp.exp().sum(-1)).clamp(min=0)
    loss = scoring.quality_loss(fa.topk_ids[0], fa.topk_logprobs[0], fa.rest_mass[0], nxt, lm.vocab_size)
    ref_loss = scoring.quality_loss(ref_ids, ref_lp, ref_rest, nxt, lm.vocab_size)
    return Judgement(True, "", loss, ref_loss, latency, {**verdict.metrics, **gv.metrics}, margins, errors)
