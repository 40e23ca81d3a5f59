"""The engine contract: every backend passes these (NEURON_ENGINE_BACKENDS=hf,vllm picks which; hf by default).

Forward equals a direct model call, greedy generation equals plain generate, the seeded sampler equals
the spec recomputed over the model's own logits, reported logprobs equal a teacher-forced pass, and
streaming, cancel, deadlines and the queue bound behave. Each runs on every model the backend serves here:
the tiny OPT, SmolLM2, and the seed models' shapes in miniature (a GPT-Neo whose local window is shorter
than the prompts, and its bitsandbytes 4-bit checkpoint). Tests read `engine.stats()`, never private state.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest
import torch

from conftest import miner_config
from neuron.config import with_overrides
from neuron.engine import BACKENDS, open_engine, sampler as S
from neuron.engine.types import FinishReason, ForwardJob, GenerateJob, Sampler, SamplingParams
from neuron.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from neuron.model import forward_logprobs, forward_topk

NAMES = [b for b in os.environ.get("NEURON_ENGINE_BACKENDS", "hf").split(",") if b]


def build_engine(backend: str, lm, **overrides):
    """The backend's engine on `lm` (the HF engine serves it as loaded; vLLM loads the same checkpoint)."""
    b = BACKENDS[backend]
    config = miner_config(**{"limits.max_seq_len": 128, "batching.max_wait_ms": 0.0, "engine.backend": backend,
                             "model.name": lm.name, **b.shared_cpu, "engine.vllm.max_model_len": 128, **overrides})
    config = with_overrides(config, **{"engine.vllm.max_num_seqs": config.batching.max_generate_batch})
    return open_engine(config, lm if b.serves_loaded else None)


@pytest.fixture(params=NAMES)
def backend(request):
    return request.param


# vLLM's CPU build refuses the tiny models (head size 16): it serves SmolLM2 only.
MODELS = {"hf": ("tiny", "smollm2", "tiny_gpt_neo", "tiny_gpt_neo_4bit"), "vllm": ("smollm2",)}


@pytest.fixture(params=MODELS["hf"])
def lm(backend, request):
    """The models of the contract (this module's, in place of conftest's tiny and SmolLM2)."""
    if request.param not in MODELS.get(backend, MODELS["hf"]):
        pytest.skip(f"the {backend} backend does not serve {request.param} here")
    return request.getfixturevalue(request.param)


@pytest.fixture
def small(backend, request):
    """The smallest model the backend serves."""
    return request.getfixturevalue(BACKENDS[backend].test_model)


@pytest.fixture
async def engine(backend, lm):
    e = build_engine(backend, lm)
    await e.start()
    yield e
    await e.stop(timeout=0)


def ids_of(lm, text: str) -> tuple[int, ...]:
    return tuple(lm.tokenizer(text).input_ids)


async def collect(gen) -> list:
    return [s async for s in gen]


async def until(condition, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def seeded(t: float, k: int = 0, p: float = 1.0, seed: int = 1) -> SamplingParams:
    return SamplingParams(temperature=t, top_k=k, top_p=p, seed=seed, sampler=Sampler.GUMBEL_V1)


def recomputed(lm, prompt: tuple[int, ...], tokens: list[int], sp: SamplingParams) -> list[int]:
    """The spec's choice at every step, over the model's own logits teacher-forced over `tokens`."""
    logits = lm.model(input_ids=torch.tensor([list(prompt) + tokens]).to(lm.device)).logits[0].float()
    rows = logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    rp = S.RowParams.build([(sp.temperature, sp.top_k, sp.top_p, sp.seed, t) for t in range(len(tokens))], lm.device)
    return S.choose(rows, rp).tolist()


async def test_info_describes_the_model(engine, lm):
    info = engine.info()
    assert info.vocab_size == lm.vocab_size and info.eos_token_id == lm.eos_token_id
    assert info.max_seq_len == 128 and len(info.weights_fingerprint) == 64


async def test_concurrent_forwards_equal_the_direct_call(engine, lm):
    jobs = [ForwardJob(torch.tensor([ids_of(lm, "a short one")]), None, 5),
            ForwardJob(torch.tensor([ids_of(lm, "a much longer sentence than the first one")]), (0, 3, 5), 7),
            ForwardJob(torch.tensor([ids_of(lm, "a first row")[:3], ids_of(lm, "and a second")[:3]]), None, 3)]
    outs = await asyncio.gather(*(engine.forward(j) for j in jobs))
    for job, out in zip(jobs, outs):
        alone = forward_topk(lm, job.input_ids, job.positions, job.topk)
        assert out.topk_ids.shape == alone.topk_ids.shape
        assert torch.allclose(out.topk_logprobs, alone.topk_logprobs, atol=1e-3)
        assert torch.allclose(out.rest_mass, alone.rest_mass, atol=1e-3)


async def test_token_logprobs_are_the_next_input_tokens_under_the_full_softmax(engine, lm, backend):
    """OpenAI's echoed prompt logprobs: at each position, the actual next token's, inside the top-k or not."""
    prompt = ids_of(lm, "The capital of France is")
    ids = torch.tensor([prompt], device=lm.device)
    row = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                            do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)[0].tolist()  # a greedy tail: top-1
    rows = torch.tensor([row, row[::-1]])
    positions = tuple(range(len(row) - 1))
    out = await engine.forward(ForwardJob(rows, positions, 3, want_token_logprobs=True))
    assert out.token_logprobs.shape == (2, len(positions)) and out.token_logprobs.dtype == torch.float32
    with torch.inference_mode():
        lp = torch.log_softmax(lm.model(rows.to(lm.device)).logits.float(), dim=-1).cpu()
    want = lp[:, :-1].gather(-1, rows[:, 1:, None]).squeeze(-1)
    assert torch.allclose(out.token_logprobs, want, atol=BACKENDS[backend].logprob_atol)
    inside = (out.topk_ids == rows[:, 1:, None]).any(-1)
    assert inside.any() and not inside.all()
    plain = await engine.forward(ForwardJob(rows, positions, 3))
    assert plain.token_logprobs is None
    for bad in (None, (0, len(row) - 1)):  # the last position has no next token
        with pytest.raises(InvalidArgument, match="no next token"):
            await engine.forward(ForwardJob(rows, bad, 3, want_token_logprobs=True))


