"""The chain over the bittensor 11.x SDK: reads through `bt.Subtensor`, writes as intents it executes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import threading
import time
from typing import Callable, Sequence, TypeVar

import bittensor as bt
from loguru import logger

from neuron.chain.base import (
    AxonAddress,
    ChainError,
    Metagraph,
    NeuronInfo,
    NotRegistered,
    normalise_weights,
)

T = TypeVar("T")

# Failures to reach the node: another try may well succeed. Anything else (a rejected extrinsic,
# a bad argument, a missing permit) would fail the same way again, so it is not retried.
TRANSIENT = (bt.RpcConnectionError, ConnectionError, TimeoutError)


def with_retries(
    op: Callable[[], T],
    what: str,
    *,
    attempts: int = 3,
    backoff_s: float = 1.0,
    max_backoff_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `op`, retrying transient connection errors with capped exponential backoff.

    Every SDK error comes out as ChainError (NotRegistered where the SDK says so), prefixed by `what`.
    """
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except TRANSIENT as exc:
            if attempt >= attempts:
                raise ChainError(f"{what}: chain unreachable after {attempts} attempts: {exc}") from exc
            delay = min(max_backoff_s, backoff_s * 2 ** (attempt - 1))
            logger.warning("{}: {} (attempt {}/{}, retrying in {:.1f}s)", what, exc, attempt, attempts, delay)
            sleep(delay)
        except bt.ChainError as exc:
            error = NotRegistered if exc.code == bt.ErrorCode.NOT_REGISTERED else ChainError
            raise error(f"{what}: {exc.message}") from exc
        except (bt.BittensorError, ValueError) as exc:  # policy blocks, bad weights, unknown network
            raise ChainError(f"{what}: {exc}") from exc
    raise ChainError(f"{what}: attempts must be >= 1, not {attempts}")


class _Subtensor(bt.Subtensor):
    """`bt.Subtensor` whose every blocking call, the connect included, ends by `call_timeout_s`.

    The SDK keeps one websocket per client (websockets' keepalive pings every 20 s; reconnects and
    resubmits pending requests itself), but its blocking facade waits on a call with no deadline, so a
    node that accepts the connection and never answers would hang a validator's round for good. The
    SDK's private loop is the one choke point of every blocking call; the deadline is set there and a
    late call is cancelled on that loop, not left pending.
    """

    def __init__(self, network: str, *, call_timeout_s: float, **kwargs):
        super().__init__(network, **kwargs)
        self.call_timeout_s = call_timeout_s
        self._longer = threading.local()  # a longer deadline for this thread's current call

    @contextlib.contextmanager
    def deadline(self, seconds: float):
        """Calls made by this thread inside the block end by `seconds` (a submission waits for blocks)."""
        self._longer.seconds = seconds
        try:
            yield
        finally:
            self._longer.seconds = None

    def _ensure_loop(self):
        fresh = self._loop_thread is None
        loop = super()._ensure_loop()
        if fresh:
            # Not a bound method: the loop must not keep the client alive (the SDK's GC finalizer).
            loop.call = functools.partial(_call_by_deadline, loop, self._longer, self.call_timeout_s)
        return loop


def _call_by_deadline(loop, longer: threading.local, default_s: float, coro, timeout: float | None = None):
    if loop.is_shutdown:
        coro.close()
        raise RuntimeError("the chain client is closed")
    timeout = timeout or getattr(longer, "seconds", None) or default_s
    future = asyncio.run_coroutine_threadsafe(coro, loop._loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"no answer from the chain node in {timeout:g} s") from None


