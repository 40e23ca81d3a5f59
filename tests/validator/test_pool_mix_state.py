"""The pool's choice by score and capacity, the users' mix, and the speed term: small exact tests."""

import contextlib
import random

from conftest import make_wallet
from neuron.chain.local import LocalChain
from neuron.dendrite import Dendrite
from neuron.validator.mix import PRIOR, Shape, TrafficMix, bucket
from neuron.validator.pool import MinerPool
from neuron.validator.judge import Judgement, Outcome
from neuron.validator.state import SPEED_WINDOW, UidStats


def _pool(tmp_path, n: int) -> MinerPool:
    chain = LocalChain(tmp_path / "chain.sqlite", block_time=0.05)
    chain.create_subnet(1)
    me = make_wallet(tmp_path / "w", "v")
    chain.register(1, me)
    for i in range(n):
        w = make_wallet(tmp_path / "w", f"m{i}")
        chain.register(1, w)
        chain.serve_axon(1, w, "127.0.0.1", 9000 + i)
    return MinerPool(chain, 1, Dendrite(), me.hotkey.ss58_address, rng=random.Random(0))


async def test_choose_weighs_score_and_free_capacity_and_skips_the_unverified(tmp_path):
    pool = _pool(tmp_path, 3)
    assert await pool.choose() is None  # nobody verified yet
    pool.set_standing({1: 3.0, 2: 1.0, 3: 0.0})
    picks = [(await pool.choose()).uid for _ in range(400)]
    # Idle: uid 1 when U1 / 3 < U2 / 1, 5 times in 6; uid 3 (score 0) is not verified.
    assert 3 not in picks and 300 < picks.count(1) < 366
    first = await pool.choose(exclude={1})
    assert first.uid == 2
    with pool.lease(first), pool.lease(first), pool.lease(first):  # uid 2 busy: (3 + U) / 1 >= 3 > U / 3
        assert {(await pool.choose()).uid for _ in range(100)} == {1}
    assert not pool.in_flight
    # Under load, in-flight requests follow the scores: 3:1 of 40 held at once.
    with contextlib.ExitStack() as held:
        for _ in range(40):
            held.enter_context(pool.lease(await pool.choose()))
        assert pool.in_flight == {1: 30, 2: 10}
    pool.set_standing({1: 1.0, 2: 1.0})
    with contextlib.ExitStack() as held:  # equal scores: equal shares, whatever the draws
        for _ in range(31):
            held.enter_context(pool.lease(await pool.choose()))
        assert sorted(pool.in_flight.values()) == [15, 16]
    pool.revoke(1)
    assert {(await pool.choose()).uid for _ in range(20)} == {2}


def test_mix_follows_user_traffic_and_forgets_old_counts():
    mix = TrafficMix.default(32)
    assert all(s.max_new_tokens == 32 for s in mix.counts) and len(mix.counts) == len(PRIOR)
    user = Shape(True, bucket(100), 64, 0.3, 0, 1.0, 2, 5)
    for _ in range(2000):
        mix.record(user)
    rng = random.Random(1)
    # a quarter from the prior (the floor), the rest nearly all the users' shape
    assert 680 < sum(mix.sample(rng) == user for _ in range(1000)) < 780
    assert bucket(1) == 8 and bucket(100) == 128 and bucket(10_000) == 512
    small = TrafficMix(max_shapes=8)
    for n in range(50):
        small.record(Shape(True, 8, n + 1, 0.7, 0, 1.0, 0, 0))
    assert len(small.counts) <= 8


def test_speed_takes_the_worse_of_user_and_challenge_medians():
    st = UidStats()
    assert st.slowdown() == 1.0
    for _ in range(5):
        st.add_speed("challenge", 0.01)
    assert st.slowdown() == 1.0  # no user answers yet
    for _ in range(5):
        st.add_speed("user", 0.03)
    assert abs(st.slowdown() - 3.0) < 1e-9  # users served 3x slower per token: the challenge latency x3
    for _ in range(SPEED_WINDOW):
        st.add_speed("user", 0.005)
    assert st.slowdown() == 1.0 and len(st.speed["user"]) == SPEED_WINDOW  # faster for users costs nothing


def test_the_streak_counts_verified_checks_in_a_row_and_any_failure_resets_it():
    st = UidStats()
    timeout = Judgement(False, "generate: deadline_exceeded", outcome=Outcome.UNREACHABLE)
    for j, user, streak, clean in ((Judgement(True, ""), False, 1, -1), (timeout, False, 0, -1),
                                   (Judgement(True, ""), True, 1, -1), (Judgement(False, "generate: wrong"), True, 0, 0),
                                   (Judgement(True, ""), False, 1, 1), (Judgement(True, ""), False, 2, 2)):
        st.record(j, user=user)
        assert (st.streak, st.clean) == (streak, clean)
    assert (st.queried, st.verified, st.users_checked, st.users_failed) == (4, 3, 2, 1)


def test_the_mix_survives_a_restart_in_the_state(tmp_path):
    from neuron.validator.state import State

    mix = TrafficMix.default(16)
    mix.record(Shape(False, 64, 48, 0.2, 10, 0.8, 1, 3))
    state = State(mix=mix.to_json())
    state.save(tmp_path / "s.json")
    again = TrafficMix.from_json(State.load(tmp_path / "s.json").mix, TrafficMix.default(16))
    assert again.counts == mix.counts and again.forward_counts == mix.forward_counts
    fallback = TrafficMix.default(8)
    assert TrafficMix.from_json({}, fallback) is fallback and TrafficMix.from_json({"generate": [[1]]}, fallback) is fallback


def test_challenges_fit_the_context_whatever_the_users_send(tiny):
    from neuron.dataset import PromptSource
    from neuron.validator.challenge import ChallengeConfig, make_challenge

    mix = TrafficMix({Shape(True, 512, 96, 0.7, 0, 1.0, 0, 0): 1.0}, floor=0.0)
    rng, source = random.Random(5), PromptSource.default()
    for _ in range(20):
        ch = make_challenge(tiny, source, rng, ChallengeConfig(), mix, set())
        sent = len(tiny.tokenizer(ch.prompt_text).input_ids) if ch.prompt_text else len(ch.prompt_ids)
        assert sent + ch.max_new_tokens <= tiny.max_positions and len(ch.prompt_ids) == sent
