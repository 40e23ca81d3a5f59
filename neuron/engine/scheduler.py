"""The scheduler: what runs at the next step. No torch, no threads of its own; it plans, the runner acts.

Requests wait in one priority queue (lower priority value first, then arrival). Between two steps the
engine asks for a plan: expired and cancelled requests leave, forwards are merged into batches bounded
by padded tokens, and generations join the decode batch while a slot and KV-cache bytes are free.
Cancellations are only recorded when they arrive and applied here, between steps, by the one thread
that also owns the sequences: a sequence and its request always leave together.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from neuron.errors import ResourceExhausted, Unavailable

FORWARD, GENERATE = "forward", "generate"


@dataclass(eq=False)
class Request:
    """A forward or generation as the scheduler sees it: sizes, priority, deadline, and the caller's payload."""

    kind: str  # FORWARD or GENERATE
    priority: float  # lower runs first (the axon passes -stake)
    deadline: float | None  # time.monotonic() after which nobody waits for the answer
    rows: int = 1  # forward: sequences; generate: 1
    seq_len: int = 0  # forward: tokens per row; generate: prompt tokens
    max_new_tokens: int = 0  # generate only
    payload: Any = None  # the engine's own record (job, where to deliver)
    enqueued: float = 0.0
    id: int = field(default_factory=itertools.count().__next__)

    @property
    def tokens(self) -> int:
        """KV-cache tokens a generation may hold at its longest; padded tokens of a forward."""
        return self.seq_len + self.max_new_tokens if self.kind == GENERATE else self.rows * self.seq_len

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass
class Plan:
    """One step's decisions."""

    expired: list[Request] = field(default_factory=list)  # waiting past their deadline: fail them
    cancelled: list[Request] = field(default_factory=list)  # waiting or running, cancelled by the caller
    timed_out: list[Request] = field(default_factory=list)  # running generations past their deadline
    forwards: list[list[Request]] = field(default_factory=list)  # batches to run
    joins: list[Request] = field(default_factory=list)  # generations to prefill and add to the decode batch

    def __bool__(self) -> bool:
        return bool(self.expired or self.cancelled or self.timed_out or self.forwards or self.joins)


class Scheduler:
    """Admission and batching decisions. `add` and `cancel` may be called from any thread."""

    def __init__(self, *, queue_size: int, max_running: int, kv_bytes: int, kv_bytes_per_token: int,
                 max_batch_tokens: int, max_wait_s: float = 0.0):
        self.queue_size, self.max_running = queue_size, max_running
        self.kv_bytes, self.kv_bytes_per_token = kv_bytes, kv_bytes_per_token
        self.max_batch_tokens, self.max_wait_s = max_batch_tokens, max_wait_s
        self._lock = threading.Lock()
        self._waiting: list[tuple[float, int, Request]] = []  # heap
        self._cancel: set[int] = set()
        self.running: dict[int, Request] = {}  # generations in the decode batch; touched by the engine thread only
        self.kv_reserved = 0
        self.closed = False

    # ---- any thread -----------------------------------------------------------------------------

    def add(self, req: Request, now: float) -> None:
        """Queue a request, or raise ResourceExhausted (queue full) / Unavailable (shutting down)."""
        if req.kind == GENERATE and req.tokens * self.kv_bytes_per_token > self.kv_bytes:
            # Cannot happen within the codec's limits unless the KV budget is configured below one sequence.
            raise ResourceExhausted(f"a generation of {req.tokens} tokens needs more KV cache than this miner has")
        with self._lock:
            if self.closed:
                raise Unavailable("the miner is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise ResourceExhausted(f"the model queue is full ({self.queue_size} waiting); retry later")
            req.enqueued = now
            heapq.heappush(self._waiting, (req.priority, req.id, req))

    def cancel(self, req: Request) -> None:
        """Record a cancellation; it takes effect at the next plan."""
        with self._lock:
            self._cancel.add(req.id)

    def close(self) -> list[Request]:
        """Refuse new requests; the waiting ones, to fail."""
        with self._lock:
            self.closed = True
            waiting = [r for _, _, r in self._waiting]
            self._waiting.clear()
            return waiting

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def oldest_forward_age(self, now: float) -> float | None:
        with self._lock:
            ages = [now - r.enqueued for _, _, r in self._waiting if r.kind == FORWARD]
        return max(ages, default=None)

    # ---- the engine thread ----------------------------------------------------------------------

    def plan(self, now: float) -> Plan:
        plan = Plan()
        with self._lock:
            cancel, self._cancel = self._cancel, set()
            for rid in cancel & self.running.keys():
                plan.cancelled.append(self._leave(rid))
            kept, forwards = [], []
            free_slots = self.max_running - len(self.running)
            for item in sorted(self._waiting):
                r = item[2]
                if r.id in cancel:
                    plan.cancelled.append(r)
                elif r.expired(now):
                    plan.expired.append(r)
                elif r.kind == FORWARD:
                    forwards.append(r)
                elif free_slots > 0 and self.kv_reserved + r.tokens * self.kv_bytes_per_token <= self.kv_bytes:
                    free_slots -= 1
                    self.kv_reserved += r.tokens * self.kv_bytes_per_token
                    self.running[r.id] = r
                    plan.joins.append(r)
                else:
                    kept.append(item)  # no room yet: stays queued, in order
            self._waiting = kept
            heapq.heapify(self._waiting)
        for rid in [rid for rid, r in self.running.items() if r.expired(now)]:
            plan.timed_out.append(self._leave(rid))
        plan.forwards = self._batches(forwards)
        return plan

    def finish(self, req: Request) -> None:
        """A running generation ended (its slot is free again)."""
        if req.id in self.running:
            self._leave(req.id)

    def _leave(self, rid: int) -> Request:
        r = self.running.pop(rid)
        self.kv_reserved -= r.tokens * self.kv_bytes_per_token
        return r

    def _batches(self, forwards: list[Request]) -> list[list[Request]]:
        """Forwards merged, shortest first, into batches of at most max_batch_tokens padded tokens
        (a single request larger than that runs alone)."""
        batches: list[list[Request]] = []
        batch: list[Request] = []
        for r in sorted(forwards, key=lambda r: r.seq_len):
            width = max([r.seq_len] + [b.seq_len for b in batch])
            if batch and (sum(b.rows for b in batch) + r.rows) * width > self.max_batch_tokens:
                batches.append(batch)
                batch = []
            batch.append(r)
        if batch:
            batches.append(batch)
        return batches
