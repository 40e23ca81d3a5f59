"""The model worker: merged forwards and batched generations answer as if each ran alone."""

import asyncio

import pytest
import torch

from neuron.batching import ModelWorker
from neuron.config import BatchingConfig
from neuron.generation import LENGTH, STOP_SEQUENCE, Decoder, GenParams
from neuron.model import ForwardJob, forward_topk


async def until(condition, what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


@pytest.fixture
async def worker(request, tiny):
    """A started worker over the tiny model; `@pytest.mark.parametrize("worker", [{...}], indirect=True)` sets batching."""
    w = ModelWorker(tiny, BatchingConfig(**getattr(request, "param", {}))).start()
    yield w
    await asyncio.to_thread(w.stop)


async def collect(gen) -> list:
    return [step async for step in gen]


def ids_of(lm, text: str) -> list[int]:
    return lm.tokenizer(text).input_ids


async def test_concurrent_forwards_run_as_one_batch_and_equal_the_direct_call(lm):
    tok = lm.tokenizer
    jobs = [ForwardJob(torch.tensor([tok("a short one").input_ids]), None, 5),
            ForwardJob(torch.tensor([tok("a much longer sentence than the first one").input_ids]), [0, 3, 5], 7),
            ForwardJob(torch.tensor([tok("a first row").input_ids[:3], tok("and a second").input_ids[:3]]), None, 3, True),
            ForwardJob(torch.tensor([tok("x").input_ids]), [0], 1)]
    worker = ModelWorker(lm, BatchingConfig(max_wait_ms=0.0))
    futures = [asyncio.ensure_future(worker.forward(j)) for j in jobs]
    await until(lambda: worker._pending == len(jobs), "every job to queue")  # before the worker starts
    worker.start()
    try:
        outs = await asyncio.gather(*futures)
    finally:
        await asyncio.to_thread(worker.stop)
    assert worker.batches_run == 1 and worker.batch_rows == {5: 1}  # every job in one model call
    for job, out in zip(jobs, outs):
        alone = forward_topk(lm, job.input_ids, job.positions, job.topk, job.want_hidden)
        assert torch.equal(out.topk_ids, alone.topk_ids)
        assert torch.allclose(out.topk_logprobs, alone.topk_logprobs, atol=1e-4)
        assert torch.allclose(out.rest_mass, alone.rest_mass, atol=1e-4)
        assert (out.hidden is None) == (not job.want_hidden)
        if job.want_hidden:
            assert torch.allclose(out.hidden, alone.hidden, atol=1e-4)


async def test_forwards_over_the_token_budget_are_split_into_several_batches(tiny):
    worker = ModelWorker(tiny, BatchingConfig(max_wait_ms=0.0, max_batch_tokens=8))
    jobs = [ForwardJob(torch.tensor([ids_of(tiny, "four tokens or so")[:4]]), None, 2) for _ in range(5)]
    futures = [asyncio.ensure_future(worker.forward(j)) for j in jobs]
    await until(lambda: worker._pending == len(jobs), "every job to queue")
    worker.start()
    try:
        outs = await asyncio.gather(*futures)
    finally:
        await asyncio.to_thread(worker.stop)
    assert worker.batch_rows == {2: 2, 1: 1}  # 2 rows x 4 tokens fill the budget of 8
    assert all(torch.equal(o.topk_ids, outs[0].topk_ids) for o in outs)


GENERATIONS = [
    ("Once upon a time", GenParams(max_new_tokens=40)),  # still decoding when the others arrive
    ("Hi", GenParams(max_new_tokens=3, logprobs_topn=4)),
    ("Numbers: 1, 2, 3,", GenParams(max_new_tokens=9, repetition_penalty=1.3)),
    ("The capital of France is", GenParams(max_new_tokens=6, temperature=0.7, top_k=20, seed=5)),
]


async def test_concurrent_generations_each_equal_their_solo_run_and_join_between_steps(lm):
    worker = ModelWorker(lm, BatchingConfig()).start()
    try:
        solo = [await collect(worker.generate(ids_of(lm, p), params)) for p, params in GENERATIONS]
        assert worker.joins == 0
        first = worker.generate(ids_of(lm, GENERATIONS[0][0]), GENERATIONS[0][1])
        head = [await first.__anext__(), await first.__anext__()]  # the first is decoding now
        rest = [collect(worker.generate(ids_of(lm, p), params)) for p, params in GENERATIONS[1:]]
        together = [head + await collect(first)] + list(await asyncio.gather(*rest))
    finally:
        await asyncio.to_thread(worker.stop)
    assert worker.joins >= 1  # at least one sequence joined a batch that was already decoding
    for alone, batched in zip(solo, together):
        assert [s.token_id for s in batched] == [s.token_id for s in alone]
        assert torch.allclose(torch.tensor([s.logprob for s in batched]), torch.tensor([s.logprob for s in alone]),
                              atol=1e-4)
        assert [s.top_ids for s in batched] == [s.top_ids for s in alone]
        assert "".join(s.text for s in batched) == "".join(s.text for s in alone)
        assert batched[-1].finish_reason == alone[-1].finish_reason is not None


async def test_a_cancelled_generation_leaves_without_stalling_the_others(tiny, worker):
    long = worker.generate(ids_of(tiny, "Cancel me"), GenParams(max_new_tokens=200))
    await long.__anext__()
    short = asyncio.ensure_future(collect(worker.generate(ids_of(tiny, "Keep me"), GenParams(max_new_tokens=20))))
    await until(lambda: len(worker._active) == 2, "both sequences to decode together")
    long.cancel()
    rest = await asyncio.wait_for(collect(long), 30)  # the stream ends between steps
    done = await asyncio.wait_for(short, 30)
    assert len(rest) < 199 and len(done) == 20 and done[-1].finish_reason == LENGTH
    await until(lambda: not worker._active and not len(worker._decoder), "the decoder to empty")


@pytest.mark.parametrize("worker", [{"max_generate_batch": 2}], indirect=True)
async def test_a_finished_sequence_frees_its_slot_for_a_waiting_one(tiny, worker):
    events: list[tuple[str, int]] = []

    async def run(name: str, n: int):
        async for i, _ in aenumerate(worker.generate(ids_of(tiny, name), GenParams(max_new_tokens=n))):
            events.append((name, i))

    await asyncio.gather(run("quick", 2), run("slow", 40), run("waiting", 3))
    # "waiting" got no slot until "quick" finished, and then ran alongside "slow".
    assert events.index(("waiting", 0)) > events.index(("quick", 1))
    assert events.index(("waiting", 0)) < events.index(("slow", 39))
    assert worker.joins >= 1
    await until(lambda: not len(worker._decoder), "the last sequence to leave the decoder")


async def aenumerate(gen):
    i = 0
    async for item in gen:
        yield i, item
        i += 1


def text_deltas(lm, token_ids: list[int], params: GenParams) -> tuple[list[str], object]:
    """Feed tokens one at a time through the decoder's detokeniser, as decoding would."""
    decoder, deltas = Decoder(lm), []
    seq = decoder.new_sequence([0], params)
    for i, token in enumerate(token_ids):
        seq.generated.append(token)
        if i == len(token_ids) - 1 and seq.finish_reason is None:
            seq.finish_reason = LENGTH
        deltas.append(decoder._text_delta(seq))
        if seq.finished:
            break
    return deltas, seq


def test_text_deltas_hold_back_split_characters_and_add_up_to_the_decoded_text(tiny):
    text = "héllo wörld 日本語 ok"
    ids = tiny.tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tiny.tokenizer.decode([i]) for i in ids)  # characters split across tokens
    deltas, _ = text_deltas(tiny, ids, GenParams(max_new_tokens=len(ids)))
    assert "".join(deltas) == tiny.tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_a_stop_string_across_tokens_ends_the_text_before_it(tiny):
    ids = tiny.tokenizer("hello world, goodbye", add_special_tokens=False).input_ids
    deltas, seq = text_deltas(tiny, ids, GenParams(max_new_tokens=len(ids), stop=("zzz", "d, g")))
    # "d" and "d," were held back as the start of a stop string, and never sent.
    assert seq.finish_reason == STOP_SEQUENCE and "".join(deltas) == "hello worl" == seq.text


def test_text_held_back_for_a_stop_string_is_sent_when_the_generation_ends(tiny):
    ids = tiny.tokenizer("hello world", add_special_tokens=False).input_ids
    deltas, seq = text_deltas(tiny, ids, GenParams(max_new_tokens=len(ids), stop=("d, g",)))
    assert seq.finish_reason == LENGTH and "".join(deltas) == "hello world" and deltas[-1].endswith("d")
