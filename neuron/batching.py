"""The model worker: one thread owns the model; async callers hand it work through a bounded priority queue.

Concurrent Forward requests are merged into one padded batch (bounded by tokens and a short wait);
concurrent generations decode together, joining between steps and leaving as they finish.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from loguru import logger

from neuron.config import BatchingConfig
from neuron.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from neuron.generation import Decoder, GenParams, Sequence, Step
from neuron.model import ForwardJob, ForwardOutput, LoadedModel, forward_batch


@dataclass
class _Work:
    loop: asyncio.AbstractEventLoop
    deadline: float | None  # time.monotonic() after which the caller no longer waits
    enqueued: float = field(default_factory=time.monotonic)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the caller's loop is closed: nobody is waiting for this answer


@dataclass
class _ForwardWork(_Work):
    job: ForwardJob = None
    future: asyncio.Future = None

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        def settle():
            if not self.future.done():
                self.future.set_exception(error) if error else self.future.set_result(result)
        self._call(settle)


@dataclass
class _GenerateWork(_Work):
    prompt_ids: list[int] = None
    params: GenParams = None
    steps: asyncio.Queue = None  # Step, then None at the end, or an exception
    cancelled: bool = False
    seq: Sequence | None = None
    started: float | None = None

    def push(self, item) -> None:
        self._call(self.steps.put_nowait, item)


class Generation:
    """The caller's side of a generation: iterate its steps; cancel() stops it between steps."""

    def __init__(self, work: _GenerateWork):
        self._work = work

    def __aiter__(self):
        return self

    async def __anext__(self) -> Step:
        item = await self._work.steps.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self._work.cancelled = True

    @property
    def queue_ms(self) -> float:
        w = self._work
        return 0.0 if w.started is None else (w.started - w.enqueued) * 1000


