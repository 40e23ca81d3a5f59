"""`neuron bench --engine.backend vllm`: the vLLM engine against vLLM's own LLM.generate and the HF model.

Figures, each A and B measured in alternation on the same requests (ratio = median of A / B over
adjacent pairs, as in neuron/harness/bench/run.py):
- generation through `VllmEngine` (AsyncLLM, the miner's queue, token steps) / `vllm.LLM.generate`
  with the same engine arguments and sampling parameters: the cost of the engine layer (target >= 0.9);
- the same requests through `VllmEngine` / the HF model's `generate` one after another;
- VllmEngine with gumbel-v1 / `vllm.LLM.generate` with vLLM's own sampler (target >= 0.95), and the
  gumbel-v1 processor's function alone per setting, as a share of a decode step (target <= 10%);
- gumbel-v1 agreement: tokens of the vLLM engine that differ from `sampler.choose` over the HF model's
  logits teacher-forced over the same tokens (a count, not a timing).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from neuron.config import BenchConfig
from neuron.engine import sampler as S
from neuron.engine.types import GenerateJob, Sampler, SamplingParams
from neuron.engine.vllm_config import VllmConfig
from neuron.harness.bench.figure import Figure

SMOLLM2 = Path(os.environ.get("NEURON_CACHE") or Path.home() / ".cache" / "neuron").expanduser() / "smollm2-135m"


def _prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    from neuron.dataset import PromptSource

    rng = random.Random(seed)
    source = PromptSource.default()
    out = []
    while len(out) < n:
        ids = tokenizer(source.sample_span(rng, 4 * length, 8 * length)).input_ids[:length]
        if len(ids) == length:
            out.append(ids)
    return out


def _jobs(prompts: list[list[int]], new_tokens: int, sampler: Sampler) -> list[GenerateJob]:
    return [GenerateJob(tuple(p), new_tokens, SamplingParams(temperature=0.8, top_k=50, seed=100 + i, sampler=sampler),
                        logprobs_topn=1) for i, p in enumerate(prompts)]


# (temperature, top_k, top_p) cycled over the agreement requests: greedy, top-k, nucleus, whole vocabulary.
AGREEMENT_SAMPLINGS = [(0.0, 0, 1.0), (0.7, 50, 1.0), (1.0, 0, 0.9), (1.3, 0, 1.0), (0.5, 5, 0.8), (1.0, 0, 1.0)]


def _agreement_jobs(prompts: list[list[int]], new_tokens: int) -> list[GenerateJob]:
    jobs = []
    for i, p in enumerate(prompts):
        t, k, top_p = AGREEMENT_SAMPLINGS[i % len(AGREEMENT_SAMPLINGS)]
        sp = SamplingParams(temperature=t, top_k=k, top_p=top_p, seed=7000 + i, sampler=Sampler.GUMBEL_V1)
        jobs.append(GenerateJob(tuple(p), new_tokens, sp))
    return jobs


async def _through_engine(engine, jobs: list[GenerateJob]) -> tuple[float, list[list[int]]]:
    async def one(job):
        return [s.token_id async for s in engine.generate(job)]

    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(j) for j in jobs))
    return sum(map(len, tokens)) / (time.perf_counter() - start), tokens


async def _through_async_llm(engine, jobs: list[GenerateJob]) -> float:
    """The same requests straight into vLLM's AsyncLLM (the engine's own, streaming deltas): what the
    engine layer adds on top of it is the difference."""
    from vllm.inputs import TokensPrompt

    async def one(i, job):
        made = 0
        async for out in engine.async_llm.generate(TokensPrompt(prompt_token_ids=list(job.prompt_ids)),
                                                   engine.sampling_params(job), f"bench-{i}-{time.perf_counter()}"):
            made += len(out.outputs[0].token_ids)
        return made

    start = time.perf_counter()
    made = await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))
    return sum(made) / (time.perf_counter() - start)


def _through_llm(llm, engine, jobs: list[GenerateJob]) -> float:
    from vllm.inputs import TokensPrompt

    from vllm.sampling_params import RequestOutputKind

    params = [engine.sampling_params(j) for j in jobs]  # the very vLLM parameters the engine sends
    for p in params:
        p.output_kind = RequestOutputKind.FINAL_ONLY  # LLM.generate returns finished requests only
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(j.prompt_ids)) for j in jobs], params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def _through_hf(lm, jobs: list[GenerateJob]) -> float:
    made, start = 0, time.perf_counter()
    for j in jobs:
        ids = torch.tensor([list(j.prompt_ids)])
        with torch.inference_mode():
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=j.max_new_tokens,
                                    min_new_tokens=j.max_new_tokens, do_sample=True, top_k=50, temperature=0.8,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        made += out.shape[1] - ids.shape[1]
    return made / (time.perf_counter() - start)


def agreement(lm, jobs: list[GenerateJob], tokens: list[list[int]]) -> dict:
    """How many of the engine's gumbel-v1 tokens differ from sampler.choose over the HF model's logits
    teacher-forced over them, and the largest score gap at a difference (a near-tie when tiny)."""
    total = differing = 0
    worst_gap = 0.0
    for job, toks in zip(jobs, tokens):
        with torch.inference_mode():
            logits = lm.model(torch.tensor([list(job.prompt_ids) + toks])).logits[0].float()
        n = len(job.prompt_ids)
        logits = logits[n - 1:n - 1 + len(toks)]
        sp = job.sampling
        rp = S.RowParams.build([(sp.temperature, sp.top_k, sp.top_p, sp.seed, t) for t in range(len(toks))])
        want = S.choose(logits, rp).tolist()
        scores, _ = S.perturbed_scores(logits, rp)
        for t, (got, exp) in enumerate(zip(toks, want)):
            total += 1
            if got != exp:
                differing += 1
                worst_gap = max(worst_gap, float(scores[t, exp] - scores[t, got]))
    return {"key": "gumbel_agreement", "label": "gumbel-v1 tokens: vLLM engine vs sampler.choose over HF logits",
            "tokens": total, "differing": differing, "worst_score_gap": worst_gap}


PROCESSOR_SETTINGS = {"top_k 50": [(0.8, 50, 1.0)], "whole vocabulary": [(1.0, 0, 1.0)], "top_p 0.9": [(1.0, 0, 0.9)],
                      "mixed rows": [(0.8, 50, 1.0), (1.0, 0, 0.9), (1.0, 0, 1.0), (0.0, 0, 1.0), (0.7, 40, 0.95)]}


def processor_cost(rows: int, vocab: int, step_ms: float = 0.0, reps: int = 20) -> list[dict]:
    """Milliseconds per decode step of the processor's function alone, `rows` seeded rows of `vocab` logits
    (randn * 3: flatter than a real model's, so the nucleus is large), and their share of a decode step.
    On the CPU with the threads vLLM's worker runs it with: all cores but the one vLLM reserves."""
    from neuron.engine.vllm_sampler import force_choice

    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    try:
        return _processor_cost(force_choice, device, rows, vocab, step_ms, reps)
    finally:
        torch.set_num_threads(threads)


def _processor_cost(force_choice, device: str, rows: int, vocab: int, step_ms: float, reps: int) -> list[dict]:
    out = []
    for label, settings in PROCESSOR_SETTINGS.items():
        logits = torch.randn(rows, vocab, device=device) * 3
        times = []
        for step in range(reps):
            x = logits.clone()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            force_choice(x, {i: (*settings[i % len(settings)], 1000 + i, step) for i in range(rows)})
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        ms = statistics.median(times)
        out.append({"key": f"gumbel_processor_ms_{label.replace(' ', '_')}",
                    "label": f"gumbel-v1 processor, {rows} rows x {vocab} logits, {label}: ms per step",
                    "ms": ms, "share": ms / step_ms if step_ms else None, "target": "<= 0.1",
                    "met": ms / step_ms <= 0.1 if step_ms else None})
    return out


async def run_agreement(model: str, config: VllmConfig, requests: int, new_tokens: int, prompt_len: int) -> list[dict]:
    """Only the agreement count, over `requests` seeded generations run concurrently."""
    from neuron.engine.vllm import VllmEngine
    from neuron.model import load_model

    engine = VllmEngine(model, config, queue_size=max(256, requests))
    await engine.start()
    try:
        jobs = _agreement_jobs(_prompts(engine.tokenizer, requests, prompt_len, seed=2), new_tokens)
        _, tokens = await _through_engine(engine, jobs)
    finally:
        await engine.stop()
    lm = load_model(model, device="cuda" if torch.cuda.is_available() else "cpu", dtype="auto")
    return [await asyncio.to_thread(agreement, lm, jobs, tokens)]


async def run(model: str, config: VllmConfig, requests: int, new_tokens: int, prompt_len: int, reps: int) -> list[dict]:
    from vllm import LLM

    from neuron.engine.vllm import VllmEngine, engine_args
    from neuron.model import load_model

    engine = VllmEngine(model, config, queue_size=max(256, requests))
    await engine.start()
    args = engine_args(model, config)
    llm = LLM(**{f: getattr(args, f) for f in ("model", "dtype", "gpu_memory_utilization", "tensor_parallel_size",
                                               "enforce_eager", "max_num_seqs", "max_logprobs", "logprobs_mode",
                                               "logits_processors", "generation_config", "seed", "max_model_len",
                                               "kv_cache_memory_bytes")})
    lm = load_model(model, device="cuda" if torch.cuda.is_available() else "cpu", dtype="auto")
    figures = []
    try:
        prompts = _prompts(engine.tokenizer, requests, prompt_len)
        kinds = (Sampler.GUMBEL_V1, Sampler.ANY)
        jobs = {kind: _jobs(prompts, new_tokens, kind) for kind in kinds}
        runs = {(kind, what): [] for kind in kinds for what in ("engine", "async_llm", "llm", "hf")}
        for rep in range(reps + 1):  # the first round warms every path up and is not counted
            for kind in kinds:
                got = {"engine": (await _through_engine(engine, jobs[kind]))[0],
                       "async_llm": await _through_async_llm(engine, jobs[kind]),
                       "llm": await asyncio.to_thread(_through_llm, llm, engine, jobs[kind]),
                       "hf": await asyncio.to_thread(_through_hf, lm, jobs[kind][:2])}
                for what, value in got.items():
                    if rep:
                        runs[kind, what].append(value)
        size = f"{requests} x {new_tokens} tokens"
        for kind in kinds:
            name = kind.value
            eng = runs[kind, "engine"]
            figures.append(Figure.paired(f"vllm_engine_vs_async_llm_{name}", f"{size}, {name}: VllmEngine / vLLM "
                                         "AsyncLLM streaming", eng, runs[kind, "async_llm"], "tok/s", ">= 0.9").as_dict())
            figures.append(Figure.paired(f"vllm_engine_vs_llm_{name}", f"{size}, {name}: VllmEngine / vllm.LLM.generate",
                                         eng, runs[kind, "llm"], "tok/s", ">= 0.9").as_dict())
            figures.append(Figure.paired(f"vllm_engine_vs_hf_{name}", f"{size}, {name}: VllmEngine / HF generate "
                                         "(one request after another)", eng, runs[kind, "hf"], "tok/s").as_dict())
        figures.append(Figure.paired("vllm_engine_gumbel_vs_llm_own_sampler", f"{size}: VllmEngine gumbel-v1 / "
                                     "vllm.LLM.generate with vLLM's sampler", runs[Sampler.GUMBEL_V1, "engine"],
                                     runs[Sampler.ANY, "llm"], "tok/s", ">= 0.95").as_dict())
        figures.append(Figure.paired("vllm_gumbel_vs_own_sampler", f"{size}: VllmEngine gumbel-v1 / VllmEngine vLLM's "
                                     "sampler", runs[Sampler.GUMBEL_V1, "engine"], runs[Sampler.ANY, "engine"],
                                     "tok/s").as_dict())
        # A step of `requests` rows with vLLM's own sampler (prefill amortised in), on the fastest of the three
        # paths: the shortest step, so the processor's share is not flattered by a slow path.
        step_ms = 1e3 * requests / max(statistics.median(runs[Sampler.ANY, w]) for w in ("engine", "async_llm", "llm"))
        figures.append({"key": "vllm_decode_step_ms", "label": f"a step of {requests} rows with vLLM's sampler (the "
                        "fastest path): ms", "ms": step_ms})
        figures += processor_cost(requests, engine.info().vocab_size, step_ms)
        jobs = _agreement_jobs(_prompts(engine.tokenizer, requests, prompt_len, seed=1), new_tokens)
        _, tokens = await _through_engine(engine, jobs)
        figures.append(await asyncio.to_thread(agreement, lm, jobs, tokens))
    finally:
        await engine.stop()
        llm.llm_engine.engine_core.shutdown()
    return figures


def print_table(figures: list[dict]) -> None:
    for f in figures:
        if f.get("share") is not None:
            met = "met" if f["met"] else "NOT met"
            print(f"{f['label']:<80} {f['ms']:9.2f} ms = {f['share']:6.1%} of a step  {f['target']} {met}")
        elif "ms" in f:
            print(f"{f['label']:<80} {f['ms']:9.2f} ms")
        elif "ratio" in f:
            met = {True: "met", False: "NOT met", None: ""}[f["met"]]
            print(f"{f['label']:<80} {f['a']:9.1f} / {f['b']:9.1f} {f['unit']:<6} = {f['ratio']:5.2f} "
                  f"{f['target']} {met}")
        else:
            print(f"{f['label']:<80} {f['differing']} of {f['tokens']} differ (worst score gap "
                  f"{f['worst_score_gap']:.2e})")


def main(c: BenchConfig, argv: list[str]) -> int:
    """`neuron bench --engine.backend vllm` (neuron/cli.py hands over here)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    b, model = c.bench, c.model.name or str(SMOLLM2)
    config = dataclasses.replace(c.engine.vllm, max_num_seqs=max(c.engine.vllm.max_num_seqs, b.requests))
    if b.agreement_only:
        figures = asyncio.run(run_agreement(model, config, b.requests, b.new_tokens, b.prompt_len))
    else:
        figures = asyncio.run(run(model, config, b.requests, b.new_tokens, b.prompt_len, b.reps or 5))
    print_table(figures)
    if b.json:
        Path(b.json).write_text(json.dumps(figures, indent=2))
    return 0
