"""One miner's challenge in a round: salted prompts, the requests, typed answers, and the round's judgement.

Judging is batched over the round: the reference (neuron/reference.py) runs once for all miners' Forward
prompts and once for all their teacher-forced generations, then the pure checks of neuron/scoring.py run
per miner.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from neuron import protocol, scoring, wire
from neuron.dataset import PromptSource, salted_prompt_ids
from neuron.dendrite import PeerResult
from neuron.engine.types import FinishReason, Sampler, SamplingParams
from neuron.errors import NeuronError
from neuron.model import LoadedModel
from neuron.pb.neuron.v1 import axon_pb2 as pb
from neuron.reference import Reference

N_SALT = 4  # random tokens in front of every forward prompt: no two miners see the same input
FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_EOS: "stop", pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence"}


@dataclass(frozen=True)
class ChallengeConfig:
    seq_len: int = 64  # tokens of a Forward prompt
    positions: int = 8  # positions checked per Forward
    topk: int = 16  # top-k asked for
    max_new_tokens: int = 16  # tokens per Generate
    # Share of generations that sample (temperature 0.7, top_k 50; half of them also top_p) rather than
    # decode greedily: sampled requests are where a miner's sampler shows, so they are the majority.
    sampled_fraction: float = 0.75
    sample_temperature: float = 0.7
    sample_top_k: int = 50
    sample_top_p: float = 0.9  # for half of the sampled requests


@dataclass
class Challenge:
    """What one miner is asked; built fresh for every miner and round. Generation is seeded (gumbel-v1)."""

    forward_ids: list[int]
    positions: list[int]
    topk: int
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int
    top_p: float = 1.0

    @property
    def spec(self) -> scoring.GenSpec:
        return scoring.GenSpec(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed)

    def forward_request(self) -> pb.ForwardRequest:
        return pb.ForwardRequest(input_ids=wire.to_pb(torch.tensor([self.forward_ids])), positions=self.positions,
                                 topk=self.topk)

    def generate_request(self) -> pb.GenerateRequest:
        sampling = SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                                  sampler=Sampler.GUMBEL_V1)
        return protocol.generate_request(self.prompt_ids, max_new_tokens=self.max_new_tokens, sampling=sampling)


def make_challenge(lm: LoadedModel, source: PromptSource, rng: random.Random, cfg: ChallengeConfig) -> Challenge:
    vocab = min(lm.vocab_size, len(lm.tokenizer))
    span = source.sample_span(rng, 200, 800)
    ids = salted_prompt_ids(lm.tokenizer, span, rng, N_SALT, cfg.seq_len, vocab)
    # Check positions whose next token is corpus text, so the quality loss measures language modelling.
    first = min(N_SALT + 1, len(ids) - 2)
    candidates = list(range(first, len(ids) - 1))
    positions = sorted(rng.sample(candidates, min(cfg.positions, len(candidates))))
    prompt_text = source.salted_prompt_text(source.sample_span(rng, 40, 200), rng)
    prompt_ids = lm.tokenizer(prompt_text).input_ids[: max(1, cfg.seq_len // 2)]
    temperature, top_k, top_p = 0.0, 0, 1.0
    if rng.random() < cfg.sampled_fraction:
        temperature, top_k = cfg.sample_temperature, cfg.sample_top_k
        top_p = cfg.sample_top_p if rng.random() < 0.5 else 1.0
    return Challenge(ids, positions, cfg.topk, prompt_ids, cfg.max_new_tokens, temperature, top_k,
                     seed=rng.getrandbits(63), top_p=top_p)


# The checks take typed answers, decoded by the same codec the miner encodes with (neuron/protocol.py).
FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop_sequence"}


@dataclass
class Judgement:
    """The verdict on one miner's answers in a round."""

    verified: bool
    reason: str  # "" when verified
    loss: float = float("nan")  # quality loss of its forward answer on the true next tokens
    ref_loss: float = float("nan")  # the reference's loss on the same positions
    latency_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    margins: list[float] = field(default_factory=list)  # every checked generated token's margin (evidence)
    errors: list[float] = field(default_factory=list)  # and its reported logprob's error (evidence)


def _failed(what: str, result: PeerResult) -> str:
    return f"{what}: {result.code.name.lower()}: {result.message[:120]}"


