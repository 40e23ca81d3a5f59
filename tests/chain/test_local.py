"""LocalChain: registration, pruning, permits, weights and incentive, shared between processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import bittensor as bt
import pytest

from neuron.chain import ChainError, NotRegistered
from neuron.chain.local import LocalChain, consensus_incentive, validator_permits

REPO = Path(__file__).resolve().parents[2]
NETUID = 1


class Clock:
    """A wall clock the test moves by hand, so block numbers are exact."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, blocks: int) -> None:
        self.now += blocks  # block_time is 1 s


@pytest.fixture(scope="module")
def wallets(tmp_path_factory):
    """Wallets `w0`..`w11`: one coldkey, a hotkey each."""
    path = str(tmp_path_factory.mktemp("wallets"))
    bt.Wallet(name="cold", hotkey="w0", path=path).create_new_coldkey(
        use_password=False, overwrite=True, suppress=True
    )
    made = []
    for i in range(12):
        wallet = bt.Wallet(name="cold", hotkey=f"w{i}", path=path)
        wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
        made.append(wallet)
    return made


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def chain(tmp_path, clock):
    chain = LocalChain(tmp_path / "chain.db", block_time=1.0, clock=clock)
    chain.create_subnet(NETUID, max_uids=8, weights_rate_limit=10, min_validator_stake=10.0, max_validators=2)
    return chain


def hotkey(wallet) -> str:
    return wallet.hotkey.ss58_address


def test_blocks_advance_with_time_from_a_shared_genesis(tmp_path, clock):
    chain = LocalChain(tmp_path / "chain.db", block_time=2.0, clock=clock)
    assert chain.block() == 0
    clock.advance(5)
    assert chain.block() == 2
    # Another process opening the file sees the same genesis and block time, whatever it asks for.
    again = LocalChain(tmp_path / "chain.db", block_time=0.5, clock=clock)
    assert (again.block(), again.block_time) == (2, 2.0)


def test_registration_gives_the_lowest_free_uids(chain, clock, wallets):
    clock.advance(3)
    assert [chain.register(NETUID, w) for w in wallets[:3]] == [(0, True), (1, True), (2, True)]
    assert chain.register(NETUID, wallets[1]) == (1, False)
    graph = chain.metagraph(NETUID)
    assert [n.hotkey for n in graph.neurons] == [hotkey(w) for w in wallets[:3]]
    first = graph.by_uid(0)
    assert first.coldkey == wallets[0].coldkeypub.ss58_address
    assert (first.stake, first.axon, first.registered_at, first.last_update) == (0.0, None, 3, 3)
    assert chain.uid_of(NETUID, hotkey(wallets[2])) == 2 and chain.uid_of(NETUID, "nobody") is None


def test_registration_needs_an_existing_subnet(chain, wallets):
    with pytest.raises(ChainError, match="subnet 3 does not exist"):
        chain.register(3, wallets[0])
    assert chain.create_subnet(3) is True
    assert chain.create_subnet(3, max_uids=1) is False  # idempotent: the first settings stay
    assert chain.register(3, wallets[0]) == (0, True)
    assert chain.register(3, wallets[1]) == (1, True)


def test_a_full_subnet_prunes_the_lowest_incentive_after_immunity(tmp_path, clock, wallets):
    chain = LocalChain(tmp_path / "chain.db", clock=clock)
    chain.create_subnet(NETUID, max_uids=4, immunity_period=5, min_validator_stake=1.0, weights_rate_limit=0)
    old, validator, strong, weak = wallets[:4]
    for w in (old, validator, strong, weak):  # uids 0..3, registered at blocks 0..3
        chain.register(NETUID, w)
        clock.advance(1)
    chain.add_stake(NETUID, hotkey(validator), 100.0)
    chain.set_weights(NETUID, validator, [2, 3], [0.9, 0.1])

    with pytest.raises(ChainError, match="every uid is immune or a validator; retry in 1 blocks"):
        chain.register(NETUID, wallets[4])
    clock.advance(1)
    # old and the validator earn nothing, but the validator holds a permit: old's uid is given away.
    assert chain.register(NETUID, wallets[4]) == (0, True)
    assert chain.uid_of(NETUID, hotkey(old)) is None

    chain.add_stake(NETUID, hotkey(weak), 0.5)
    chain.serve_axon(NETUID, weak, "10.0.0.9", 9000)
    chain.set_weights(NETUID, validator, [0, 2, 3], [0.5, 0.4, 0.1])
    clock.advance(5)
    assert chain.register(NETUID, wallets[5]) == (3, True)  # weak, now the lowest incentive
    graph = chain.metagraph(NETUID)
    newcomer = graph.by_uid(3)
    assert newcomer.hotkey == hotkey(wallets[5])
    assert (newcomer.stake, newcomer.axon, newcomer.incentive) == (0.0, None, 0.0)
    # The validator's weight on the pruned uid went with it.
    assert graph.by_uid(0).incentive == pytest.approx(0.5 / 0.9)


