"""Every cheat of the mock network and of calibration, in one place; never imported by the production miner.

Model cheats change the weights or the logits and then serve "honestly"; protocol cheats override the
servicer; generation cheats answer seeded requests with tokens the seeded sampler would not choose
(sampler policies on the real model, a cheaper model, quantized weights).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import math
import re
import threading

import torch

from neuron import protocol, wire
from neuron.axon import AxonServicer
from neuron.detokenize import Detokenizer
from neuron.engine import sampler
from neuron.engine.sampler import RowParams
from neuron.harness.decode import decode, reported_by
from neuron.model import LoadedModel
from neuron.validator.reference import Reference
from neuron.scoring import GenSpec
from neuron.pb.neuron.v1 import axon_pb2 as pb

MODEL_CHEATS = ("random", "different", "truncated", "quantized", "noise")
PROTOCOL_CHEATS = ("replay", "echo", "early_stop", "slow", "dead", "selective", "ignore_stop")
# Generation cheats answer Forward honestly and choose generated tokens another way (below).
GENERATION_CHEATS = ("greedy", "cold", "hot", "least_likely", "steer", "early_eos", "sentence_eos", "cheap",
                     "int8", "int4", "ignore_top_p", "ignore_top_k")
KINDS = MODEL_CHEATS + PROTOCOL_CHEATS + GENERATION_CHEATS
# Generation cheats that report exact logprobs from one teacher-forced pass of the real model over their
# tokens (the cheaper model drafts and the real one scores: only the tokens can show it). The others report
# the logprobs of the model that chose: the real one (sampler policies), or their int8 / 4-bit weights, which
# is all a miner that serves quantized weights has.
TEACHER_FORCED = frozenset({"cheap"})


class LogitsFilter(torch.nn.Module):
    """Wraps a causal LM and rewrites its logits: the worker and decoder use it like the real model."""

    def __init__(self, model: torch.nn.Module, rewrite):
        super().__init__()
        self.inner, self.rewrite = model, rewrite
        self.config = model.config

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        out.logits = self.rewrite(out.logits)
        return out


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers: OPT's model.decoder.layers, Llama's model.layers, GPT-Neo's transformer.h."""
    if hasattr(model, "transformer"):
        return model.transformer.h
    inner = model.model
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


def quantize_(model: torch.nn.Module, bits: int) -> None:
    """Round every Linear weight to `bits` per output row (what a cheap miner does to save memory); in an already
    quantized model (bitsandbytes), the Linear weights it left in floating point."""
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.is_floating_point():
                scale = m.weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / levels
                m.weight.copy_((m.weight / scale).round().clamp(-levels, levels) * scale)


