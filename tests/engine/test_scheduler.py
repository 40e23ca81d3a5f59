"""The scheduler without a model: admission by slots and KV bytes, priority, deadlines, cancels, batching."""

import pytest

from neuron.engine.scheduler import FORWARD, GENERATE, Request, Scheduler
from neuron.errors import ResourceExhausted, Unavailable


def sched(**kw) -> Scheduler:
    args = dict(queue_size=8, max_running=2, kv_bytes=1000, kv_bytes_per_token=10, max_batch_tokens=16)
    return Scheduler(**{**args, **kw})


def gen(prompt=5, new=5, priority=0.0, deadline=None) -> Request:
    return Request(GENERATE, priority, deadline, seq_len=prompt, max_new_tokens=new)


def fwd(rows=1, seq=4, priority=0.0, deadline=None) -> Request:
    return Request(FORWARD, priority, deadline, rows=rows, seq_len=seq)


def test_generations_join_while_slots_and_kv_bytes_last():
    s = sched(max_running=3, kv_bytes=250)  # 25 tokens of KV
    a, b, c = gen(5, 5), gen(5, 5), gen(3, 3)  # 10 + 10 + 6 tokens: the third does not fit
    for r in (a, b, c):
        s.add(r, 0.0)
    assert s.plan(0.0).joins == [a, b] and s.kv_reserved == 200 and s.waiting == 1
    s.finish(a)
    assert s.plan(0.0).joins == [c] and s.kv_reserved == 160


def test_slots_bound_the_decode_batch():
    s = sched(max_running=1)
    a, b = gen(), gen()
    s.add(a, 0.0), s.add(b, 0.0)
    assert s.plan(0.0).joins == [a]
    assert s.plan(0.0).joins == []
    s.finish(a)
    assert s.plan(0.0).joins == [b]


def test_lower_priority_values_first_and_arrival_order_among_equals():
    s = sched(max_running=4)
    reqs = [gen(priority=p) for p in (0.0, -5.0, -1.0, -5.0)]
    for r in reqs:
        s.add(r, 0.0)
    assert s.plan(0.0).joins == [reqs[1], reqs[3], reqs[2], reqs[0]]


def test_the_queue_is_bounded_and_closing_refuses_and_returns_the_waiting():
    s = sched(queue_size=2)
    s.add(gen(), 0.0), s.add(gen(), 0.0)
    with pytest.raises(ResourceExhausted, match="queue is full"):
        s.add(gen(), 0.0)
    assert len(s.close()) == 2
    with pytest.raises(Unavailable):
        s.add(gen(), 0.0)


def test_a_generation_larger_than_the_whole_kv_budget_is_refused_at_once():
    with pytest.raises(ResourceExhausted, match="KV cache"):
        sched(kv_bytes=100).add(gen(10, 10), 0.0)


def test_expired_and_cancelled_requests_leave_and_free_what_they_held():
    s = sched()
    late, running, queued = fwd(deadline=1.0), gen(deadline=5.0), gen()
    s.add(late, 0.0), s.add(running, 0.0)
    p = s.plan(2.0)
    assert p.expired == [late] and p.joins == [running]
    s.add(queued, 2.0)
    s.cancel(queued)
    p = s.plan(3.0)
    assert p.cancelled == [queued] and p.joins == []
    p = s.plan(6.0)
    assert p.timed_out == [running] and s.kv_reserved == 0 and not s.running
    s.add(again := gen(), 6.0)
    assert s.plan(6.0).joins == [again]
    s.cancel(again)
    assert s.plan(6.0).cancelled == [again] and not s.running


def test_forwards_are_merged_shortest_first_within_the_token_budget():
    s = sched(max_batch_tokens=16)
    reqs = [fwd(1, 4), fwd(2, 4), fwd(1, 8), fwd(3, 10)]
    for r in reqs:
        s.add(r, 0.0)
    batches = s.plan(0.0).forwards
    # 3 rows x 4 fit 16; 8 tokens wide the next would take 4 x 8; one of 3 x 10 runs alone.
    assert batches == [[reqs[0], reqs[1]], [reqs[2]], [reqs[3]]]
