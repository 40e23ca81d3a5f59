"""The vLLM backend of the engine contract: vLLM v1's AsyncLLM behind the miner's own bounded queue.

Forward comes from prompt log-probabilities (the top-k at every prompt position; the last position's
from one greedy step), Generate streams vLLM's tokens with raw log-probabilities. Seeded requests
(gumbel-v1) reach vLLM as greedy with their parameters in extra_args, and `GumbelV1LogitsProcessor`
leaves only the spec's token finite, so the choice is exactly docs/sampling.md's. No hidden states.

vLLM runs its engine core in a spawned process: a script that builds this engine needs the
`if __name__ == "__main__":` guard. That process dies with the miner, however the miner ends
(`_die_with_parent`), and a dead or hung engine core makes the engine dead (`dead_reason`).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import itertools
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import torch
from loguru import logger
from vllm import SamplingParams as VSamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMError
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from neuron.engine import vllm_sampler
from neuron.engine.types import (EngineInfo, EngineStats, FinishReason, ForwardJob, ForwardResult, GenerateJob,
                                 Sampler, TokenStep)
from neuron.engine.vllm_config import HOST_MEMORY_SHARE, VllmConfig, cpu_kv_cache_bytes
from neuron.errors import DeadlineExceeded, InvalidArgument, NeuronError, ResourceExhausted, Unavailable, check
from neuron.fingerprint import checkpoint_dir, checkpoint_fingerprint, checkpoint_quantization
from neuron.model import auto_dtype, tokenizer_fingerprint


class GumbelV1LogitsProcessor(LogitsProcessor):
    """Runs in vLLM's engine core: for every request carrying gumbel-v1 arguments, the spec's token is
    the only finite logit, so vLLM's greedy pick is it. The step is the request's count of output
    tokens, read from the live list vLLM hands over when the request joins the batch."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        # vLLM builds its processors in the process that holds the model (the engine core, or each
        # tensor-parallel worker): the one place where the miner's code runs in there.
        _die_with_parent()
        # batch row -> (temperature, top_k, top_p, seed, the request's output token ids, kept up to date by vLLM)
        self.rows: dict[int, tuple[float, int, float, int, list[int]]] = {}

    @classmethod
    def validate_params(cls, params: VSamplingParams) -> None:
        args = vllm_sampler.row_args(params.extra_args)
        if args is not None and params.temperature != 0.0:
            raise ValueError("gumbel-v1 requests are sent to vLLM as greedy")

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_row(params, _prompt, output_ids):
            args = vllm_sampler.row_args(params.extra_args)
            return None if args is None else (*args, output_ids)

        process_dict_updates(self.rows, batch_update, new_row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = {i: (t, k, p, s, len(out)) for i, (t, k, p, s, out) in self.rows.items() if i < logits.shape[0]}
        return vllm_sampler.force_choice(logits, rows)


PR_SET_PDEATHSIG = 1  # linux/prctl.h
MINER_PID = "NEURON_MINER_PID"  # set by the engine in the miner, inherited by the processes vLLM starts


@functools.cache  # once per process
def _die_with_parent() -> None:
    """In a process that vLLM started: the kernel SIGKILLs it when its parent ends, however that ends
    (kill -9 and the OOM killer included), so no engine process outlives the miner holding memory; vLLM
    (0.32) alone leaves its engine core and workers running. Linux only; elsewhere a no-op.

    Where the model runs in a worker under the engine core (vLLM's multiprocess executor, used even for
    one device on the CPU), none of the miner's code runs in the engine core itself, so the worker also
    watches it: once the miner has ended, the engine core is ended, and the worker with it."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return  # the miner's own process (vLLM without multiprocessing), or no prctl
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent.pid:  # the parent ended before the prctl: no signal would ever come
        os.kill(os.getpid(), signal.SIGKILL)
    miner = int(os.environ.get(MINER_PID, "0"))
    if miner and parent.pid != miner:
        threading.Thread(target=_end_with_miner, args=(parent.pid, miner), name="neuron-lifeline", daemon=True).start()


def _end_with_miner(core: int, miner: int) -> None:
    """SIGKILL the engine core `core` once its parent is no longer `miner` (the miner ended: it was reparented)."""
    while (parent := _parent_of(core)) == miner:
        time.sleep(0.5)
    if parent is not None:
        os.kill(core, signal.SIGKILL)


def _parent_of(pid: int) -> int | None:
    """The parent's pid, from /proc; None once `pid` has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def _source(model: str) -> str:
    """A local directory as an absolute path (vLLM and transformers do not expand ~), else the HF id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def engine_args(model: str, config: VllmConfig, max_seq_len: int = 0) -> AsyncEngineArgs:
    """vLLM's engine arguments for `model` under `config` (what `neuron bench` gives LLM() too)."""
    on_cpu = not torch.cuda.is_available()
    max_len = config.max_model_len or max_seq_len
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(_source(model)).to_dict()
    kwargs = config.engine_kwargs(on_cpu, max_len, auto_dtype(hf.get("model_type", ""), not on_cpu))
    if on_cpu and "kv_cache_memory_bytes" not in kwargs:  # sized from the limits, not from a share of the host
        kwargs["kv_cache_memory_bytes"] = _cpu_kv_cache(hf, kwargs["dtype"], max_len, config.max_num_seqs)
    return AsyncEngineArgs(
        model=_source(model),
        logprobs_mode="raw_logprobs",  # logprobs of the unmodified distribution, before any processor
        logits_processors=[GumbelV1LogitsProcessor],
        generation_config="vllm",  # no sampling defaults from the checkpoint: the request says everything
        scheduling_policy="priority",  # the contract's priority (lower first: the axon passes -stake)
        seed=0,
        disable_log_stats=True,
        **kwargs,
    )


def _cpu_kv_cache(hf: dict, dtype: str, max_len: int, max_num_seqs: int) -> int:
    max_len = max_len or hf.get("max_position_embeddings") or 2048
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    size, need = cpu_kv_cache_bytes(hf, 4 if dtype == "float32" else 2, max_len, max_num_seqs, host)
    if size < need:
        logger.warning(f"vLLM on the CPU: {max_num_seqs} sequences of {max_len} tokens need a {need >> 20} MiB KV "
                       f"cache, more than {HOST_MEMORY_SHARE:.0%} of this host's memory: {size >> 20} MiB given, so "
                       "fewer sequences run at once (set --engine.vllm.kv_cache_memory_bytes to choose)")
    return size


def _neuron_error(exc: VLLMError) -> NeuronError:
    """vLLM's errors as the contract's (the axon maps those to gRPC statuses)."""
    if isinstance(exc, EngineDeadError):
        return Unavailable("the vLLM engine has stopped")
    if isinstance(exc, GracefulHTTPError):
        return ResourceExhausted(f"vLLM refused the request: {exc}")
    if isinstance(exc, VLLMClientError):
        return InvalidArgument(f"vLLM refused the request: {exc}")
    return NeuronError(f"vLLM failed: {type(exc).__name__}")


def _priority(priority: float) -> int:
    """vLLM takes integer priorities, lower first, as the contract's floats are."""
    return int(math.floor(max(-1e15, min(1e15, priority))))


def _top(entries: dict, k: int) -> tuple[list[int], list[float]]:
    """The k most likely (id, logprob) of one position's vLLM logprob dict (top-k plus the actual token)."""
    best = sorted(entries.items(), key=lambda kv: (-kv[1].logprob, kv[1].rank or 0, kv[0]))[:k]
    return [i for i, _ in best], [lp.logprob for _, lp in best]


@dataclass(frozen=True)
class VllmStats(EngineStats):
    """The vLLM engine's stats: every engine's (running: at most max_num_seqs of the requests vLLM holds; queued:
    the rest of them, waiting in vLLM's scheduler), and the miner's own bound in front of vLLM's queue."""

    in_hand: int  # requests admitted and not finished
    queue_size: int  # the most requests in hand at once (batching.queue_size)


class VllmEngine:
    """The engine contract over vLLM's AsyncLLM; `queue_size` requests at most are in hand at once."""

    def __init__(self, model: str, config: VllmConfig = VllmConfig(), *, queue_size: int = 256,
                 model_id: str | None = None, stall_timeout_s: float = 0.0, max_seq_len: int = 0):
        from transformers import AutoTokenizer

        self.model = model
        self.config = config
        self.queue_size = queue_size
        self.stall_timeout_s = stall_timeout_s  # no output for this long with work in hand: hung (0: off)
        self.max_seq_len = max_seq_len  # the miner's limit: vLLM's max_model_len unless that is set
        self.model_id = model_id or model
        self.tokenizer = AutoTokenizer.from_pretrained(_source(model), padding_side="left")
        self._llm: AsyncLLM | None = None
        self._info: EngineInfo | None = None
        self._ids = itertools.count()
        self._in_hand = 0
        self._aborts: set[asyncio.Future] = set()
        self._active: set[str] = set()  # vLLM request ids in flight, aborted by stop() after its timeout
        self._stopping = False
        self._dead: str | None = None
        self._last_output = time.monotonic()  # when vLLM last answered anything (or work arrived at an idle engine)
        self._idle = asyncio.Event()
        self._idle.set()
        self._stats = {"forward_batches": 0, "forward_rows": 0, "generated_tokens": 0, "generations": 0,
                       "cancelled": 0, "rejected": 0, "deadline_exceeded": 0}

    # life cycle

    async def start(self) -> None:
        if self._llm is not None:
            return
        os.environ[MINER_PID] = str(os.getpid())  # for _die_with_parent, in the processes vLLM starts
        args = engine_args(self.model, self.config, self.max_seq_len)
        self._llm = AsyncLLM.from_engine_args(args)
        mc = self._llm.model_config
        hf = mc.hf_config

        self._info = EngineInfo(
            model_id=self.model_id,
            backend="vllm",
            vocab_size=int(mc.get_vocab_size()),
            max_seq_len=int(mc.max_model_len),
            eos_token_id=self.tokenizer.eos_token_id,
            dtype=str(mc.dtype).removeprefix("torch."),
            device="cuda:0" if torch.cuda.is_available() else "cpu",
            weights_fingerprint=checkpoint_fingerprint(checkpoint_dir(self.model)),
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
            hidden_size=int(getattr(hf, "hidden_size", 0) or 0),
            supports_hidden=False,
            quantization=checkpoint_quantization(checkpoint_dir(self.model)),
        )
        kv = args.kv_cache_memory_bytes
        logger.info(f"vLLM engine: {self.model_id} ({self._info.dtype} on {self._info.device}), max_model_len "
                    f"{self._info.max_seq_len}, {self.config.max_num_seqs} sequences at once, KV cache "
                    + (f"{kv >> 20} MiB" if kv else f"{self.config.gpu_memory_utilization:.0%} of device memory"))

    async def stop(self, timeout: float = 5.0) -> None:
        """New work is refused at once; work in hand gets `timeout` seconds, then is aborted."""
        self._stopping = True
        if self._llm is None:
            return
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            await self._llm.abort(list(self._active))
            await asyncio.sleep(0.05)  # let the aborted streams see their end before the engine goes
        llm, self._llm = self._llm, None
        llm.shutdown()

    def dead_reason(self) -> str | None:
        """vLLM's engine core gone (a crash, kill -9, an RPC timeout), or silent past stall_timeout_s with
        work in hand."""
        llm = self._llm
        if self._dead is not None or llm is None:
            return self._dead
        if llm.errored:
            manager = getattr(llm.engine_core.resources, "engine_manager", None)
            exits = getattr(manager, "finished_procs", dict)()
            codes = ", ".join(f"{name} exit code {code}" for name, code in exits.items())
            self._dead = "the vLLM engine core has stopped" + (f" ({codes})" if codes else "")
        elif self.stall_timeout_s and self._in_hand and time.monotonic() - self._last_output > self.stall_timeout_s:
            quiet = time.monotonic() - self._last_output
            self._dead = (f"the vLLM engine has answered nothing for {quiet:.0f} s with {self._in_hand} requests "
                          f"in hand (over batching.stall_timeout_s {self.stall_timeout_s:g})")
            llm.output_processor.propagate_error(EngineDeadError())  # what vLLM does when its core fails
        return self._dead

    @property
    def async_llm(self) -> AsyncLLM | None:
        """vLLM's own engine (for benches that compare against it); None before start and after stop."""
        return self._llm

    def info(self) -> EngineInfo:
        if self._info is None:
            raise Unavailable("the engine is not started")
        return self._info

    def stats(self) -> VllmStats:
        in_vllm = self._llm.get_num_unfinished_requests() if self._llm is not None else 0
        running = min(in_vllm, self.config.max_num_seqs)
        return VllmStats(**self._stats, in_hand=self._in_hand, running=running, queued=in_vllm - running,
                         capacity=self.config.max_num_seqs, queue_size=self.queue_size)

    # admission: the miner's own bound in front of vLLM's unbounded waiting queue

    def _check_admissible(self, deadline: float | None) -> None:
        if self._dead is not None:
            raise Unavailable(f"the engine has stopped: {self._dead}")
        if self._stopping or self._llm is None:
            raise Unavailable("the engine is shutting down" if self._stopping else "the engine is not started")
        if self._in_hand >= self.queue_size:
            self._stats["rejected"] += 1
            raise ResourceExhausted(f"queue full ({self.queue_size} requests in hand)")
        if deadline is not None and time.monotonic() >= deadline:
            self._stats["deadline_exceeded"] += 1
            raise DeadlineExceeded("the deadline passed before the work could start")

    def _take(self) -> None:
        if self._in_hand == 0:  # the watchdog counts silence from here, not from the last busy moment
            self._last_output = time.monotonic()
        self._in_hand += 1
        self._idle.clear()

    def _release(self) -> None:
        self._in_hand -= 1
        if self._in_hand == 0:
            self._idle.set()

    def _request_id(self) -> str:
        return f"neuron-{next(self._ids)}"

    def _remaining(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            self._stats["deadline_exceeded"] += 1
            raise DeadlineExceeded("the deadline passed")
        return left

    # forward

    async def forward(self, job: ForwardJob, priority: float = 0.0, deadline: float | None = None) -> ForwardResult:
        if job.want_hidden:
            raise InvalidArgument("hidden states are not available from the vLLM backend")
        info = self.info()
        S = job.seq_len
        positions = list(range(S)) if job.positions is None else list(job.positions)
        check(job.rows >= 1 and S >= 1, "empty input")
        check(all(0 <= p < S for p in positions), f"positions must be in [0, {S})")
        if problem := job.token_logprobs_problem():
            raise InvalidArgument(problem)
        check(1 <= job.topk <= min(self.config.max_logprobs, info.vocab_size),
              f"topk must be in [1, {min(self.config.max_logprobs, info.vocab_size)}]")
        check(S + 1 <= info.max_seq_len, f"sequence of {S} tokens is longer than the engine takes")
        ids = job.input_ids
        check(int(ids.min()) >= 0 and int(ids.max()) < info.vocab_size, "token id outside the vocabulary")
        self._check_admissible(deadline)
        left = self._remaining(deadline)
        self._take()
        try:
            rows = ids.tolist()
            need_prompt = any(p < S - 1 for p in positions)
            need_last = (S - 1) in positions
            params = VSamplingParams(max_tokens=1, temperature=0.0, detokenize=False, ignore_eos=True,
                                     prompt_logprobs=job.topk if need_prompt else None,
                                     logprobs=job.topk if need_last else None,
                                     output_kind=RequestOutputKind.FINAL_ONLY)
            outs = await asyncio.wait_for(
                asyncio.gather(*(self._one(row, params, priority) for row in rows)), left)
        except asyncio.TimeoutError:
            self._stats["deadline_exceeded"] += 1
            raise DeadlineExceeded("the deadline passed during the forward pass") from None
        finally:
            self._release()
        k = job.topk
        top_ids = torch.empty(job.rows, len(positions), k, dtype=torch.int64)
        top_lp = torch.empty(job.rows, len(positions), k, dtype=torch.float32)
        token_lp = torch.empty(job.rows, len(positions), dtype=torch.float32) if job.want_token_logprobs else None
        for b, out in enumerate(outs):
            for j, p in enumerate(positions):
                entries = out.outputs[0].logprobs[0] if p == S - 1 else out.prompt_logprobs[p + 1]
                i, lp = _top(entries, k)
                top_ids[b, j] = torch.tensor(i)
                top_lp[b, j] = torch.tensor(lp)
                if token_lp is not None:  # vLLM's prompt logprobs always hold the actual prompt token's
                    token_lp[b, j] = entries[rows[b][p + 1]].logprob
        rest = (1.0 - top_lp.double().exp().sum(-1)).clamp(min=0.0).float()
        self._stats["forward_batches"] += 1
        self._stats["forward_rows"] += job.rows
        return ForwardResult(topk_ids=top_ids, topk_logprobs=top_lp, rest_mass=rest, hidden=None,
                             token_logprobs=token_lp)

    async def _one(self, prompt: list[int], params: VSamplingParams, priority: float):
        last, rid = None, self._request_id()
        self._active.add(rid)
        try:
            async for out in self._llm.generate(TokensPrompt(prompt_token_ids=prompt), params, rid,
                                                priority=_priority(priority)):
                self._last_output = time.monotonic()
                last = out
        except VLLMError as exc:
            raise _neuron_error(exc) from exc
        finally:
            self._active.discard(rid)
        if last is None or not last.finished or last.outputs[0].finish_reason == "abort":
            raise Unavailable("the forward pass was aborted: the engine is shutting down")
        return last

    # generate

    def sampling_params(self, job: GenerateJob) -> VSamplingParams:
        """The vLLM parameters a job is sent with (checked against the engine's limits first)."""
        info = self.info()
        sp = job.sampling
        check(len(job.prompt_ids) >= 1, "empty prompt")
        check(job.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        check(len(job.prompt_ids) + job.max_new_tokens <= info.max_seq_len,
              f"prompt + max_new_tokens exceeds the engine's {info.max_seq_len} tokens")
        check(all(0 <= t < info.vocab_size for t in job.prompt_ids), "token id outside the vocabulary")
        check(0 <= job.logprobs_topn <= self.config.max_logprobs,
              f"logprobs_topn must be in [0, {self.config.max_logprobs}]")
        eos = info.eos_token_id
        common = dict(max_tokens=job.max_new_tokens, logprobs=job.logprobs_topn, detokenize=False,
                      ignore_eos=True, stop_token_ids=[eos] if eos is not None else None,
                      output_kind=RequestOutputKind.DELTA)
        if sp.sampler == Sampler.GUMBEL_V1:
            check(sp.seed is not None, "gumbel-v1 needs a seed")
            check(sp.repetition_penalty in (0.0, 1.0), "gumbel-v1 takes no repetition penalty")
            return VSamplingParams(temperature=0.0, extra_args=vllm_sampler.extra_args(sp), **common)
        return VSamplingParams(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                               seed=None if sp.greedy else sp.seed,
                               repetition_penalty=sp.repetition_penalty or 1.0, **common)

    def generate(self, job: GenerateJob, priority: float = 0.0,
                 deadline: float | None = None) -> AsyncIterator[TokenStep]:
        params = self.sampling_params(job)
        self._check_admissible(deadline)
        return self._generate(job, params, priority, deadline)

    async def _generate(self, job: GenerateJob, params: VSamplingParams, priority: float,
                        deadline: float | None) -> AsyncIterator[TokenStep]:
        self._check_admissible(deadline)
        left = self._remaining(deadline)
        self._take()
        rid = self._request_id()
        stream = self._llm.generate(TokensPrompt(prompt_token_ids=list(job.prompt_ids)), params, rid,
                                    priority=_priority(priority))
        self._active.add(rid)
        finished = expired = False
        eos = self._info.eos_token_id
        self._stats["generations"] += 1

        def expire() -> None:  # the deadline: vLLM ends the stream with an "abort" output
            nonlocal expired
            expired = True
            task = asyncio.ensure_future(self._llm.abort(rid))
            self._aborts.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(self._aborts.discard)

        # One timer rather than a timeout around every step: no task per token.
        timer = None if left is None else asyncio.get_running_loop().call_later(left, expire)
        try:
            while not finished:
                try:
                    out = await stream.__anext__()
                except StopAsyncIteration:
                    raise Unavailable("the engine stopped during generation") from None
                except VLLMError as exc:
                    raise _neuron_error(exc) from exc
                self._last_output = time.monotonic()
                if expired or out.outputs[0].finish_reason == "abort":
                    if expired:
                        self._stats["deadline_exceeded"] += 1
                        raise DeadlineExceeded("the deadline passed during generation")
                    raise Unavailable("the generation was aborted: the engine is shutting down")
                finished = out.finished
                comp = out.outputs[0]
                n = len(comp.token_ids)
                for j, token in enumerate(comp.token_ids):
                    entries = comp.logprobs[j] if comp.logprobs is not None else {}
                    top_ids, top_lp = _top(entries, job.logprobs_topn) if job.logprobs_topn else ([], [])
                    lp = entries[token].logprob if token in entries else math.nan
                    reason = None
                    if finished and j == n - 1:
                        reason = FinishReason.EOS if token == eos else FinishReason.LENGTH
                    self._stats["generated_tokens"] += 1
                    yield TokenStep(token_id=int(token), logprob=float(lp), top_ids=tuple(top_ids),
                                    top_logprobs=tuple(float(x) for x in top_lp), finish_reason=reason)
                if finished and n == 0:
                    raise Unavailable("the generation ended without a token")
        finally:
            if timer is not None:
                timer.cancel()
            if not finished:
                self._stats["cancelled"] += 1
            self._active.discard(rid)
            await stream.aclose()  # vLLM aborts the request when its stream closes unfinished
            self._release()