class ModelWorker:
    """Owns the model thread. Lower priority numbers run first (the axon passes -stake)."""

    def __init__(self, lm: LoadedModel, config: BatchingConfig):
        self.lm = lm
        self.config = config
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._pending = 0  # queued, not yet taken: bounded by config.queue_size
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._decoder = Decoder(lm)
        self._waiting: deque[_GenerateWork] = deque()  # generations taken but not yet in the decoder
        self._active: list[_GenerateWork] = []
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self.batches_run = 0  # forward batches executed (a test can count model work)
        self.rows_run = 0
        self.batch_rows: Counter[int] = Counter()  # forward batch size in rows -> batches of that size
        self.joins = 0  # sequences that joined a batch already decoding

    def start(self) -> "ModelWorker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the work in hand, fail what is queued with UNAVAILABLE, and join the thread."""
        self._stopping.set()
        self._thread.join(timeout)

    # ---- the async side -------------------------------------------------------------------------

    def _submit(self, work: _Work, priority: float) -> None:
        if self._stopping.is_set():
            raise Unavailable("the miner is shutting down")
        with self._lock:
            if self._pending >= self.config.queue_size:
                raise ResourceExhausted(f"the model queue is full ({self.config.queue_size} waiting); retry later")
            self._pending += 1
        self._queue.put((priority, next(self._order), work))

    async def forward(self, job: ForwardJob, priority: float = 0.0, deadline: float | None = None) -> ForwardOutput:
        loop = asyncio.get_running_loop()
        work = _ForwardWork(loop=loop, deadline=deadline, job=job, future=loop.create_future())
        self._submit(work, priority)
        return await work.future

    def generate(self, prompt_ids: list[int], params: GenParams, priority: float = 0.0,
                 deadline: float | None = None) -> Generation:
        work = _GenerateWork(loop=asyncio.get_running_loop(), deadline=deadline, prompt_ids=prompt_ids,
                             params=params, steps=asyncio.Queue())
        self._submit(work, priority)
        return Generation(work)

    # ---- the model thread -----------------------------------------------------------------------

    def _take(self, block: bool) -> list[_Work]:
        """Work from the queue: wait for the first item if idle; give forwards a short wait to gather."""
        items: list[_Work] = []
        try:
            items.append(self._queue.get(timeout=0.05) if block else self._queue.get_nowait())
        except queue.Empty:
            return items
        tokens = self._tokens(items[0])
        gather_until = time.monotonic() + self.config.max_wait_ms / 1000 if isinstance(items[0], _ForwardWork) else 0
        while tokens < self.config.max_batch_tokens:
            try:
                timeout = gather_until - time.monotonic()
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            items.append(item)
            tokens += self._tokens(item)
        return [w for _, _, w in items]

    def _left_queue(self, n: int = 1) -> None:
        """Work stops counting against queue_size once it runs or is dropped (not while it waits)."""
        with self._lock:
            self._pending -= n

    @staticmethod
    def _tokens(entry) -> int:
        work = entry[2]
        return work.job.rows * work.job.seq_len if isinstance(work, _ForwardWork) else len(work.prompt_ids)

    def _run(self) -> None:
        while True:
            busy = bool(self._active or self._waiting)
            if self._stopping.is_set() and not busy:
                self._fail_queued()
                return
            items = self._take(block=not busy)
            now = time.monotonic()
            forwards = []
            for w in items:
                if not isinstance(w, _GenerateWork) or w.expired(now):
                    self._left_queue()
                if w.expired(now):
                    err = DeadlineExceeded("the deadline passed while the request was queued; it was not run")
                    w.resolve(error=err) if isinstance(w, _ForwardWork) else w.push(err)
                elif isinstance(w, _ForwardWork):
                    forwards.append(w)
                else:
                    self._waiting.append(w)
            if forwards:
                self._run_forwards(forwards)
            if self._waiting or self._active:
                self._step_generations()

    def _run_forwards(self, works: list[_ForwardWork]) -> None:
        # Split into batches of at most max_batch_tokens padded tokens.
        batch: list[_ForwardWork] = []
        for w in sorted(works, key=lambda w: w.job.seq_len):
            width = max([w.job.seq_len] + [b.job.seq_len for b in batch])
            if batch and (sum(b.job.rows for b in batch) + w.job.rows) * width > self.config.max_batch_tokens:
                self._forward_once(batch)
                batch = []
            batch.append(w)
        self._forward_once(batch)

    def _forward_once(self, batch: list[_ForwardWork]) -> None:
        try:
            outputs = forward_batch(self.lm, [w.job for w in batch])
        except Exception as exc:  # a bug or an out-of-memory: fail these callers, keep serving
            logger.exception(f"forward batch of {len(batch)} failed")
            for w in batch:
                w.resolve(error=exc)
            return
        rows = sum(w.job.rows for w in batch)
        self.batches_run += 1
        self.rows_run += rows
        self.batch_rows[rows] += 1
        for w, out in zip(batch, outputs):
            w.resolve(result=out)

    def _step_generations(self) -> None:
        joining = []
        while self._waiting and len(self._active) + len(joining) < self.config.max_generate_batch:
            w = self._waiting.popleft()
            self._left_queue()
            if w.cancelled:
                w.push(None)
                continue
            w.started = time.monotonic()
            w.seq = self._decoder.new_sequence(w.prompt_ids, w.params)
            joining.append(w)
        try:
            results = []
            if self._active:
                stepped = dict((id(s), st) for s, st in self._decoder.step())
                results += [(w, stepped[id(w.seq)]) for w in self._active]
            if joining:
                self.joins += len(joining) if self._active else 0
                results += list(zip(joining, self._decoder.add([w.seq for w in joining])))
                self._active += joining
        except Exception as exc:
            logger.exception(f"generation step over {len(self._active)} sequences failed")
            for w in self._active + joining:
                w.push(exc)
            self._active = []
            self._decoder = Decoder(self.lm)
            return
        for w, step in results:
            w.push(step)
        done = [w for w in self._active if w.seq.finished or w.cancelled]
        for w in done:
            w.push(None)
        self._decoder.remove([w.seq for w in done])
        self._active = [w for w in self._active if not (w.seq.finished or w.cancelled)]

    def _fail_queued(self) -> None:
        while True:
            try:
                _, _, w = self._queue.get_nowait()
            except queue.Empty:
                return
            err = Unavailable("the miner is shutting down")
            w.resolve(error=err) if isinstance(w, _ForwardWork) else w.push(err)