def cheat_model(kind: str, lm: LoadedModel) -> LoadedModel:
    """A copy of `lm` that cheats in `kind`; protocol cheats get the honest model."""
    if kind not in MODEL_CHEATS:
        return lm
    model = copy.deepcopy(lm.model)
    gen = torch.Generator().manual_seed(4242)
    if kind == "random":
        model = LogitsFilter(model, lambda logits: torch.randn(logits.shape, generator=gen).to(logits))
    elif kind == "different":  # the same architecture with other weights
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():  # a bitsandbytes model's packed weights stay: the rest is random
                    p.copy_(torch.randn(p.shape, generator=gen).to(p) * p.std().nan_to_num(0.02))
    elif kind == "truncated":
        layers = _layers(model)
        del layers[max(1, len(layers) // 2):]
        model.config.num_hidden_layers = len(layers)
    elif kind == "quantized":
        quantize_(model, bits=4)
    elif kind == "noise":
        model = LogitsFilter(model, lambda logits: logits + 0.5 * torch.randn(logits.shape, generator=gen).to(logits))
    return LoadedModel(**{**lm.__dict__, "model": model})


class StreamsItsAnswer(AxonServicer):
    """A cheat's GenerateStream is its Generate answer, one chunk per token: it cheats on every RPC that
    generates (the validator streams its challenges, as the gateway streams users' requests)."""

    async def GenerateStream(self, request, context):
        resp = await self.Generate(request, context)
        ids, detok = list(resp.token_ids), Detokenizer(self.tokenizer)  # the text as an honest stream has it
        for i, token in enumerate(ids):
            last = i == len(ids) - 1
            c = pb.GenerateChunk(token_id=token, text=detok.add(token, last), logprob=resp.logprobs[i],
                                 finish_reason=resp.finish_reason if last else pb.FINISH_REASON_UNSPECIFIED)
            if len(resp.top) == len(ids):
                c.top.CopyFrom(resp.top[i])
            yield c


class ReplayServicer(StreamsItsAnswer):
    """Answers from a cache: an honest answer to an old prompt, replayed for any request of the same shape."""

    CACHED_TEXT = "The answer was computed once, long ago, and has been sent to everyone who asked since then."

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache: dict[tuple, object] = {}
        self._old = self.tokenizer(self.CACHED_TEXT).input_ids

    def _old_ids(self, n: int) -> list[int]:
        return (self._old * (n // len(self._old) + 1))[:n]

    async def Forward(self, request, context):
        key = ("forward", tuple(request.input_ids.shape), tuple(request.positions), request.topk)
        if key not in self._cache:
            old = pb.ForwardRequest()
            old.CopyFrom(request)
            batch, seq = (list(request.input_ids.shape) + [1, 1])[:2]
            old.input_ids.CopyFrom(wire.to_pb(torch.tensor([self._old_ids(seq)] * batch)))
            self._cache[key] = await super().Forward(old, context)
        return self._cache[key]

    async def Generate(self, request, context):
        key = ("generate", request.max_new_tokens, request.temperature, request.top_k)
        if key not in self._cache:
            old = pb.GenerateRequest()
            old.CopyFrom(request)
            old.ClearField("prompt_text")
            old.prompt_ids[:] = self._old
            self._cache[key] = await super().Generate(old, context)
        return self._cache[key]


class EchoServicer(StreamsItsAnswer):
    """Generation returns the prompt instead of new tokens."""

    async def Generate(self, request, context):
        job, _ = protocol.generate_job(request, self.limits, self.info, self.tokenizer)
        prompt = list(job.prompt_ids)
        echoed = (prompt * job.max_new_tokens)[: job.max_new_tokens]
        logprobs = [-1.0] * len(echoed)
        return pb.GenerateResponse(token_ids=echoed, text=self.tokenizer.decode(echoed, skip_special_tokens=True),
                                   logprobs=logprobs, finish_reason=pb.FINISH_REASON_LENGTH)


class EarlyStopServicer(StreamsItsAnswer):
    """Generation stops after two tokens and claims the model ended the text (saves compute)."""

    async def Generate(self, request, context):
        resp = await super().Generate(request, context)
        eos = self.info.eos_token_id
        if len(resp.token_ids) > 2 and eos is not None:
            keep = list(resp.token_ids[:2]) + [eos]
            logprobs = list(resp.logprobs[:2]) + [-0.5]
            return pb.GenerateResponse(token_ids=keep, logprobs=logprobs, finish_reason=pb.FINISH_REASON_EOS,
                                       text=self.tokenizer.decode(keep, skip_special_tokens=True))
        return resp


class SlowServicer(StreamsItsAnswer):
    """Answers honestly, but only after the caller's deadline has passed."""

    async def _late(self, context) -> None:
        remaining = context.time_remaining()
        await asyncio.sleep((remaining if remaining is not None else 10.0) + 0.5)

    async def Forward(self, request, context):
        await self._late(context)
        return await super().Forward(request, context)

    async def Generate(self, request, context):
        await self._late(context)
        return await super().Generate(request, context)


class DeadServicer(StreamsItsAnswer):
    """Accepts the connection and never answers."""

    async def Forward(self, request, context):
        await asyncio.Event().wait()

    async def Generate(self, request, context):
        await asyncio.Event().wait()


class IgnoreStopServicer(StreamsItsAnswer):
    """Generates as if no stop string had been asked (skips the stop checks, and sends the whole text)."""

    async def Generate(self, request, context):
        unstopped = pb.GenerateRequest()
        unstopped.CopyFrom(request)
        del unstopped.stop[:]
        return await AxonServicer.Generate(self, unstopped, context)


SERVICERS = {"replay": ReplayServicer, "echo": EchoServicer, "early_stop": EarlyStopServicer,
             "slow": SlowServicer, "dead": DeadServicer, "ignore_stop": IgnoreStopServicer}
# and "selective" (below the generation cheats)


def servicer_for(kind: str):
    """The servicer class for `kind` (the honest one for model cheats); ValueError for an unknown kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown dishonest kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind in GENERATION_CHEATS:
        return functools.partial(GenerationCheatServicer, kind=kind)
    if kind == "selective":
        return SelectiveServicer
    return SERVICERS.get(kind, AxonServicer)


# Generation cheats: sampler policies with the sampler's signature, choose(logits [B, V], RowParams) -> [B].
# Each answers a seeded request with tokens the seeded sampler would not choose, and reports their exact
# logprobs (the old checks could not tell: docs/calibration.md).


def _rows(rp: RowParams) -> list[tuple[float, int, float, int, int]]:
    return list(zip(rp.temperature.tolist(), rp.top_k.tolist(), rp.top_p.tolist(), rp.seed.tolist(), rp.step.tolist()))


class Greedy:
    """Answers a sampling request with the greedy tokens (one argmax instead of a sampler)."""

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        return logits.double().argmax(dim=1)


class Temperature:
    """Samples, with the right seed, at another temperature than asked."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        rows = [(self.temperature if t > 0 else 0.0, k, p, s, st) for t, k, p, s, st in _rows(rp)]
        return sampler.choose(logits, RowParams.build(rows, logits.device))


class Ignore:
    """Samples with the right seed and the other parameters, but ignores one: top_p as 1, or top_k as 0 (a
    sampler, or a backend, that does not implement it)."""

    def __init__(self, parameter: str):
        if parameter not in ("top_p", "top_k"):
            raise ValueError(f"cannot ignore {parameter!r}: top_p or top_k")
        self.parameter = parameter

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        off = 1.0 if self.parameter == "top_p" else 0
        rows = [(t, off if self.parameter == "top_k" else k, off if self.parameter == "top_p" else p, s, st)
                for t, k, p, s, st in _rows(rp)]
        return sampler.choose(logits, RowParams.build(rows, logits.device))


class LeastLikely:
    """Steers: at every sampled step, the least likely token that the top-k/top-p filter allows."""

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        _, allowed = sampler.perturbed_scores(logits, rp)
        low = logits.double().masked_fill(~allowed, float("inf")).argmin(dim=1)
        return torch.where(rp.temperature > 0, low, sampler.choose(logits, rp))


class Nudge:
    """Steers within honest noise: at every step, of the allowed tokens whose margin to the sampler's choice
    is at most `delta` (logit units, as the validator measures it), the least likely. Calibration-only (a
    "nudgeDELTA" kind): the cheapest cheat against the margin checks, since it never fails a round."""

    def __init__(self, delta: float):
        self.delta = delta

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        scores, allowed = sampler.perturbed_scores(logits, rp)
        scores = scores.masked_fill(~allowed, -math.inf)
        scale = torch.where(rp.temperature > 0, rp.temperature.double(), 1.0).unsqueeze(1)
        near = (scores.max(dim=1, keepdim=True).values - scores) * scale <= self.delta
        return logits.double().masked_fill(~near, math.inf).argmin(dim=1)


class Bias:
    """Steers the text toward chosen tokens: their logits raised by `bias` before the seeded sampler."""

    def __init__(self, token_ids: list[int], bias: float):
        self.token_ids, self.bias = list(token_ids), bias

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        steered = logits.clone()
        steered[:, self.token_ids] += self.bias
        return sampler.choose(steered, rp)


class EarlyEos:
    """Stops with EOS at the first step where P(eos) >= level (what the old rule let through);
    with `after` tokens (e.g. sentence ends), only right after one of them."""

    def __init__(self, eos: int, level: float = 1e-3, steer: Bias | None = None):
        self.eos, self.level, self.steer = eos, level, steer
        self._last: torch.Tensor | None = None

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        p_eos = torch.softmax(logits.double(), dim=1)[:, self.eos]
        base = (self.steer or sampler).choose(logits, rp)
        stop = p_eos >= self.level
        if self.steer is not None:  # stop only after a steered-to token (a sentence end)
            last = self._last if self._last is not None and rp.step.max() > 0 else torch.zeros_like(stop)
            stop = stop & last
            self._last = torch.isin(base, torch.tensor(self.steer.token_ids, device=base.device))
        return torch.where(stop, torch.full_like(base, self.eos), base)


def sentence_end_ids(tokenizer) -> list[int]:
    """Token ids that end a sentence: '.', '!', '?' alone or after a space."""
    ids = set()
    for text in (".", "!", "?", " .", ".\n"):
        enc = tokenizer(text, add_special_tokens=False).input_ids
        if len(enc) == 1:
            ids.add(enc[0])
    return sorted(ids)


def steer_target_ids(tokenizer, word: str = " the") -> list[int]:
    """The first token of the word an attacker steers the text toward."""
    return tokenizer(word, add_special_tokens=False).input_ids[:1]


def truncated(lm: LoadedModel, keep: float = 0.5) -> LoadedModel:
    """The real model cut to its first `keep` of layers: the cheaper model a cheat decodes with."""
    model = copy.deepcopy(lm.model)
    layers = _layers(model)
    del layers[max(1, int(len(layers) * keep)):]
    model.config.num_hidden_layers = len(layers)
    return LoadedModel(**{**lm.__dict__, "model": model})


def quantized(lm: LoadedModel, bits: int) -> LoadedModel:
    """The real model with every Linear weight rounded to `bits` (int8, 4-bit) and dequantized."""
    model = copy.deepcopy(lm.model)
    quantize_(model, bits)
    return LoadedModel(**{**lm.__dict__, "model": model})


def generation_cheat(kind: str, lm: LoadedModel) -> tuple[object, LoadedModel]:
    """(sampler policy, model that chooses the tokens) of a generation cheat."""
    tok = lm.tokenizer
    if kind == "greedy":
        return Greedy(), lm
    if kind in ("cold", "hot"):
        return Temperature(0.2 if kind == "cold" else 1.5), lm
    if kind == "least_likely":
        return LeastLikely(), lm
    if kind == "steer":
        return Bias(steer_target_ids(tok), 6.0), lm
    if kind == "early_eos":
        return EarlyEos(lm.eos_token_id), lm
    if kind == "sentence_eos":
        return EarlyEos(lm.eos_token_id, steer=Bias(sentence_end_ids(tok), 3.0)), lm
    if kind == "cheap":
        return sampler, truncated(lm)
    if kind in ("int8", "int4"):
        return sampler, quantized(lm, 8 if kind == "int8" else 4)
    if kind in ("ignore_top_p", "ignore_top_k"):
        return Ignore(kind.removeprefix("ignore_")), lm
    if kind.startswith("nudge"):
        return Nudge(float(kind.removeprefix("nudge"))), lm
    raise ValueError(f"unknown generation cheat {kind!r}: expected one of {', '.join(GENERATION_CHEATS)}")


class GenerationCheatServicer(StreamsItsAnswer):
    """Forward is honest; Generate chooses its tokens with a cheating policy, a cheaper model or quantized
    weights (direct decode), and reports logprobs as the cheat's kind does (TEACHER_FORCED)."""

    def __init__(self, *args, kind: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.lm = self.engine.lm  # the harness runs the HF engine: its model is at hand
        self.policy, self.chooser = generation_cheat(kind, self.lm)
        self.reference = Reference(self.lm) if kind in TEACHER_FORCED else None
        self._lock = threading.Lock()  # one cheat decode at a time: the policies keep per-batch state

    def _generate(self, prompt: list[int], spec: GenSpec):
        with self._lock:
            answer = decode(self.chooser, [prompt], [spec], self.policy)
            return reported_by(self.reference, [prompt], answer)[0] if self.reference else answer[0]

    async def Generate(self, request, context):
        job, _ = protocol.generate_job(request, self.limits, self.info, self.tokenizer)
        sp = job.sampling
        spec = GenSpec(job.max_new_tokens, sp.temperature, sp.top_k, sp.top_p, sp.seed or 0)
        a = await asyncio.to_thread(self._generate, list(job.prompt_ids), spec)
        finish = pb.FINISH_REASON_EOS if a.finish_reason == "stop" else pb.FINISH_REASON_LENGTH
        return pb.GenerateResponse(token_ids=a.tokens, logprobs=a.logprobs, finish_reason=finish,
                                   text=self.tokenizer.decode(a.tokens, skip_special_tokens=True))


class SelectiveServicer(GenerationCheatServicer):
    """Honest on whatever looks like a validator's challenge by the old tells (a salt line of 2-4 capitalised
    words and a number; a prompt sent as ids asking 16 seeded tokens), the truncated model's tokens with exact
    logprobs (the `cheap` cheat) on everything else: what a miner would do once user traffic pays."""

    SALT_LINE = re.compile(r"^[A-Z][a-z]+( [a-z]+){1,3} \d+\.\n\n")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "kind": "cheap"})

    @classmethod
    def looks_like_a_challenge(cls, request) -> bool:
        if request.prompt_text:
            return bool(cls.SALT_LINE.match(request.prompt_text))
        return request.max_new_tokens == 16 and request.sampler == pb.SAMPLER_GUMBEL_V1

    async def Generate(self, request, context):
        if self.looks_like_a_challenge(request):
            return await AxonServicer.Generate(self, request, context)
        return await super().Generate(request, context)
