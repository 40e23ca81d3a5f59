"""The HF engine: one thread owns the model and runs the step loop; async callers submit and read steps.

Each step: apply what the scheduler planned (expired, cancelled, timed-out requests leave), run the
merged forward batches, one decode step for the running generations, the prefill of the joining ones,
then hand every answer of the step to the event loop in one call.

An error in a step fails that step's callers and the engine serves on, except an accelerator error
(CUDA's are sticky: the device is unusable until the process ends) or an error outside the step: then
the engine is dead (`dead_reason()`), and so is one whose step has hung past the watchdog's timeout.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from loguru import logger

from neuron.config import BatchingConfig
from neuron.engine import sampler as S
from neuron.engine.runner import Runner, StepOutput
from neuron.engine.scheduler import FORWARD, GENERATE, Plan, Request, Scheduler
from neuron.engine.types import EngineInfo, EngineStats, FinishReason, ForwardJob, ForwardResult, GenerateJob, TokenStep
from neuron.errors import DeadlineExceeded, InvalidArgument, NeuronError, ResourceExhausted, Unavailable
from neuron.model import LoadedModel, forward_batch

_END = object()  # a generation's iterator ends after this


class _Delivery:
    """Where a request's answers go: a future (forward) or a queue of steps (generate), on its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future | None = None):
        self.loop, self.future = loop, future
        self.steps: asyncio.Queue | None = None if future is not None else asyncio.Queue()
        self.started: float | None = None  # when it left the queue (for Timings.queue_ms)

    def put(self, item) -> None:
        """On the event loop: settle the future or queue the step / error / end."""
        if self.future is not None:
            if not self.future.done():
                self.future.set_exception(item) if isinstance(item, BaseException) else self.future.set_result(item)
        else:
            self.steps.put_nowait(item)


class _Payload(NamedTuple):
    """What the engine keeps with a scheduled request: where its answers go, and the job itself."""

    delivery: _Delivery
    job: object  # ForwardJob or GenerateJob


@dataclass
class _Gen:
    """A running generation's host-side state."""

    job: GenerateJob
    slot: int = -1
    generated: int = 0


class Generation:
    """The caller's side of a generation: an async iterator of TokenSteps; aclose() aborts it."""

    def __init__(self, engine: "HFEngine", req: Request):
        self._engine, self._req, self._done = engine, req, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenStep:
        if self._done:
            raise StopAsyncIteration
        item = await self._req.payload.delivery.steps.get()
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._engine._cancel(self._req)

    @property
    def queue_ms(self) -> float:
        d = self._req.payload.delivery
        return 0.0 if d.started is None else (d.started - self._req.enqueued) * 1000


@dataclass(frozen=True)
class HFStats(EngineStats):
    """The HF engine's stats: every engine's, and its KV budget, decode steps and joins."""

    kv_bytes_reserved: int  # KV cache admitted generations hold (the scheduler admits against kv_bytes_capacity)
    kv_bytes_capacity: int  # KV cache budget (batching.kv_cache_mb, or every slot at max_seq_len)
    decode_steps: int  # decode steps run
    joins: int  # generations that joined while others were decoding


