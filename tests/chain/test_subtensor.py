"""SubtensorChain against a fake substrate injected at the SDK's own seam."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

import bittensor as bt
import pytest

from neuron.chain import ChainError, NotRegistered
from neuron.chain.subtensor import SubtensorChain, with_retries

NETUID = 7
Call = bt.calls.Call


class FakeSubstrate:
    """An in-memory stand-in for the SDK's RPC backend (`bt.Client(substrate=...)`).

    No subtensor node can run here, so the adapter is tested at the seam the SDK provides for this:
    the real SDK client, executor and intents run on top, and the tests assert on the calls they
    compose, sign and submit. Storage is a dict keyed by (pallet, item, params).
    """

    def __init__(self, fail_connects: int = 0):
        self.hang_connects = 0  # the next connects that never answer
        self.hang_reads = 0  # the next block-number reads that never answer
        self.drop_reads = 0  # the next block-number reads whose connection drops
        self.cancelled = 0  # hung calls cancelled by the caller's deadline
        self.submit_delay_s = 0.0  # how long a submission waits for its block
        self.token_symbols: dict[int, str] = {}
        self.storage: dict[tuple, object] = {("SubtensorModule", "NetworksAdded", (NETUID,)): True}
        self.head = 100
        self.fail_connects = fail_connects
        self.connects = 0
        self.submitted: list[Call] = []  # every call submitted, in order
        self.signed: list[Call] = []  # inner calls signed for a MEV-shielded carrier
        self.reject: bt.ChainError | None = None  # set to make the next submission fail on chain
        self.graph: dict | None = None  # what SubnetInfoRuntimeApi.get_metagraph returns
        self.alpha_price = 2 * 10**9  # rao of TAO per alpha (SwapRuntimeApi.current_alpha_price)

    def balance(self, rao: int, netuid: int = 0) -> bt.Balance:
        return bt.Balance(int(rao), netuid)

    async def connect(self) -> None:
        self.connects += 1
        if self.connects <= self.fail_connects:
            raise bt.RpcConnectionError("could not connect to any endpoint: connection refused")
        if self.hang_connects:
            self.hang_connects -= 1
            await self._hang()

    async def _hang(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def close(self) -> None:
        pass

    async def block_hash(self, block: int | None = None) -> str:
        return "0x" + (self.head if block is None else block).to_bytes(32, "big").hex()

    async def block_number(self) -> int:
        if self.drop_reads:
            self.drop_reads -= 1
            raise bt.RpcConnectionError("connection to ws://node lost (1006)")
        if self.hang_reads:
            self.hang_reads -= 1
            await self._hang()
        return self.head

    async def finalized_block_number(self) -> int:
        return self.head

    async def block_time(self) -> float:
        return 12.0

    async def query(self, module, name, params=None, block_hash=None):
        return self.storage.get((module, name, tuple(params or [])))

    async def query_map(self, module, name, params=None, block_hash=None):
        return []

    async def runtime_call(self, api, method, params, block_hash=None):
        if (api, method) == ("SwapRuntimeApi", "current_alpha_price"):  # staking's slippage limit
            assert params == [NETUID]
            return self.alpha_price
        assert (api, method, params) == ("SubnetInfoRuntimeApi", "get_metagraph", [NETUID])
        return self.graph

    async def compose(self, call: Call) -> Call:
        return call  # the generated Call (pallet, function, params) is all the tests look at

    async def estimate_fee(self, call, keypair) -> bt.Balance:
        return bt.Balance(0)

    async def account_next_index(self, address: str) -> int:
        return 0

    async def mev_next_key(self) -> bytes:
        return bytes(1184)  # a valid (all-zero) ML-KEM-768 public key: encryption works, nothing decrypts

    async def sign_extrinsic(self, call, keypair, *, nonce, period):
        self.signed.append(call)
        return b"inner", "0x" + "11" * 32

    async def submit(self, call, keypair, **_options) -> bt.ExtrinsicResult:
        await asyncio.sleep(self.submit_delay_s)
        self.submitted.append(call)
        self.head += 1
        if self.reject is not None:
            error, self.reject = self.reject, None
            return bt.ExtrinsicResult(success=False, message=error.message, error=error)
        inner = self.signed[-1] if call.module == "MevShield" else call
        if inner.function in ("burned_register", "pow_register"):
            registered = [k for k in self.storage if k[1] == "Uids"]
            self.storage[("SubtensorModule", "Uids", (NETUID, inner.params["hotkey"]))] = len(registered)
        return await self._included()

    async def find_extrinsic(self, extrinsic_hash, block_hash) -> bt.ExtrinsicResult:
        return await self._included()

    async def _included(self) -> bt.ExtrinsicResult:
        block_hash = await self.block_hash()
        return bt.ExtrinsicResult(success=True, block_hash=block_hash, extrinsic_id=f"{self.head}-0001")


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
    # Connecting caches token symbols on disk; keep that out of the home directory.
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path / "symbols.json"))


@pytest.fixture(scope="module")
def wallet(tmp_path_factory):
    wallet = bt.Wallet(name="cold", hotkey="hot", path=str(tmp_path_factory.mktemp("wallets")))
    wallet.create_new_coldkey(use_password=False, overwrite=True, suppress=True)
    wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    return wallet


@pytest.fixture
def fake():
    return FakeSubstrate()


@pytest.fixture
def chain(fake):
    with SubtensorChain("local", substrate=fake, attempts=3, backoff_s=0.001) as chain:
        yield chain


def registered(fake: FakeSubstrate, wallet, uid: int = 0) -> None:
    fake.storage[("SubtensorModule", "Uids", (NETUID, wallet.hotkey.ss58_address))] = uid


def test_register_burns_through_the_mev_shield(chain, fake, wallet):
    hotkey = wallet.hotkey.ss58_address
    assert chain.register(NETUID, wallet) == (0, True)
    # BurnedRegister must go MEV-shielded: the carrier is submitted, the registration signed inside it.
    assert fake.signed == [Call("SubtensorModule", "burned_register", {"netuid": NETUID, "hotkey": hotkey})]
    assert [(c.module, c.function) for c in fake.submitted] == [("MevShield", "submit_encrypted")]
    assert chain.uid_of(NETUID, hotkey) == 0


def test_register_when_registered_submits_nothing(chain, fake, wallet):
    registered(fake, wallet, uid=5)
    assert chain.register(NETUID, wallet) == (5, False)
    assert fake.submitted == [] and fake.signed == []


def test_register_on_a_missing_subnet(chain, fake, wallet):
    del fake.storage[("SubtensorModule", "NetworksAdded", (NETUID,))]
    with pytest.raises(ChainError, match=f"subnet {NETUID} does not exist"):
        chain.register(NETUID, wallet)
    assert fake.submitted == []


def test_pow_register_submits_the_mined_proof(fake, wallet):
    module = "SubtensorModule"
    fake.storage.update(
        {
            (module, "NetworkPowRegistrationAllowed", (NETUID,)): True,
            (module, "Difficulty", (NETUID,)): 1,
            (module, "MaxRegistrationsPerBlock", (NETUID,)): 1,
        }
    )
    with SubtensorChain("local", substrate=fake, pow_register=True, pow_workers=1, pow_timeout_s=30) as chain:
        assert chain.register(NETUID, wallet) == (0, True)
    [call] = fake.submitted
    assert (call.module, call.function) == (module, "pow_register")
    assert call.params["netuid"] == NETUID and call.params["hotkey"] == wallet.hotkey.ss58_address
    assert call.params["work_block"] == 100 and len(call.params["work"]) == 32


def test_serve_axon_submits_the_address(chain, fake, wallet):
    registered(fake, wallet)
    chain.serve_axon(NETUID, wallet, "10.0.0.2", 8091)
    expected = {
        "netuid": NETUID,
        "version": 1,
        "ip": int(ipaddress.IPv4Address("10.0.0.2")),
        "port": 8091,
        "ip_type": 4,
        "protocol": 4,
        "placeholder1": 0,
        "placeholder2": 0,
    }
    assert fake.submitted == [Call("SubtensorModule", "serve_axon", expected)]


def test_serve_axon_checks_before_submitting(chain, fake, wallet):
    with pytest.raises(NotRegistered):
        chain.serve_axon(NETUID, wallet, "10.0.0.2", 8091)
    registered(fake, wallet)
    with pytest.raises(ChainError, match="port"):
        chain.serve_axon(NETUID, wallet, "10.0.0.2", 70000)
    with pytest.raises(ChainError, match="IP address"):
        chain.serve_axon(NETUID, wallet, "my-host", 8091)
    assert fake.submitted == []


def test_set_weights_submits_u16_weights(chain, fake, wallet):
    registered(fake, wallet)
    chain.set_weights(NETUID, wallet, [0, 1], [1.0, 3.0])
    params = {"netuid": NETUID, "mecid": 0, "dests": [0, 1], "weights": [21845, 65535], "version_key": 0}
    assert fake.submitted == [Call("SubtensorModule", "set_mechanism_weights", params)]


def test_set_weights_rate_limit_says_how_long_to_wait(chain, fake, wallet):
    registered(fake, wallet)
    fake.storage[("SubtensorModule", "WeightsSetRateLimit", (NETUID,))] = 100
    fake.storage[("SubtensorModule", "LastUpdate", (NETUID,))] = [95]
    with pytest.raises(ChainError, match="Retry in ~95 blocks"):
        chain.set_weights(NETUID, wallet, [0], [1.0])
    assert fake.submitted == []


def test_set_weights_unregistered_or_bad_input(chain, fake, wallet):
    with pytest.raises(NotRegistered, match="not registered"):
        chain.set_weights(NETUID, wallet, [0], [1.0])
    with pytest.raises(ChainError, match="all weights are zero"):
        chain.set_weights(NETUID, wallet, [0, 1], [0.0, 0.0])
    with pytest.raises(ChainError, match="finite"):
        chain.set_weights(NETUID, wallet, [0], [float("nan")])
    assert fake.submitted == []


def test_rejected_extrinsic_is_a_chain_error(chain, fake, wallet):
    registered(fake, wallet)
    fake.reject = bt.ChainError("The neuron has no validator permit.", "NeuronNoValidatorPermit")
    with pytest.raises(ChainError, match="setting weights on subnet 7: The neuron has no validator permit"):
        chain.set_weights(NETUID, wallet, [0], [1.0])
    assert len(fake.submitted) == 1  # a chain-side rejection is not retried


def test_metagraph_maps_the_sdk_metagraph(chain, fake):
    fake.graph = {
        "block": 123,
        "tempo": 360,
        "last_step": 0,
        "blocks_since_last_step": 0,
        "owner_hotkey": "owner-hot",
        "owner_coldkey": "owner-cold",
        "network_registered_at": 1,
        "hotkeys": ["hot-a", "hot-b"],
        "coldkeys": ["cold-a", "cold-b"],
        "axons": [{"ip": int(ipaddress.IPv4Address("1.2.3.4")), "port": 8091, "ip_type": 4}, {"ip": 0}],
        "validator_permit": [True, False],
        "last_update": [120, 90],
        "block_at_registration": [10, 20],
        "incentives": [0, 65535],
        "total_stake": [5 * 10**9, 0],
    }
    graph = chain.metagraph(NETUID)
    assert graph.block == 123 and [n.uid for n in graph.neurons] == [0, 1]
    a, b = graph.neurons
    assert (a.hotkey, a.coldkey, a.stake, a.validator_permit) == ("hot-a", "cold-a", 5.0, True)
    assert str(a.axon) == "1.2.3.4:8091" and b.axon is None
    assert (a.last_update, a.registered_at, a.incentive) == (120, 10, 0.0)
    assert b.incentive == 1.0 and graph.by_hotkey("hot-b") is b


def test_metagraph_of_a_missing_subnet(chain, fake):
    with pytest.raises(ChainError, match="does not exist"):
        chain.metagraph(NETUID)


def test_connection_failure_becomes_chain_error_after_retries():
    fake = FakeSubstrate(fail_connects=99)
    with SubtensorChain("local", substrate=fake, attempts=3, backoff_s=0.001) as chain:
        with pytest.raises(ChainError, match="reading the block number: chain unreachable after 3 attempts"):
            chain.block()
    assert fake.connects == 3


def test_transient_connection_failure_is_retried():
    fake = FakeSubstrate(fail_connects=2)
    with SubtensorChain("local", substrate=fake, attempts=3, backoff_s=0.001) as chain:
        assert chain.block() == 100
    assert fake.connects == 3


def test_a_node_that_stops_answering_costs_one_deadline_per_attempt():
    """A read the node never answers ends at the call deadline, is cancelled on the SDK's loop (not left
    pending), and the retry goes through; a node that never answers is a ChainError in bounded time."""
    fake = FakeSubstrate()
    with SubtensorChain("local", substrate=fake, attempts=3, backoff_s=0.001, call_timeout_s=0.2) as chain:
        fake.hang_reads = 1
        assert chain.block() == 100
        assert fake.cancelled == 1
        fake.hang_reads = 99
        start = time.monotonic()
        with pytest.raises(ChainError, match="unreachable after 3 attempts: no answer from the chain node in 0.2 s"):
            chain.block()
        assert time.monotonic() - start < 3.0
        until = time.monotonic() + 2.0  # the cancellation runs on the SDK's loop thread
        while fake.cancelled < 4 and time.monotonic() < until:
            time.sleep(0.01)
        assert fake.cancelled == 4


def test_a_connect_that_hangs_is_retried():
    fake = FakeSubstrate()
    fake.hang_connects = 1
    with SubtensorChain("local", substrate=fake, attempts=2, backoff_s=0.001, call_timeout_s=0.2) as chain:
        assert chain.block() == 100
    assert fake.connects == 2 and fake.cancelled == 1


def test_a_dropped_connection_is_retried_on_the_same_client():
    fake = FakeSubstrate()
    with SubtensorChain("local", substrate=fake, attempts=3, backoff_s=0.001) as chain:
        fake.drop_reads = 2
        assert chain.block() == 100
        fake.drop_reads = 3
        with pytest.raises(ChainError, match="unreachable after 3 attempts: connection to ws://node lost"):
            chain.block()
        assert chain.block() == 100  # the client still serves once the node is back
    assert fake.connects == 1  # one long-lived connection: the SDK reconnects underneath, not us


def test_a_submission_waits_for_its_block_past_the_read_deadline(fake, wallet):
    fake.submit_delay_s = 0.5
    with SubtensorChain("local", substrate=fake, backoff_s=0.001, call_timeout_s=0.2, submit_timeout_s=5.0) as chain:
        registered(fake, wallet)
        chain.set_weights(NETUID, wallet, [0], [1.0])
    assert len(fake.submitted) == 1


def test_unreachable_endpoint_becomes_chain_error():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with SubtensorChain(f"ws://127.0.0.1:{port}", attempts=2, backoff_s=0.001) as chain:
        with pytest.raises(ChainError, match="unreachable after 2 attempts"):
            chain.block()


def test_unknown_network_is_a_chain_error():
    with pytest.raises(ChainError, match="Unknown network"):
        SubtensorChain("nowhere")


def test_backoff_doubles_up_to_the_cap():
    delays: list[float] = []

    def down():
        raise ConnectionError("down")

    with pytest.raises(ChainError, match="reading: chain unreachable after 5 attempts: down"):
        with_retries(down, "reading", attempts=5, backoff_s=1.0, max_backoff_s=5.0, sleep=delays.append)
    assert delays == [1.0, 2.0, 4.0, 5.0]


def test_registration_cost_is_the_burn_in_tao(chain, fake):
    fake.storage[("SubtensorModule", "Burn", (NETUID,))] = 2_500_000_000
    assert chain.registration_cost(NETUID) == 2.5
    del fake.storage[("SubtensorModule", "Burn", (NETUID,))]
    with pytest.raises(ChainError, match=f"subnet {NETUID} does not exist"):
        chain.registration_cost(NETUID)
    assert fake.submitted == []


def test_stake_and_unstake_submit_slippage_limited_calls(chain, fake, wallet):
    hotkey = wallet.hotkey.ss58_address
    chain.stake(NETUID, wallet, hotkey, 3.0)
    chain.unstake(NETUID, wallet, hotkey, 1.5)
    add, remove = fake.submitted
    assert (add.module, add.function) == ("SubtensorModule", "add_stake_limit")
    assert add.params["hotkey"] == hotkey and add.params["netuid"] == NETUID
    assert add.params["amount_staked"] == 3_000_000_000
    # A limit 5% above the pool price (2 TAO per alpha): never filled at any price.
    assert add.params["limit_price"] == 2_100_000_000 and add.params["allow_partial"] is False
    assert (remove.function, remove.params["amount_unstaked"]) == ("remove_stake_limit", 1_500_000_000)
    assert remove.params["limit_price"] == 1_900_000_000


def test_stake_refuses_a_non_positive_amount(chain, fake, wallet):
    for amount in (0.0, -1.0, float("nan")):
        with pytest.raises(ChainError, match="must be positive"):
            chain.stake(NETUID, wallet, wallet.hotkey.ss58_address, amount)
    assert fake.submitted == []


def test_register_off_a_local_chain_shows_the_burn_and_needs_a_yes(fake, wallet, monkeypatch, capsys):
    """`neuron register` on a real network (the SDK over the fake substrate): the cost, then a confirmation."""
    import neuron.chain
    from neuron import cli

    fake.storage[("SubtensorModule", "Burn", (NETUID,))] = 1_250_000_000
    chains = []

    def open_chain(network, *args, **kwargs):
        chains.append(SubtensorChain(network, substrate=fake, attempts=1))
        return chains[-1]

    monkeypatch.setattr(neuron.chain, "open_chain", open_chain)
    args = ["register", "--netuid", str(NETUID), "--subtensor.network", "finney", "--wallet.name", "cold",
            "--wallet.hotkey", "hot", "--wallet.path", wallet.path]
    try:
        assert cli.main(args) == 1  # pytest's stdin is no terminal: nothing to ask on, so no
        err = capsys.readouterr().err
        assert "burns 1.250000000 TAO" in err and "not confirmed" in err and "--yes" in err
        assert fake.submitted == [] and fake.signed == []
        assert cli.main([*args, "--yes"]) == 0
        assert [c.function for c in fake.signed] == ["burned_register"]
        assert f"registered hotkey {wallet.hotkey.ss58_address} on netuid {NETUID}" in capsys.readouterr().out
    finally:
        for c in chains:
            c.close()