def test_pruning_ties_go_to_the_oldest_registration(tmp_path, clock, wallets):
    chain = LocalChain(tmp_path / "chain.db", clock=clock)
    chain.create_subnet(NETUID, max_uids=2, immunity_period=0)
    for w in wallets[:3]:
        chain.register(NETUID, w)  # the third takes uid 0, registered first
        clock.advance(1)
    assert chain.uid_of(NETUID, hotkey(wallets[2])) == 0
    assert chain.register(NETUID, wallets[3]) == (1, True)


def test_permits_go_to_the_top_stakes_above_the_minimum(chain, wallets):
    for w, stake in zip(wallets[:4], (40.0, 5.0, 30.0, 20.0)):
        chain.register(NETUID, w)
        chain.add_stake(NETUID, hotkey(w), stake)
    permits = [n.validator_permit for n in chain.metagraph(NETUID).neurons]
    assert permits == [True, False, True, False]  # max_validators=2 of those with stake >= 10
    assert chain.add_stake(NETUID, hotkey(wallets[3]), 25.0) == 45.0
    assert [n.validator_permit for n in chain.metagraph(NETUID).neurons] == [True, False, False, True]
    with pytest.raises(NotRegistered):
        chain.add_stake(NETUID, hotkey(wallets[9]), 1.0)
    with pytest.raises(ChainError, match="only 5.0 staked"):
        chain.add_stake(NETUID, hotkey(wallets[1]), -6.0)


def test_validator_permits_rule():
    assert validator_permits({0: 5.0, 1: 5.0, 2: 9.0, 3: 1.0}, max_validators=2, min_stake=2.0) == {0, 2}
    assert validator_permits({0: 1.0}, max_validators=4, min_stake=2.0) == set()


def test_setting_weights_needs_a_permit(chain, wallets):
    chain.register(NETUID, wallets[0])
    with pytest.raises(ChainError, match="no validator permit on subnet 1: a permit needs stake >= 10.0"):
        chain.set_weights(NETUID, wallets[0], [0], [1.0])
    with pytest.raises(NotRegistered):
        chain.set_weights(NETUID, wallets[1], [0], [1.0])


def test_weights_are_rate_limited_per_hotkey(chain, clock, wallets):
    chain.register(NETUID, wallets[0])
    chain.add_stake(NETUID, hotkey(wallets[0]), 10.0)
    clock.advance(4)
    chain.set_weights(NETUID, wallets[0], [0], [1.0])
    assert chain.metagraph(NETUID).by_uid(0).last_update == 4
    clock.advance(3)
    with pytest.raises(ChainError, match="3 blocks ago; the rate limit is 10 blocks, so wait 7 more"):
        chain.set_weights(NETUID, wallets[0], [0], [1.0])
    clock.advance(7)
    chain.set_weights(NETUID, wallets[0], [0], [1.0])
    assert chain.metagraph(NETUID).by_uid(0).last_update == 14


def test_incentive_is_the_stake_weighted_consensus(chain, wallets):
    big, small, a, b = wallets[:4]
    for w, stake in ((big, 30.0), (small, 10.0), (a, 0.0), (b, 0.0)):
        chain.register(NETUID, w)
        chain.add_stake(NETUID, hotkey(w), stake)
    # Agreeing validators: incentive is their stake-weighted mean.
    chain.set_weights(NETUID, big, [2, 3], [3.0, 1.0])
    chain.set_weights(NETUID, small, [2, 3], [0.75, 0.25])
    incentive = [n.incentive for n in chain.metagraph(NETUID).neurons]
    assert incentive == pytest.approx([0.0, 0.0, 0.75, 0.25])


def test_a_minority_validator_cannot_lift_a_uid_alone():
    stakes = {0: 30.0, 1: 10.0}
    # Validator 1 (a quarter of the stake) alone weighs uid 3: its weight is clipped to the consensus, 0.
    incentive = consensus_incentive(stakes, {0: {2: 1.0}, 1: {2: 0.5, 3: 0.5}})
    assert incentive == pytest.approx({2: 1.0, 3: 0.0})
    # With a majority behind uid 3 as well, it earns: the clipped weights are 0.5 and 0.5.
    incentive = consensus_incentive({0: 30.0, 1: 10.0}, {0: {2: 0.5, 3: 0.5}, 1: {2: 0.5, 3: 0.5}})
    assert incentive == pytest.approx({2: 0.5, 3: 0.5})
    assert consensus_incentive({0: 0.0}, {0: {1: 1.0}}) == {}


def test_a_validator_that_loses_its_permit_stops_counting(chain, wallets):
    for w in wallets[:3]:
        chain.register(NETUID, w)
    chain.add_stake(NETUID, hotkey(wallets[0]), 10.0)
    chain.set_weights(NETUID, wallets[0], [1], [1.0])
    assert chain.metagraph(NETUID).by_uid(1).incentive == 1.0
    chain.add_stake(NETUID, hotkey(wallets[0]), -5.0)
    assert chain.metagraph(NETUID).by_uid(1).incentive == 0.0


