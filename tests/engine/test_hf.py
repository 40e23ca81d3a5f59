"""What the HF engine promises beyond the contract: merged forwards, slots that free and never drift,
one bad sequence failing alone."""

from __future__ import annotations

import asyncio
import dataclasses

import torch

from conftest import PoisonRows
from neuron.config import BatchingConfig
from neuron.engine.hf import HFEngine
from neuron.engine.types import FinishReason, ForwardJob, GenerateJob
from neuron.errors import NeuronError
from neuron.model import forward_topk


def ids_of(lm, text: str) -> tuple[int, ...]:
    return tuple(lm.tokenizer(text).input_ids)


async def collect(gen) -> list:
    return [s async for s in gen]


async def test_concurrent_forwards_run_as_one_model_call(lm):
    tok = lm.tokenizer
    jobs = [ForwardJob(torch.tensor([tok("a short one").input_ids]), None, 5),
            ForwardJob(torch.tensor([tok("a much longer sentence than the first one").input_ids]), (0, 3, 5), 7),
            ForwardJob(torch.tensor([tok("a first row").input_ids[:3], tok("and a second").input_ids[:3]]), None, 3, True)]
    engine = HFEngine(lm, BatchingConfig(max_wait_ms=0.0), 128)
    futures = [asyncio.ensure_future(engine.forward(j)) for j in jobs]
    while engine.stats()["queued"] < len(jobs):  # queued before the engine starts
        await asyncio.sleep(0.001)
    await engine.start()
    try:
        outs = await asyncio.gather(*futures)
    finally:
        await engine.stop()
    assert engine.stats()["forward_batches"] == 1 and engine.stats()["forward_rows"] == 4
    for job, out in zip(jobs, outs):
        alone = forward_topk(lm, job.input_ids, job.positions, job.topk, job.want_hidden)
        assert torch.equal(out.topk_ids, alone.topk_ids)
        assert torch.allclose(out.topk_logprobs, alone.topk_logprobs, atol=1e-4)
        assert (out.hidden is None) == (not job.want_hidden)
        if job.want_hidden:
            assert torch.allclose(out.hidden, alone.hidden, atol=1e-4)


async def test_a_finished_sequence_frees_its_slot_for_a_waiting_one(tiny):
    engine = HFEngine(tiny, BatchingConfig(max_generate_batch=2), 128)
    await engine.start()
    events: list[tuple[str, int]] = []

    async def run(name: str, n: int):
        i = 0
        async for _ in engine.generate(GenerateJob(ids_of(tiny, name), n)):
            events.append((name, i))
            i += 1

    try:
        await asyncio.gather(run("quick", 2), run("slow", 40), run("waiting", 3))
    finally:
        await engine.stop()
    # "waiting" got no slot until "quick" finished, and then ran alongside "slow".
    assert events.index(("waiting", 0)) > events.index(("quick", 1))
    assert events.index(("waiting", 0)) < events.index(("slow", 39))
    assert engine.stats()["joins"] >= 1


async def test_free_slots_never_walk_off_the_position_table(tiny):
    """A free slot inside the decode batch is masked, and its position stays put: three rounds of a
    120-token generation beside an idle slot go past the tiny model's 256 positions in total."""
    engine = HFEngine(tiny, BatchingConfig(max_generate_batch=2), 128)
    await engine.start()
    try:
        for _ in range(3):
            short, long = await asyncio.gather(collect(engine.generate(GenerateJob(ids_of(tiny, "a"), 2))),
                                               collect(engine.generate(GenerateJob(ids_of(tiny, "b"), 120))))
            assert len(short) == 2 and len(long) == 120 and long[-1].finish_reason == FinishReason.LENGTH
    finally:
        await engine.stop()


async def test_a_sequence_whose_logits_break_fails_alone(tiny):
    """Whatever breaks one sequence's sampling (here NaN logits) fails that request only; the rows
    decoding beside it, and the ones prefilled with it, go on."""
    poison = ids_of(tiny, "zq")[-1]
    lm = dataclasses.replace(tiny, model=PoisonRows(tiny.model, poison))
    engine = HFEngine(lm, BatchingConfig(), 128)
    await engine.start()
    try:
        alone = [s.token_id for s in await collect(engine.generate(GenerateJob(ids_of(tiny, "Fine"), 30)))]
        running = engine.generate(GenerateJob(ids_of(tiny, "Fine"), 30))
        first = await running.__anext__()
        bad = engine.generate(GenerateJob(ids_of(tiny, "zq"), 10))
        good = engine.generate(GenerateJob(ids_of(tiny, "Fine"), 30))
        results = await asyncio.gather(collect(bad), collect(good), collect(running), return_exceptions=True)
        assert isinstance(results[0], NeuronError) and "not finite" in str(results[0])
        assert [s.token_id for s in results[1]] == alone
        assert [first.token_id] + [s.token_id for s in results[2]] == alone
        assert engine.stats()["running"] == 0
    finally:
        await engine.stop()
