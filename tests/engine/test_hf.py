"""What the HF engine promises beyond the contract: merged forwards, slots that free and never drift,
one bad sequence failing alone, and a broken device taking the whole engine down."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from conftest import FailsOn, PoisonRows
from neuron.config import BatchingConfig
from neuron.engine.hf import HFEngine
from neuron.engine.types import FinishReason, ForwardJob, GenerateJob
from neuron.errors import NeuronError, Unavailable
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
    while engine.stats().queued < len(jobs):  # queued before the engine starts
        await asyncio.sleep(0.001)
    await engine.start()
    try:
        outs = await asyncio.gather(*futures)
    finally:
        await engine.stop()
    assert engine.stats().forward_batches == 1 and engine.stats().forward_rows == 4
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
    assert engine.stats().joins >= 1


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
        assert engine.stats().running == 0
    finally:
        await engine.stop()


async def test_a_bug_fails_its_callers_but_a_device_error_kills_the_engine(tiny):
    """An ordinary error in a step fails that step's callers and the engine serves on; a CUDA error leaves
    the device unusable, so the engine is dead: the running, the queued and any new work get Unavailable."""
    bug, device = ids_of(tiny, "~")[-1], ids_of(tiny, "zq")[-1]
    model = FailsOn(FailsOn(tiny.model, device), bug, RuntimeError, "a bug")
    engine = HFEngine(dataclasses.replace(tiny, model=model), BatchingConfig(max_generate_batch=1), 128)
    await engine.start()
    try:
        with pytest.raises(NeuronError, match="the forward pass failed"):
            await engine.forward(ForwardJob(torch.tensor([ids_of(tiny, "~")]), None, 1))
        assert engine.dead_reason() is None
        assert len(await collect(engine.generate(GenerateJob(ids_of(tiny, "Fine"), 3)))) == 3

        running = engine.generate(GenerateJob(ids_of(tiny, "Fine"), 120))
        await running.__anext__()
        queued = engine.generate(GenerateJob(ids_of(tiny, "Fine"), 3))  # waits: one generation at a time
        fatal = engine.forward(ForwardJob(torch.tensor([ids_of(tiny, "zq")]), None, 1))
        results = await asyncio.gather(collect(running), collect(queued), fatal, return_exceptions=True)
        assert [type(r) for r in results] == [Unavailable] * 3, results
        assert "AcceleratorError: CUDA error" in engine.dead_reason()
        with pytest.raises(Unavailable, match="the engine has stopped"):
            engine.generate(GenerateJob(ids_of(tiny, "Fine"), 3))
    finally:
        await engine.stop()


def test_the_whole_buffer_step_a_cuda_graph_replays_equals_the_windowed_step(tiny):
    """A CUDA graph captures `forward_step` over every column of the KV ring (its shapes never change);
    eager decoding attends over the columns in use. On the CPU, the same code path as the graph's, run
    eagerly beside the windowed one through joins, leaves and the ring wrapping round, picks the same
    tokens with the same logprobs."""
    from neuron.engine.runner import Runner
    from neuron.engine.types import SamplingParams

    from conftest import WholeBufferStep as WholeBuffer

    windowed, whole = Runner(tiny, 4, 24, cuda_graphs=False), Runner(tiny, 4, 24, cuda_graphs=False)
    whole.graphs = WholeBuffer(whole)
    sampled = SamplingParams(temperature=0.8, top_k=20)
    steps = {"windowed": [], "whole": []}
    for name, r in (("windowed", windowed), ("whole", whole)):
        out, wrapped = steps[name], False
        out.append(r.prefill([0, 1], [[5, 6, 7], [8, 9, 10, 11, 12]], [SamplingParams(), sampled], [0, 0], [1, 2]))
        for plan in ("leave 1", "join 1", "leave 0", "join 0", "", ""):
            for _ in range(6 if plan else 4):
                out.append(r.decode())
                wrapped = wrapped or min(r.first.values()) // r.max_len != r.tick // r.max_len
            if plan == "leave 1":
                r.release(1)
            elif plan == "join 1":
                out.append(r.prefill([1], [[13, 14, 15, 16]], [sampled], [0], [3]))  # joins slot 0's batch
            elif plan == "leave 0":
                r.release(0)
            elif plan == "join 0":
                out.append(r.prefill([0], [[17, 18]], [sampled], [0], [4]))
        for slot in list(r.params):
            r.release(slot)
        assert wrapped  # sequences ran on while the ring wrapped round the buffer
    for a, b in zip(steps["windowed"], steps["whole"], strict=True):
        assert a.slots == b.slots and a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