class HFEngine:
    """The default backend: Hugging Face model code, our scheduler, runner and sampler."""

    backend = "hf"

    def __init__(self, lm: LoadedModel, config: BatchingConfig, max_seq_len: int,
                 choose: Callable[[object, S.RowParams], object] = S.choose):
        self.lm, self.config, self.tokenizer = lm, config, lm.tokenizer
        self.max_seq_len = min(max_seq_len, lm.max_positions)
        self.runner = Runner(lm, config.max_generate_batch, self.max_seq_len, config.cuda_graphs)
        self.runner.choose = choose
        kv = config.kv_cache_mb * 2 ** 20 if config.kv_cache_mb else self.runner.kv_bytes
        self.scheduler = Scheduler(queue_size=config.queue_size, max_running=config.max_generate_batch, kv_bytes=kv,
                                   kv_bytes_per_token=self.runner.kv_bytes_per_token,
                                   max_batch_tokens=config.max_batch_tokens, max_wait_s=config.max_wait_ms / 1000)
        self._gens: dict[int, _Gen] = {}  # request id -> state, engine thread only
        self._by_slot: dict[int, Request] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stop_by = 0.0  # with _stopping: running generations may finish until then
        self._dead: str | None = None  # why the engine can no longer serve; set once, by _die
        self._dead_lock = threading.Lock()
        self._beat = time.monotonic()  # when the step loop last went round (the watchdog reads it)
        self._plan = Plan()  # the step in hand
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._counts: Counter[str] = Counter(dict.fromkeys(
            ("forward_batches", "forward_rows", "decode_steps", "generations", "generated_tokens", "joins", "cancelled",
             "deadline_exceeded"), 0))
        self._rejected = 0  # counted on the caller's thread (the engine thread keeps _counts)
        self.batch_rows: Counter[int] = Counter()  # forward batch size in rows -> batches of that size

    # ---- the contract -------------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        lm = self.lm
        return EngineInfo(model_id=lm.name, backend=self.backend, vocab_size=lm.vocab_size, max_seq_len=self.max_seq_len,
                          eos_token_id=lm.eos_token_id, dtype=str(lm.dtype).removeprefix("torch."), device=str(lm.device),
                          weights_fingerprint=lm.weights_fingerprint, tokenizer_fingerprint=lm.tokenizer_fingerprint,
                          hidden_size=int(lm.model.config.hidden_size), supports_hidden=True,
                          quantization=lm.quantization)

    def stats(self) -> HFStats:
        return HFStats(queued=self.scheduler.waiting, running=len(self.scheduler.running), capacity=self.runner.slots,
                       kv_bytes_reserved=self.scheduler.kv_reserved, kv_bytes_capacity=self.scheduler.kv_bytes,
                       rejected=self._rejected, **self._counts)

    def dead_reason(self) -> str | None:
        """Also the watchdog: the loop goes round at least every 0.5 s when idle and after every step, so
        one that has not for stall_timeout_s is stuck in a step."""
        timeout = self.config.stall_timeout_s
        if self._dead is None and timeout and self._thread.is_alive() and not self._stopping.is_set():
            if (stuck := time.monotonic() - self._beat) > timeout:
                self._die(f"an engine step has made no progress for {stuck:.0f} s "
                          f"(over batching.stall_timeout_s {timeout:g})")
        return self._dead

    async def start(self) -> None:
        if self._thread.ident is None:  # idempotent
            self._beat = time.monotonic()
            self._thread.start()

    async def stop(self, timeout: float = 5.0) -> None:
        """Refuse new work, fail the queued, let running generations finish within `timeout`."""
        for r in self.scheduler.close():
            self._deliver([(r, Unavailable("the miner is shutting down"))])
        if self._dead is not None:
            return  # its work was failed when it died; a hung thread is not waited for (it is a daemon)
        self._stop_by = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, timeout + 5)

    async def forward(self, job: ForwardJob, priority: float = 0.0, deadline: float | None = None) -> ForwardResult:
        # Refused here, not in the merged batch, where it would fail the other jobs too.
        if problem := job.token_logprobs_problem():
            raise InvalidArgument(problem)
        loop = asyncio.get_running_loop()
        req = Request(FORWARD, priority, deadline, rows=job.rows, seq_len=job.seq_len,
                      payload=_Payload(_Delivery(loop, loop.create_future()), job))
        self._submit(req)
        try:
            return await req.payload.delivery.future
        except asyncio.CancelledError:
            self._cancel(req)
            raise

    def generate(self, job: GenerateJob, priority: float = 0.0, deadline: float | None = None) -> Generation:
        req = Request(GENERATE, priority, deadline, seq_len=len(job.prompt_ids), max_new_tokens=job.max_new_tokens,
                      payload=_Payload(_Delivery(asyncio.get_running_loop()), job))
        self._submit(req)
        return Generation(self, req)

    def _submit(self, req: Request) -> None:
        if self._dead is not None:
            raise Unavailable(f"the engine has stopped: {self._dead}")
        if self._stopping.is_set():
            raise Unavailable("the miner is shutting down")
        try:
            self.scheduler.add(req, time.monotonic())
        except ResourceExhausted:
            self._rejected += 1
            raise
        self._wake.set()

    def _cancel(self, req: Request) -> None:
        self.scheduler.cancel(req)
        self._wake.set()

    # ---- the engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the loop itself failed (or the device did): nothing can be served now
            logger.opt(exception=exc).debug("the engine thread ended")
            self._die(f"the engine thread died: {type(exc).__name__}: {exc}")

    def _die(self, reason: str) -> None:
        """From any thread, once: refuse new work, fail the queued and the running with Unavailable."""
        with self._dead_lock:
            if self._dead is not None:
                return
            self._dead = reason
        self._stop_by = 0.0
        self._stopping.set()
        self._wake.set()
        plan = self._plan  # the step in hand: its forwards are neither queued nor running
        failed = [*self.scheduler.close(), *self.scheduler.running.values(), *plan.expired, *plan.timed_out,
                  *(r for batch in plan.forwards for r in batch)]
        self._deliver([(r, Unavailable(f"the engine has stopped: {reason}")) for r in failed])

    def _loop(self) -> None:
        while True:
            self._beat = time.monotonic()
            if self._stopping.is_set() and (not self.scheduler.running or time.monotonic() > self._stop_by):
                break
            self._wait_for_forwards()
            out: list[tuple[Request, object]] = []
            try:
                self._step(out)
            except Exception as exc:  # a bug or out-of-memory in the decode step: fail what ran, keep serving
                if _fatal(exc):
                    raise
                logger.exception(f"decode step over {len(self._gens)} sequences failed")
                for req in list(self.scheduler.running.values()):
                    out.append((req, NeuronError("the generation failed on the miner (logged there)")))
                    self._leave(req)
            self._deliver(out)
            if not self.scheduler.running and not self.scheduler.waiting:
                self._wake.wait(0.5)
                self._wake.clear()
        for req in list(self.scheduler.running.values()):
            self._leave(req)
            self._deliver([(req, Unavailable("the miner shut down before this generation finished"))])

    def _wait_for_forwards(self) -> None:
        """With nothing decoding, let the first forward wait up to max_wait_ms for others to merge with."""
        if self.scheduler.running or not self.config.max_wait_ms:
            return
        age = self.scheduler.oldest_forward_age(time.monotonic())
        if age is not None and age < self.scheduler.max_wait_s:
            time.sleep(self.scheduler.max_wait_s - age)

    def _step(self, out: list) -> None:
        self._plan = plan = self.scheduler.plan(time.monotonic())
        now = time.monotonic()
        for r in plan.expired:
            self._counts["deadline_exceeded"] += 1
            out.append((r, DeadlineExceeded("the deadline passed while the request was queued; it was not run")))
        for r in plan.cancelled:
            self._counts["cancelled"] += 1
            if r.id in self._gens:
                self._leave(r, scheduled=False)
            out.append((r, _END if r.kind == GENERATE else asyncio.CancelledError()))
        for r in plan.timed_out:
            self._counts["deadline_exceeded"] += 1
            self._leave(r, scheduled=False)
            out.append((r, DeadlineExceeded("the deadline passed during the generation; it was stopped")))
        for r in plan.joins:
            r.payload.delivery.started = now
        for batch in plan.forwards:
            for r in batch:
                r.payload.delivery.started = now
            out += self._forward(batch)
        if self._gens:
            out += self._finish(self.runner.decode())
        if plan.joins:
            out += self._prefill(plan.joins)

    def _forward(self, batch: list[Request]) -> list[tuple[Request, object]]:
        try:
            results = forward_batch(self.lm, [r.payload.job for r in batch])
        except Exception as exc:  # a bug or an out-of-memory: fail these callers, keep serving
            if _fatal(exc):
                raise
            logger.exception(f"forward batch of {len(batch)} failed")
            return [(r, NeuronError("the forward pass failed on the miner (logged there)")) for r in batch]
        rows = sum(r.rows for r in batch)
        self._counts["forward_batches"] += 1
        self._counts["forward_rows"] += rows
        self.batch_rows[rows] += 1
        return list(zip(batch, results))

    def _prefill(self, joins: list[Request]) -> list[tuple[Request, object]]:
        self._counts["generations"] += len(joins)
        if self._gens:
            self._counts["joins"] += len(joins)
        slots = []
        for r in joins:
            g = _Gen(r.payload.job, slot=self.runner.free_slot())
            self.runner.params[g.slot] = g.job.sampling  # reserve the slot before the next free_slot
            self._gens[r.id], self._by_slot[g.slot] = g, r
            slots.append(g.slot)
        jobs = [r.payload.job for r in joins]
        seeds = [j.sampling.seed if j.sampling.seed is not None else secrets.randbits(63) for j in jobs]
        try:
            step = self.runner.prefill(slots, [list(j.prompt_ids) for j in jobs], [j.sampling for j in jobs],
                                       [j.logprobs_topn for j in jobs], seeds)
        except Exception as exc:
            if _fatal(exc):
                raise
            logger.exception(f"prefill of {len(joins)} prompts failed")
            for r in joins:
                self._leave(r)
            return [(r, NeuronError("the prompt failed on the miner (logged there)")) for r in joins]
        return self._finish(step)

    def _finish(self, step: StepOutput) -> list[tuple[Request, object]]:
        """TokenSteps for the rows of a step; finished, failed rows leave the batch here."""
        out = []
        eos = self.lm.eos_token_id
        self._counts["decode_steps"] += 1
        for i, slot in enumerate(step.slots):
            req = self._by_slot[slot]
            g = self._gens[req.id]
            if not step.finite[i]:
                self._leave(req)
                out.append((req, NeuronError("the model's logits for this sequence were not finite; it was stopped")))
                continue
            g.generated += 1
            token = step.tokens[i]
            finish = (FinishReason.EOS if token == eos else
                      FinishReason.LENGTH if g.generated >= g.job.max_new_tokens else None)
            out.append((req, TokenStep(token, step.logprobs[i], tuple(step.top_ids[i]), tuple(step.top_logprobs[i]),
                                       finish)))
            if finish is not None:
                self._leave(req)
        self._counts["generated_tokens"] += len(step.slots)
        return out

    def _leave(self, req: Request, scheduled: bool = True) -> None:
        """A generation leaves: its slot, its state and its scheduler entry together."""
        g = self._gens.pop(req.id, None)
        if g is not None and g.slot >= 0:
            self.runner.release(g.slot)
            self._by_slot.pop(g.slot, None)
        if scheduled:
            self.scheduler.finish(req)

    def _deliver(self, out: list[tuple[Request, object]]) -> None:
        """One hand-off per event loop for the whole step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for req, item in out:
            by_loop[req.payload.delivery.loop].append((req.payload.delivery, item))

        def put_all(items):
            for delivery, item in items:
                delivery.put(item)

        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(put_all, items)
            except RuntimeError:
                pass  # that loop is closed: nobody is waiting for these answers


def _fatal(exc: Exception) -> bool:
    """An error after which the device cannot serve: CUDA errors other than out-of-memory are sticky."""
    return isinstance(exc, torch.AcceleratorError)
