"""Dishonest miners for the mock network: each cheats one way the old network was cheated.

Model cheats change the weights or the logits and then serve "honestly" through the real worker;
protocol cheats override the servicer. Refused outside a local chain (cli.py checks).
"""

from __future__ import annotations

import asyncio
import copy

import torch

from neuron import protocol, wire
from neuron.axon import AxonServicer
from neuron.model import LoadedModel
from neuron.pb.neuron.v1 import axon_pb2 as pb

MODEL_CHEATS = ("random", "different", "truncated", "quantized", "noise")
PROTOCOL_CHEATS = ("replay", "echo", "early_stop", "slow", "dead")
KINDS = MODEL_CHEATS + PROTOCOL_CHEATS


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
    inner = model.model
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


def quantize_(model: torch.nn.Module, bits: int) -> None:
    """Round every Linear weight to `bits` per output row (what a cheap miner does to save memory)."""
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
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


class ReplayServicer(AxonServicer):
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


class EchoServicer(AxonServicer):
    """Generation returns the prompt instead of new tokens."""

    async def Generate(self, request, context):
        job, _ = protocol.generate_job(request, self.limits, self.info, self.tokenizer)
        prompt = list(job.prompt_ids)
        echoed = (prompt * job.max_new_tokens)[: job.max_new_tokens]
        logprobs = [-1.0] * len(echoed)
        return pb.GenerateResponse(token_ids=echoed, text=self.tokenizer.decode(echoed, skip_special_tokens=True),
                                   logprobs=logprobs, finish_reason=pb.FINISH_REASON_LENGTH)


class EarlyStopServicer(AxonServicer):
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


class SlowServicer(AxonServicer):
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


class DeadServicer(AxonServicer):
    """Accepts the connection and never answers."""

    async def Forward(self, request, context):
        await asyncio.Event().wait()

    async def Generate(self, request, context):
        await asyncio.Event().wait()


SERVICERS = {"replay": ReplayServicer, "echo": EchoServicer, "early_stop": EarlyStopServicer,
             "slow": SlowServicer, "dead": DeadServicer}


def servicer_for(kind: str):
    """The servicer class for `kind` (the honest one for model cheats); ValueError for an unknown kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown dishonest kind {kind!r}: expected one of {', '.join(KINDS)}")
    return SERVICERS.get(kind, AxonServicer)