@pytest.mark.parametrize(
    "uids, weights, message",
    [
        ([0, 1], [1.0], "got 2 uids but 1 weights"),
        ([], [], "no weights given"),
        ([0, 0], [1.0, 1.0], "duplicate uids"),
        ([0], [float("nan")], "finite"),
        ([0], [float("inf")], "finite"),
        ([0, 1], [1.0, -0.5], ">= 0"),
        ([0, 1], [0.0, 0.0], "all weights are zero"),
        ([-1], [1.0], "uids must be >= 0"),
        ([0.5], [1.0], "uids must be integers"),
        ([5], [1.0], r"uids \[5\] are not registered on subnet 1"),
    ],
)
def test_bad_weights_are_refused(chain, wallets, uids, weights, message):
    chain.register(NETUID, wallets[0])
    chain.add_stake(NETUID, hotkey(wallets[0]), 10.0)
    with pytest.raises(ChainError, match=message):
        chain.set_weights(NETUID, wallets[0], uids, weights)


def test_serving_an_axon(chain, wallets):
    chain.register(NETUID, wallets[0])
    chain.serve_axon(NETUID, wallets[0], "127.0.0.1", 8091)
    assert str(chain.metagraph(NETUID).by_uid(0).axon) == "127.0.0.1:8091"
    for ip, port in (("127.0.0.1", 0), ("127.0.0.1", 65536), ("", 8091), ("127.0.0.1", True)):
        with pytest.raises(ChainError, match="axon"):
            chain.serve_axon(NETUID, wallets[0], ip, port)
    with pytest.raises(NotRegistered):
        chain.serve_axon(NETUID, wallets[1], "127.0.0.1", 8092)
    with pytest.raises(ChainError, match="subnet 9 does not exist"):
        chain.metagraph(9)


# Run in fresh interpreters: each registers its hotkeys as soon as the `go` file appears.
REGISTER = textwrap.dedent(
    """
    import json, os, sys, time
    import bittensor as bt
    from neuron.chain.local import LocalChain

    chain_path, wallet_path, go, *names = sys.argv[1:]
    chain = LocalChain(chain_path)
    wallets = [bt.Wallet(name="cold", hotkey=name, path=wallet_path) for name in names]
    keys = [(w.hotkey.ss58_address, w.coldkeypub.ss58_address) for w in wallets]  # load before the race
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    print(json.dumps({w.hotkey.ss58_address: chain.register(1, w)[0] for w in wallets}))
    """
)
READ = textwrap.dedent(
    """
    import json, sys
    from neuron.chain.local import LocalChain

    graph = LocalChain(sys.argv[1]).metagraph(1)
    print(json.dumps({n.hotkey: n.uid for n in graph.neurons}))
    """
)


def run_python(code: str, *args: str) -> subprocess.Popen:
    """A fresh interpreter running `code`, with this checkout importable."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )


def test_processes_registering_at_once_get_distinct_uids(tmp_path, wallets):
    chain_path, go = tmp_path / "chain.db", tmp_path / "go"
    LocalChain(chain_path).create_subnet(NETUID, max_uids=16)
    wallet_path = wallets[0].path
    names = [f"w{i}" for i in range(12)]
    racers = [run_python(REGISTER, str(chain_path), wallet_path, str(go), *names[i::2]) for i in range(2)]
    for racer in racers:
        assert racer.stdout.readline().strip() == "ready", racer.stderr.read()
    go.touch()
    outputs = [racer.communicate(timeout=60) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], [err for _, err in outputs]
    registered: dict[str, int] = {}
    for out, _ in outputs:
        registered.update(json.loads(out.splitlines()[-1]))
    assert sorted(registered.values()) == list(range(12))
    assert set(registered) == {hotkey(w) for w in wallets}

    reader = run_python(READ, str(chain_path))
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert json.loads(out) == registered


def test_opening_a_missing_chain_without_create_is_an_error_and_creates_nothing(tmp_path):
    path = tmp_path / "typo.db"
    with pytest.raises(ChainError, match=r"typo.db does not exist.*neuron register"):
        LocalChain(path, create=False)
    assert not path.exists()
    LocalChain(path).create_subnet(NETUID)  # the explicit first step creates it
    assert LocalChain(path, create=False).subnet(NETUID).netuid == NETUID


def test_stake_and_unstake_move_the_validator_permit(chain, wallets):
    w = wallets[0]
    chain.register(NETUID, w)
    assert chain.registration_cost(NETUID) == 0.0
    assert chain.stake(NETUID, w, hotkey(w), 12.0) == 12.0
    assert chain.metagraph(NETUID).by_hotkey(hotkey(w)).validator_permit  # min_validator_stake is 10
    assert chain.unstake(NETUID, w, hotkey(w), 3.0) == 9.0
    assert not chain.metagraph(NETUID).by_hotkey(hotkey(w)).validator_permit
    with pytest.raises(ChainError, match="must be positive"):
        chain.stake(NETUID, w, hotkey(w), 0.0)
    with pytest.raises(ChainError, match="only 9.0 staked"):
        chain.unstake(NETUID, w, hotkey(w), 10.0)
