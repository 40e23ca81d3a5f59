"""The HF engine on CUDA in float16 and float32: the seeded sampler over the engine's own logits, CUDA-graph
capture at every bucket with replays equal to the eager step through joins, leaves and the ring wrapping,
and cancels landing while graphs replay."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from conftest import cuda_model, needs_cuda
from neuron.config import BatchingConfig
from neuron.engine import sampler as S
from neuron.engine.hf import HFEngine
from neuron.engine.runner import Runner
from neuron.engine.types import GenerateJob, Sampler, SamplingParams

pytestmark = [pytest.mark.cuda, needs_cuda]

DTYPES = ("float16", "float32")
# Replays equal to the eager step: the same kernels over the same shapes, so the tolerance is the dtype's
# rounding of a logprob, not of a different computation.
ATOL = {"float16": 2e-3, "float32": 1e-5}


def seeded(t: float, k: int = 0, p: float = 1.0, seed: int = 1) -> SamplingParams:
    return SamplingParams(temperature=t, top_k=k, top_p=p, seed=seed, sampler=Sampler.GUMBEL_V1)


class Recording:
    """The production sampler, keeping what it was given and what it chose (on the host) at every step."""

    def __init__(self):
        self.steps: list[tuple[torch.Tensor, S.RowParams, torch.Tensor]] = []

    def __call__(self, logits: torch.Tensor, rp: S.RowParams) -> torch.Tensor:
        tokens = S.choose(logits, rp)
        host = S.RowParams(rp.temperature.cpu(), rp.top_k.cpu(), rp.top_p.cpu(), rp.seed.cpu(), rp.step.cpu(),
                           rp.any_sampled, rp.max_top_k, rp.all_top_k, rp.any_top_p, rp.any_unfiltered)
        self.steps.append((logits.float().cpu(), host, tokens.cpu()))
        return tokens


@pytest.mark.parametrize("dtype", DTYPES)
async def test_seeded_tokens_are_the_spec_over_the_engines_own_logits(dtype):
    """Every step's tokens, chosen on the GPU, are the spec's choice recomputed on the CPU over the very
    logits the engine had, for a batch mixing greedy and seeded requests joining as others decode."""
    lm = cuda_model("tiny", dtype)
    record = Recording()
    engine = HFEngine(lm, BatchingConfig(max_generate_batch=8, max_wait_ms=0.0), 128, choose=record)
    await engine.start()
    try:
        params = [seeded(0.7, 50, seed=1), seeded(1.0, seed=2), seeded(0.8, 0, 0.9, seed=3),
                  seeded(1.3, 20, 0.95, seed=4), SamplingParams(), seeded(0.7, 50, 0.9, seed=6)]
        ids = lm.tokenizer("Once upon a time").input_ids

        async def run(i: int, p: SamplingParams) -> list[int]:
            await asyncio.sleep(0.01 * i)  # later ones join a running batch
            return [s.token_id async for s in engine.generate(GenerateJob(tuple(ids[: 2 + i]), 24, p))]

        answers = await asyncio.gather(*(run(i, p) for i, p in enumerate(params)))
    finally:
        await engine.stop()
    assert all(len(a) > 0 for a in answers) and record.steps
    for logits, rp, tokens in record.steps:
        assert torch.equal(S.choose(logits, rp), tokens)
    assert engine.stats().joins >= 1


def _drive(r: Runner, sampled: SamplingParams) -> list:
    """Prefill and decode through every bucket (1, 2, 4, 8, 16) with joins while decoding, then leaves that
    shrink the bucket again while the write column wraps round the ring's 32 columns."""
    out = [r.prefill([0], [[5, 6, 7]], [SamplingParams()], [0], [1])]
    for slots in ([1], [2, 3], [4, 5, 6, 7], list(range(8, 16))):
        for _ in range(3):
            out.append(r.decode())
        out.append(r.prefill(slots, [[8 + s, 9, 10 + s % 3][: 1 + s % 3] for s in slots], [sampled] * len(slots),
                             [0] * len(slots), [100 + s for s in slots]))
    for leave, steps in (([0, 1, *range(8, 16)], 8), ([4, 5, 6, 7], 8), ([], 3)):
        for _ in range(steps):
            out.append(r.decode())
        for s in leave:
            r.release(s)
    assert r.tick > r.max_len  # the ring wrapped, no sequence spanning more than its columns
    for slot in list(r.params):
        r.release(slot)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_bucket_is_captured_and_replays_equal_the_eager_step(dtype):
    """A runner replaying CUDA graphs and one running the same whole-buffer step eagerly pick the same tokens
    with the same logprobs through joins, leaves and the ring wrapping; every bucket was captured, none failed."""
    lm = cuda_model("tiny", dtype)

    from conftest import WholeBufferStep as EagerWholeBuffer

    graphs, eager = Runner(lm, 16, 32), Runner(lm, 16, 32, cuda_graphs=False)
    eager.graphs = EagerWholeBuffer(eager)
    sampled = SamplingParams(temperature=0.8, top_k=20)
    replayed, computed = _drive(graphs, sampled), _drive(eager, sampled)
    atol = ATOL[dtype]
    if lm.device.type == "cuda":
        assert not graphs.graphs.off and sorted(graphs.graphs.graphs) == [1, 2, 4, 8, 16]
    else:  # a dry run on the CPU compares the windowed eager step: other shapes, other rounding
        atol *= 10
    for a, b in zip(replayed, computed, strict=True):
        assert a.slots == b.slots and a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=atol)


async def test_cancels_while_graphs_replay_never_disturb_the_others():
    """Generations cancelled at random points while the decode step replays from graphs (float16, the bucket
    changing as they leave): the survivors run to their full length, every step of every row is the spec's
    choice over the engine's own logits, and the engine empties."""
    lm = cuda_model("tiny", "float16")
    record = Recording()
    engine = HFEngine(lm, BatchingConfig(max_generate_batch=8, max_wait_ms=0.0), 128, choose=record)
    await engine.start()
    try:
        keep = GenerateJob(tuple(lm.tokenizer("Keep going").input_ids), 40, seeded(0.9, 30, seed=3))
        rng = random.Random(0)

        async def victim(i: int):
            gen = engine.generate(GenerateJob(tuple(lm.tokenizer(f"victim {i}").input_ids), 60))
            try:
                async for _ in gen:
                    if rng.random() < 0.2:
                        break
                    await asyncio.sleep(rng.random() * 0.002)
            finally:
                await gen.aclose()

        async def collect(job):
            return [s async for s in engine.generate(job)]

        keepers = [asyncio.ensure_future(collect(keep)) for _ in range(2)]
        await asyncio.gather(*(victim(i) for i in range(16)))
        kept = [await asyncio.wait_for(k, 60) for k in keepers]
    finally:
        await engine.stop(timeout=0)
    assert [len(k) for k in kept] == [40, 40] and kept[-1][-1].finish_reason is not None
    for logits, rp, tokens in record.steps:
        assert torch.equal(S.choose(logits, rp), tokens)
    assert engine.stats().running == 0 and engine.stats().cancelled >= 1
