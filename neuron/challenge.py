"""One miner's challenge in a round: salted prompts, the requests, and the judgement of its answers."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from neuron import protocol, scoring, wire
from neuron.dataset import PromptSource, salted_prompt_ids
from neuron.dendrite import PeerResult
from neuron.errors import NeuronError
from neuron.model import LoadedModel, forward_logprobs
from neuron.pb.neuron.v1 import axon_pb2 as pb

N_SALT = 4  # random tokens in front of every forward prompt: no two miners see the same input
FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_EOS: "stop", pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence"}


@dataclass(frozen=True)
class ChallengeConfig:
    seq_len: int = 64  # tokens of a Forward prompt
    positions: int = 8  # positions checked per Forward
    topk: int = 16  # top-k asked for
    max_new_tokens: int = 16  # tokens per Generate
    sampled_fraction: float = 0.5  # share of generations that sample (temperature 0.7, top_k 50) instead of greedy
    sample_top_k: int = 50


@dataclass
class Challenge:
    """What one miner is asked; built fresh for every miner and round."""

    forward_ids: list[int]
    positions: list[int]
    topk: int
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int

    def forward_request(self) -> pb.ForwardRequest:
        return pb.ForwardRequest(input_ids=wire.to_pb(torch.tensor([self.forward_ids])), positions=self.positions,
                                 topk=self.topk)

    def generate_request(self) -> pb.GenerateRequest:
        return pb.GenerateRequest(prompt_ids=self.prompt_ids, max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, top_k=self.top_k, seed=self.seed)


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
    sampled = rng.random() < cfg.sampled_fraction
    return Challenge(ids, positions, cfg.topk, prompt_ids, cfg.max_new_tokens,
                     temperature=0.7 if sampled else 0.0, top_k=cfg.sample_top_k if sampled else 0,
                     seed=rng.getrandbits(63))


@dataclass
class Judgement:
    """The verdict on one miner's answers in a round."""

    verified: bool
    reason: str  # "" when verified
    loss: float = float("nan")  # quality loss of its forward answer on the true next tokens
    ref_loss: float = float("nan")  # the reference's loss on the same positions
    latency_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


def _failed(what: str, result: PeerResult) -> str:
    return f"{what}: {result.code.name.lower()}: {result.message[:120]}"


def judge(lm: LoadedModel, ch: Challenge, fwd: PeerResult, gen: PeerResult, th: scoring.Thresholds,
          require_signature: bool) -> Judgement:
    """Check both answers against the reference model; runs on a worker thread (model work)."""
    latency = max(fwd.latency_s, gen.latency_s)
    for what, r in (("forward", fwd), ("generate", gen)):
        if not r.ok:
            return Judgement(False, _failed(what, r), latency_s=latency)
        if require_signature and not r.signed:
            return Judgement(False, f"{what}: the answer is not signed by the miner's hotkey", latency_s=latency)
    try:
        verdict, loss, ref_loss = _judge_forward(lm, ch, fwd.response, th)
        if not verdict.ok:
            return Judgement(False, f"forward: {verdict.reason}", latency_s=latency, metrics=verdict.metrics)
        gverdict = _judge_generate(lm, ch, gen.response, th)
        if not gverdict.ok:
            return Judgement(False, f"generate: {gverdict.reason}", latency_s=latency, metrics=gverdict.metrics)
    except NeuronError as exc:  # a malformed answer: the miner's fault, not a validator crash
        return Judgement(False, f"malformed answer: {exc}", latency_s=latency)
    return Judgement(True, "", loss, ref_loss, latency, {**verdict.metrics, **gverdict.metrics})


def _judge_forward(lm: LoadedModel, ch: Challenge, resp: pb.ForwardResponse, th: scoring.Thresholds):
    P, k = len(ch.positions), ch.topk
    if list(resp.positions) != ch.positions:
        return scoring.Verdict(False, "answered other positions than asked"), 0.0, 0.0
    ids = protocol.tensor_from(resp.topk_ids, "topk_ids", "int64", [1, P, k])[0]
    lp = protocol.tensor_from(resp.topk_logprobs, "topk_logprobs", "float32", [1, P, k])[0]
    rest = protocol.tensor_from(resp.rest_mass, "rest_mass", "float32", [1, P])[0]
    full, _ = forward_logprobs(lm, torch.tensor([ch.forward_ids]))
    ref = full[0, ch.positions].cpu()
    verdict = scoring.verify_forward(ref, ids, lp, rest, th)
    if not verdict.ok:
        return verdict, 0.0, 0.0
    targets = torch.tensor(ch.forward_ids)[torch.tensor(ch.positions) + 1]
    ref_lp, ref_ids = ref.topk(k, dim=-1)
    ref_rest = (1 - ref_lp.exp().sum(-1)).clamp(min=0)
    loss = scoring.quality_loss(ids, lp, rest, targets, lm.vocab_size)
    ref_loss = scoring.quality_loss(ref_ids, ref_lp, ref_rest, targets, lm.vocab_size)
    return verdict, loss, ref_loss


def _judge_generate(lm: LoadedModel, ch: Challenge, resp: pb.GenerateResponse, th: scoring.Thresholds):
    tokens = list(resp.token_ids)
    T = len(tokens)
    if not 1 <= T <= ch.max_new_tokens:
        return scoring.Verdict(False, f"{T} tokens for max_new_tokens {ch.max_new_tokens}")
    if len(resp.logprobs) != T:
        return scoring.Verdict(False, f"{len(resp.logprobs)} logprobs for {T} tokens")
    if any(not 0 <= t < lm.vocab_size for t in tokens):
        return scoring.Verdict(False, "a generated token is outside the vocabulary")
    finish = FINISH.get(resp.finish_reason)
    if finish is None or finish == "stop_sequence":  # no stop strings were asked for
        return scoring.Verdict(False, f"unexpected finish reason {resp.finish_reason}")
    if resp.text != lm.tokenizer.decode(tokens, skip_special_tokens=True):
        return scoring.Verdict(False, "the text does not spell the tokens")
    full, _ = forward_logprobs(lm, torch.tensor([ch.prompt_ids + tokens]))
    n = len(ch.prompt_ids)
    ref = full[0, n - 1:n - 1 + T].cpu()
    return scoring.verify_generation(ref, torch.tensor(tokens), torch.tensor(list(resp.logprobs)),
                                     greedy=ch.temperature == 0.0, finish_reason=finish,
                                     eos_token_id=lm.eos_token_id, max_new_tokens=ch.max_new_tokens, th=th,
                                     top_k=ch.top_k)