async def test_greedy_generation_equals_plain_generate_and_reports_raw_logprobs(engine, lm):
    prompt = ids_of(lm, "The capital of France is")
    ids = torch.tensor([prompt], device=lm.device)
    ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            pad_token_id=lm.tokenizer.pad_token_id)[0, len(prompt):].tolist()
    steps = await collect(engine.generate(GenerateJob(prompt, 12, logprobs_topn=3)))
    got = [s.token_id for s in steps]
    assert got == ref[:len(got)] and steps[-1].finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    assert all(s.finish_reason is None for s in steps[:-1])
    lp = forward_logprobs(lm, torch.tensor([list(prompt) + got]))[0].cpu()
    want = lp[0, len(prompt) - 1:-1].gather(-1, torch.tensor(got)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor([s.logprob for s in steps]), want, atol=1e-3)
    assert all(len(s.top_ids) == 3 and s.top_ids[0] == s.token_id for s in steps)  # greedy: the top one


@pytest.mark.parametrize("sp", [seeded(0.7, 50), seeded(1.0), seeded(0.8, 0, 0.9), seeded(1.3, 20, 0.95)],
                         ids=["T0.7-k50", "T1", "T0.8-p0.9", "T1.3-k20-p0.95"])
async def test_seeded_generation_is_the_spec_recomputed_over_the_model(engine, lm, sp):
    prompt = ids_of(lm, "Once upon a time")
    steps = await collect(engine.generate(GenerateJob(prompt, 16, sp)))
    tokens = [s.token_id for s in steps]
    assert tokens == recomputed(lm, prompt, tokens, sp)


async def test_reported_logprobs_equal_a_teacher_forced_pass_past_the_local_window(engine, lm, backend):
    """Each step's logprob and top-n are those of one pass over prompt + answer; for GPT-Neo the answer runs far
    past its local window (its decode steps attend to a window of cached keys, the pass to a window of inputs)."""
    prompt = ids_of(lm, "Once upon a time there was")
    steps = await collect(engine.generate(GenerateJob(prompt, 40, seeded(0.9, seed=7), logprobs_topn=3)))
    tokens = [s.token_id for s in steps]
    window = getattr(lm.model.config, "window_size", None)
    assert window is None or len(prompt) + len(tokens) > 4 * window
    lp = forward_logprobs(lm, torch.tensor([list(prompt) + tokens]))[0].cpu()
    rows = lp[0, len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    atol = max(1e-4, BACKENDS[backend].logprob_atol)  # a long generation: float32 steps add up past 1e-5
    want = rows.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor([s.logprob for s in steps]), want, atol=atol)
    top = rows.topk(3, dim=-1)
    assert torch.allclose(torch.tensor([s.top_logprobs for s in steps]), top.values, atol=atol)


