"""Cheats on the servicer: protocol cheats override an RPC; generation cheats choose their tokens another way."""

from __future__ import annotations

import asyncio
import re
import threading

import torch

from neuron import protocol, wire
from neuron.axon import AxonServicer
from neuron.detokenize import Detokenizer
from neuron.harness.cheats.models import truncated
from neuron.harness.decode import decode, reported_by
from neuron.engine import sampler
from neuron.pb.neuron.v1 import axon_pb2 as pb
from neuron.scoring import GenSpec
from neuron.validator.reference import Reference


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


class GenerationCheatServicer(StreamsItsAnswer):
    """Forward is honest; Generate chooses its tokens with a cheating policy, a cheaper model or quantized
    weights (direct decode: `choose(lm) -> (policy, chooser)`), and reports the chooser's logprobs, or with
    teacher_forced the real model's over those tokens."""

    def __init__(self, *args, choose, teacher_forced: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.lm = self.engine.lm  # the harness runs the HF engine: its model is at hand
        self.policy, self.chooser = choose(self.lm)
        self.reference = Reference(self.lm) if teacher_forced else None
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
        super().__init__(*args, **kwargs, choose=cheap, teacher_forced=True)

    @classmethod
    def looks_like_a_challenge(cls, request) -> bool:
        if request.prompt_text:
            return bool(cls.SALT_LINE.match(request.prompt_text))
        return request.max_new_tokens == 16 and request.sampler == pb.SAMPLER_GUMBEL_V1

    async def Generate(self, request, context):
        if self.looks_like_a_challenge(request):
            return await AxonServicer.Generate(self, request, context)
        return await super().Generate(request, context)


def cheap(lm):
    """The `cheap` cheat's choice: the seeded sampler over half the layers (reported with exact logprobs)."""
    return sampler, truncated(lm)
