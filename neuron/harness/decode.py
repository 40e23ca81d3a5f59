"""A direct seeded decode loop (model + a sampler policy), for calibration and the cheating miners.

A left-padded batch with a KV cache, every row starting together; the token choice is a policy object with
the sampler's signature, `choose(logits [B, V], RowParams) -> int64 [B]`: the honest one is
neuron.engine.sampler itself, the cheats (neuron.harness.cheats) are others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuron.engine import sampler
from neuron.engine.sampler import RowParams
from neuron.model import LoadedModel, position_ids
from neuron.scoring import GenSpec


@dataclass
class Generated:
    """What a miner answers to one seeded Generate request."""

    tokens: list[int]
    logprobs: list[float]  # raw log_softmax of the model that chose them, unless replaced (`reported_by`)
    finish_reason: str  # as the validator reads it: "length" or "stop"


@torch.inference_mode()
def decode(lm: LoadedModel, prompts: list[list[int]], specs: list[GenSpec], policy=sampler) -> list[Generated]:
    """Generate for every prompt in one left-padded batch; a row stops at EOS or max_new_tokens."""
    B, dev, eos = len(prompts), lm.device, lm.eos_token_id
    width = max(len(p) for p in prompts)
    pad = lm.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
                   logits_to_keep=1)
    answers = [Generated([], [], "length") for _ in prompts]
    live = [True] * B
    longest = max(s.max_new_tokens for s in specs)
    for step in range(longest):
        logits = out.logits[:, -1, :].float()
        rp = RowParams.build([(s.temperature, s.top_k, s.top_p, s.seed, step) for s in specs], device=dev)
        tokens = policy.choose(logits, rp)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0].tolist()
        for i, (t, lp) in enumerate(zip(tokens.tolist(), logprobs)):
            if not live[i]:
                continue
            answers[i].tokens.append(t)
            answers[i].logprobs.append(lp)
            if t == eos:
                answers[i].finish_reason, live[i] = "stop", False
            elif len(answers[i].tokens) >= specs[i].max_new_tokens:
                live[i] = False
        if not any(live):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        out = lm.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position_ids(mask)[:, -1:],
                       past_key_values=out.past_key_values, use_cache=True)
    return answers


def reported_by(reference, prompts: list[list[int]], answers: list[Generated]) -> list[Generated]:
    """The same tokens with exact logprobs from one teacher-forced pass of `reference` (a
    neuron.validator.reference.Reference): what a cheat that chose its tokens cheaply reports."""
    logits = reference.generation_logits(prompts, [a.tokens for a in answers])
    out = []
    for a, rows in zip(answers, logits):
        lp = torch.log_softmax(rows.double(), dim=-1).gather(1, torch.tensor(a.tokens)[:, None])[:, 0]
        out.append(Generated(list(a.tokens), lp.tolist(), a.finish_reason))
    return out


def engine_decode(lm: LoadedModel, prompts: list[list[int]], specs: list[GenSpec], join_after: int = 2) -> list[Generated]:
    """Generate through the production HF engine (neuron.engine.hf), as an honest miner does: half the
    sequences start, the other half join after `join_after` steps, finished ones leave: the batching
    noise is the real one."""
    import asyncio

    from neuron.config import MinerConfig, with_overrides
    from neuron.engine import open_engine
    from neuron.engine.types import FinishReason, GenerateJob, Sampler, SamplingParams

    async def run() -> list[Generated]:
        longest = max(len(p) for p in prompts) + max(s.max_new_tokens for s in specs) + 8
        config = with_overrides(MinerConfig(), **{"batching.max_generate_batch": max(16, len(prompts)),
                                                  "limits.max_seq_len": longest})
        engine = open_engine(config, lm)
        await engine.start()
        answers = [Generated([], [], "length") for _ in prompts]
        joined = asyncio.Event()

        async def one(i: int) -> None:
            s = specs[i]
            job = GenerateJob(tuple(prompts[i]), s.max_new_tokens, SamplingParams(
                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed, sampler=Sampler.GUMBEL_V1))
            async for step in engine.generate(job):
                answers[i].tokens.append(step.token_id)
                answers[i].logprobs.append(step.logprob)
                if step.finish_reason == FinishReason.EOS:
                    answers[i].finish_reason = "stop"
                if i == 0 and len(answers[0].tokens) >= join_after:
                    joined.set()
            joined.set()

        first = (len(prompts) + 1) // 2
        try:
            tasks = [asyncio.ensure_future(one(i)) for i in range(first)]
            await joined.wait()
            tasks += [asyncio.ensure_future(one(i)) for i in range(first, len(prompts))]
            await asyncio.gather(*tasks)
        finally:
            await engine.stop()
        return answers

    return asyncio.run(run())