async def test_generations_joining_a_running_batch_answer_as_if_alone(engine, lm, backend):
    cases = [(ids_of(lm, "Once upon a time"), GenerateJob(ids_of(lm, "Once upon a time"), 30)),
             (None, GenerateJob(ids_of(lm, "Hi"), 3, logprobs_topn=4)),
             (None, GenerateJob(ids_of(lm, "The capital of France is"), 8, seeded(0.7, 20, seed=5))),
             (None, GenerateJob(ids_of(lm, "Numbers: 1, 2, 3,"), 9, seeded(1.0, seed=9)))]
    solo = [await collect(engine.generate(job)) for _, job in cases]
    hf = backend == "hf"  # only the HF engine counts joins and reserves KV bytes
    joins = engine.stats().joins if hf else 0
    first = engine.generate(cases[0][1])
    head = [await first.__anext__(), await first.__anext__()]  # decoding now
    rest = await asyncio.gather(*(collect(engine.generate(job)) for _, job in cases[1:]))
    together = [head + await collect(first)] + list(rest)
    assert not hf or engine.stats().joins > joins
    for alone, batched in zip(solo, together):
        assert [s.token_id for s in batched] == [s.token_id for s in alone]
        assert torch.allclose(torch.tensor([s.logprob for s in batched]), torch.tensor([s.logprob for s in alone]),
                              atol=1e-3)
        assert batched[-1].finish_reason == alone[-1].finish_reason is not None


async def test_closing_a_generation_aborts_it_and_frees_its_slot(engine, lm):
    long = engine.generate(GenerateJob(ids_of(lm, "Cancel me"), 100))
    await long.__anext__()
    short = asyncio.ensure_future(collect(engine.generate(GenerateJob(ids_of(lm, "Keep me"), 20))))
    await until(lambda: engine.stats().running == 2, "both to decode together")
    await long.aclose()
    done = await asyncio.wait_for(short, 60)
    assert len(done) == 20 and done[-1].finish_reason == FinishReason.LENGTH
    await until(lambda: engine.stats().running == 0, "the engine to empty")
    assert await collect(long) == []


async def test_cancelling_at_every_point_of_a_step_never_disturbs_the_others(backend, small):
    """Cancels land before, during and after steps, at random; the survivors answer exactly as alone."""
    engine = build_engine(backend, small, **{"batching.max_generate_batch": 4})
    await engine.start()
    try:
        keep = GenerateJob(ids_of(small, "Keep going"), 40, seeded(0.9, 30, seed=3))
        solo = [s.token_id for s in await collect(engine.generate(keep))]
        rng = random.Random(0)

        async def victim(i: int):
            gen = engine.generate(GenerateJob(ids_of(small, f"victim {i}"), 60))
            try:
                async for _ in gen:
                    if rng.random() < 0.3:
                        break
                    await asyncio.sleep(rng.random() * 0.003)
            finally:
                await gen.aclose()

        async def cancel_while_queued(i: int):
            gen = engine.generate(GenerateJob(ids_of(small, f"queued {i}"), 5))
            await asyncio.sleep(rng.random() * 0.002)
            await gen.aclose()

        keepers = [asyncio.ensure_future(collect(engine.generate(keep))) for _ in range(2)]
        await asyncio.gather(*(victim(i) for i in range(12)), *(cancel_while_queued(i) for i in range(12)))
        for k in keepers:
            assert [s.token_id for s in await asyncio.wait_for(k, 60)] == solo
        await until(lambda: engine.stats().running == 0 and engine.stats().queued == 0, "the engine to empty")
        assert backend != "hf" or engine.stats().kv_bytes_reserved == 0
    finally:
        await engine.stop(timeout=0)


async def test_a_full_queue_is_refused_at_once(backend, small):
    """With every slot busy and the queue full, more generations are refused with ResourceExhausted, when
    asked for or at their first step, at once; at most slots + queue_size are ever in hand."""
    engine = build_engine(backend, small, **{"batching.queue_size": 2, "batching.max_generate_batch": 1})
    await engine.start()
    try:
        running = engine.generate(GenerateJob(ids_of(small, "x"), 100))
        await running.__anext__()
        accepted, refused = [], 0
        for _ in range(4):
            try:
                gen = engine.generate(GenerateJob(ids_of(small, "y"), 5))
            except ResourceExhausted:
                refused += 1
                continue
            accepted.append((gen, asyncio.ensure_future(gen.__anext__())))
        await asyncio.sleep(0.5)
        refused += sum(t.done() and isinstance(t.exception(), ResourceExhausted) for _, t in accepted)
        assert refused >= 2  # at most queue_size (2) of the 4 wait
        for gen, task in accepted:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await gen.aclose()
        await running.aclose()
    finally:
        await engine.stop(timeout=0)


async def test_deadlines_in_the_queue_and_during_generation(backend, small):
    engine = build_engine(backend, small, **{"batching.max_generate_batch": 1})
    await engine.start()
    try:
        busy = engine.generate(GenerateJob(ids_of(small, "busy"), 100))
        await busy.__anext__()
        late = engine.generate(GenerateJob(ids_of(small, "late"), 5), deadline=time.monotonic() + 0.01)
        with pytest.raises(DeadlineExceeded):
            await collect(late)
        await busy.aclose()
        slow = engine.generate(GenerateJob(ids_of(small, "slow"), 100), deadline=time.monotonic() + 0.05)
        with pytest.raises(DeadlineExceeded):
            await collect(slow)
        await until(lambda: engine.stats().running == 0, "the engine to empty")
    finally:
        await engine.stop(timeout=0)