def _generation_shape(ch: Challenge, a: protocol.GenerateAnswer, lm: LoadedModel) -> str:
    """What is wrong with a generation before any model work ("" when nothing)."""
    T = len(a.token_ids)
    if not 1 <= T <= ch.max_new_tokens:
        return f"{T} tokens for max_new_tokens {ch.max_new_tokens}"
    if len(a.logprobs) != T:
        return f"{len(a.logprobs)} logprobs for {T} tokens"
    if any(not 0 <= t < lm.vocab_size for t in a.token_ids):
        return "a generated token is outside the vocabulary"
    if a.finish_reason in (None, FinishReason.STOP_SEQUENCE):  # no stop strings were asked for
        return f"unexpected finish reason {a.finish_reason}"
    if a.text != lm.tokenizer.decode(list(a.token_ids), skip_special_tokens=True):
        return "the text does not spell the tokens"
    return ""


def judge_round(ref: Reference, chs: list[Challenge], fwds: list[PeerResult], gens: list[PeerResult],
                th: scoring.Thresholds, require_signature: bool) -> list[Judgement]:
    """Every miner's verdict: transport and shape first, then one reference batch for all Forward
    answers and one for all generations. Runs on a worker thread (model work)."""
    lm = ref.lm
    out: list[Judgement | None] = [None] * len(chs)
    fa: dict[int, protocol.ForwardAnswer] = {}
    ga: dict[int, protocol.GenerateAnswer] = {}
    for i, (ch, f, g) in enumerate(zip(chs, fwds, gens)):
        latency = max(f.latency_s, g.latency_s)
        for what, r in (("forward", f), ("generate", g)):
            if out[i] is None and not r.ok:
                out[i] = Judgement(False, _failed(what, r), latency_s=latency)
            elif out[i] is None and require_signature and not r.signed:
                out[i] = Judgement(False, f"{what}: the answer is not signed by the miner's hotkey", latency_s=latency)
        if out[i] is not None:
            continue
        try:
            fa[i] = protocol.decode_forward(f.response, 1, ch.positions, ch.topk)
        except NeuronError as exc:  # a malformed answer: the miner's fault, not a validator crash
            out[i] = Judgement(False, f"forward: malformed answer: {exc}", latency_s=latency)
            continue
        try:
            ga[i] = protocol.decode_generate(g.response, ch.max_new_tokens)
        except NeuronError as exc:
            out[i] = Judgement(False, f"generate: malformed answer: {exc}", latency_s=latency)
            continue
        if problem := _generation_shape(ch, ga[i], lm):
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


def _judge_one(ch: Challenge, fa: protocol.ForwardAnswer, ga: protocol.GenerateAnswer, fwd_logits: torch.Tensor,
               gen_logits: torch.Tensor, th: scoring.Thresholds, lm: LoadedModel, latency: float) -> Judgement:
    ref = torch.log_softmax(fwd_logits.double(), dim=-1)
    ids, lp, rest = fa.topk_ids[0], fa.topk_logprobs[0], fa.rest_mass[0]
    verdict = scoring.verify_forward(ref, ids, lp, rest, th)
    if not verdict.ok:
        return Judgement(False, f"forward: {verdict.reason}", latency_s=latency, metrics=verdict.metrics)
    gv = scoring.verify_generation(gen_logits, torch.tensor(ga.token_ids), torch.tensor(ga.logprobs, dtype=torch.float64),
                                   spec=ch.spec, finish_reason=FINISH[ga.finish_reason], eos_token_id=lm.eos_token_id,
                                   th=th)
    margins, errors = list(gv.metrics.pop("margins", [])), list(gv.metrics.pop("errors", []))
    if not gv.ok:
        return Judgement(False, f"generate: {gv.reason}", latency_s=latency, metrics=gv.metrics, margins=margins,
                         errors=errors)
    k = ch.topk
    targets = torch.tensor(ch.forward_ids)[torch.tensor(ch.positions) + 1]
    ref_lp, ref_ids = ref.topk(k, dim=-1)
    ref_rest = (1 - ref_lp.exp().sum(-1)).clamp(min=0)
    loss = scoring.quality_loss(ids, lp, rest, targets, lm.vocab_size)
    ref_loss = scoring.quality_loss(ref_ids, ref_lp, ref_rest, targets, lm.vocab_size)
    return Judgement(True, "", loss, ref_loss, latency, {**verdict.metrics, **gv.metrics}, margins, errors)