class SubtensorChain:
    """The Chain protocol over a subtensor node (`finney`, `test`, `local`, or a ws:// / wss:// URL)."""

    def __init__(
        self,
        network: str = "finney",
        *,
        substrate: bt.Substrate | None = None,
        pow_register: bool = False,
        attempts: int = 3,
        backoff_s: float = 1.0,
        max_backoff_s: float = 10.0,
        wait_for_finalization: bool = False,
        pow_workers: int = 4,
        pow_timeout_s: float = 300.0,
        call_timeout_s: float = 30.0,
        submit_timeout_s: float = 120.0,
    ):
        """`substrate` replaces the SDK's RPC backend (tests); `pow_register` registers by proof of work;
        `call_timeout_s` bounds every read from the node and `submit_timeout_s` every submission (which
        waits for inclusion); a timeout is retried like a dropped connection."""
        self.network = network
        self.pow_register = pow_register
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.wait_for_finalization = wait_for_finalization
        self.pow_workers = pow_workers
        self.pow_timeout_s = pow_timeout_s
        self.submit_timeout_s = submit_timeout_s
        try:
            # Cold: nothing connects until the first read, so an offline start-up is cheap.
            self._sub = _Subtensor(network, substrate=substrate, call_timeout_s=call_timeout_s)
        except ValueError as exc:
            raise ChainError(str(exc)) from exc

    def close(self) -> None:
        """Close the connection and the SDK's private event loop."""
        worker = self._sub._loop_thread  # None until the first blocking call
        self._sub.close()
        # bittensor 11.3 stops its private event loop but never closes it, leaking the loop and its
        # two self-pipe sockets (ResourceWarning) per client; close it once its thread has stopped.
        if worker is not None and not worker._loop.is_running():
            worker._loop.close()

    def __enter__(self) -> SubtensorChain:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _run(self, what: str, op: Callable[[], T]) -> T:
        return with_retries(
            op, what, attempts=self.attempts, backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s
        )

    def _uid(self, netuid: int, hotkey: str) -> int | None:
        raw = self._sub.query(bt.storage.SubtensorModule.Uids, [netuid, hotkey])
        return None if raw is None else int(raw)

    def _execute(self, intent: bt.Intent, wallet) -> None:
        """Sign and submit `intent`, waiting for inclusion; a failed extrinsic raises."""
        with self._sub.deadline(self.submit_timeout_s):
            result = self._sub.execute(
                intent,
                wallet,
                wait_for_inclusion=True,
                wait_for_finalization=self.wait_for_finalization,
                retries=2,  # the SDK's own resubmission on transient pool rejections (nonce races)
            )
        if not result.success:
            raise result.error or bt.ChainError(result.message or "extrinsic failed")

    # Chain protocol ---------------------------------------------------------

    def block(self) -> int:
        return self._run("reading the block number", lambda: int(self._sub.block))

    def uid_of(self, netuid: int, hotkey: str) -> int | None:
        """The hotkey's uid on the subnet, or None."""
        return self._run(f"looking up {hotkey} on subnet {netuid}", lambda: self._uid(netuid, hotkey))

    def register(self, netuid: int, wallet) -> tuple[int, bool]:
        """Register by burning TAO (or by proof of work); no extrinsic when the hotkey already has a uid."""
        hotkey = wallet.hotkey.ss58_address
        what = f"registering {hotkey} on subnet {netuid} of {self.network}"

        def once() -> tuple[int, bool]:
            # Checked inside the retried step, so a retry after a submission that did land is a no-op.
            uid = self._uid(netuid, hotkey)
            if uid is not None:
                return uid, False
            if not self._sub.query(bt.storage.SubtensorModule.NetworksAdded, [netuid]):
                raise ChainError(f"{what}: subnet {netuid} does not exist")
            self._execute(self._registration(netuid, wallet, what), wallet)
            uid = self._uid(netuid, hotkey)
            if uid is None:
                raise ChainError(f"{what}: the extrinsic was included but the hotkey has no uid")
            return uid, True

        return self._run(what, once)

    def _registration(self, netuid: int, wallet, what: str) -> bt.Intent:
        hotkey = wallet.hotkey.ss58_address
        if not self.pow_register:
            return bt.BurnedRegister(netuid=netuid, hotkey_ss58=hotkey)
        coldkey = wallet.coldkeypub.ss58_address
        try:
            with self._sub.deadline(self.pow_timeout_s + self._sub.call_timeout_s):
                return self._sub.mine_pow_registration(
                    netuid, hotkey, coldkey, workers=self.pow_workers, max_seconds=self.pow_timeout_s
                )
        except TimeoutError as exc:  # no proof in time: not a connection problem, so not retried
            raise ChainError(f"{what}: {exc}") from exc

    def registration_cost(self, netuid: int) -> float:
        """The TAO a burned registration on `netuid` costs now (it changes with demand)."""
        what = f"reading the registration cost of subnet {netuid}"
        raw = self._run(what, lambda: self._sub.query(bt.storage.SubtensorModule.Burn, [netuid]))
        if raw is None:
            raise ChainError(f"{what}: subnet {netuid} does not exist on {self.network}")
        return _tao(raw)

    def stake(self, netuid: int, wallet, hotkey: str, amount: float) -> None:
        """Stake `amount` TAO from the wallet's coldkey onto `hotkey` (swapped to the subnet's alpha)."""
        if not amount > 0:
            raise ChainError(f"the amount to stake must be positive, not {amount}")
        what = f"staking {amount} TAO onto {hotkey} on subnet {netuid}"
        intent = bt.AddStake(hotkey_ss58=hotkey, netuid=netuid, amount_tao=amount)
        self._run(what, lambda: self._execute(intent, wallet))

    def unstake(self, netuid: int, wallet, hotkey: str, amount: float) -> None:
        """Unstake `amount` (alpha) from `hotkey` back to the wallet's coldkey."""
        if not amount > 0:
            raise ChainError(f"the amount to unstake must be positive, not {amount}")
        what = f"unstaking {amount} from {hotkey} on subnet {netuid}"
        intent = bt.RemoveStake(hotkey_ss58=hotkey, netuid=netuid, amount_alpha=amount)
        self._run(what, lambda: self._execute(intent, wallet))

    def serve_axon(self, netuid: int, wallet, ip: str, port: int) -> None:
        try:
            ipaddress.ip_address(ip)  # the chain stores the address as an integer, so no host names
        except ValueError as exc:
            raise ChainError(f"axon ip must be an IP address: {exc}") from exc
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ChainError(f"axon port must be in 1..65535, not {port!r}")
        hotkey = wallet.hotkey.ss58_address
        what = f"serving axon {ip}:{port} for {hotkey} on subnet {netuid}"

        def once() -> None:
            if self._uid(netuid, hotkey) is None:
                raise NotRegistered(f"{what}: the hotkey is not registered on subnet {netuid}")
            self._execute(bt.ServeAxon(netuid=netuid, ip=ip, port=port), wallet)

        self._run(what, once)

    def set_weights(self, netuid: int, wallet, uids: Sequence[int], weights: Sequence[float]) -> None:
        """Set weights; the SDK preflights registration and the rate limit, and quantises to u16."""
        row = normalise_weights(uids, weights)
        what = f"setting weights on subnet {netuid}"

        def once() -> None:
            self._execute(bt.SetWeights(netuid=netuid, uids=list(row), weights=list(row.values())), wallet)

        self._run(what, once)

    def metagraph(self, netuid: int) -> Metagraph:
        what = f"reading the metagraph of subnet {netuid}"
        graph = self._run(what, lambda: self._sub.subnets.metagraph(netuid, commitments=False))
        if graph is None:
            raise ChainError(f"{what}: subnet {netuid} does not exist on {self.network}")
        neurons = tuple(
            NeuronInfo(
                uid=n.uid,
                hotkey=n.hotkey,
                coldkey=n.coldkey,
                # Stake on a subnet is counted in its alpha token since dynamic TAO, not in TAO.
                stake=n.total_stake.amount,
                validator_permit=n.validator_permit,
                axon=_axon(n.axon),
                last_update=n.last_update,
                incentive=n.incentive,
                registered_at=n.block_at_registration,
            )
            for n in graph.neurons
        )
        return Metagraph(netuid=netuid, block=graph.block, neurons=neurons)


def _tao(raw) -> float:
    """A storage balance (rao as an int, or an SDK Balance) in TAO."""
    if isinstance(raw, bt.Balance):
        return float(raw.tao)
    return int(raw) / 1e9


def _axon(endpoint: str | None) -> AxonAddress | None:
    """The SDK's "ip:port" / "[ipv6]:port" as an AxonAddress; None when nothing is served."""
    if not endpoint:
        return None
    host, _, port = endpoint.rpartition(":")
    return AxonAddress(host.strip("[]"), int(port))
