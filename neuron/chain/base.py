"""The chain interface shared by miner, validator and CLI, and the values it returns."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Protocol, Sequence


class ChainError(Exception):
    """The chain could not be reached, or it refused what was submitted."""


class NotRegistered(ChainError):
    """The hotkey has no uid on the subnet."""


@dataclass(frozen=True)
class AxonAddress:
    """Where a neuron serves its axon."""

    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class NeuronInfo:
    """One uid of a subnet as the chain sees it."""

    uid: int
    hotkey: str  # ss58
    coldkey: str  # ss58
    stake: float  # in TAO
    validator_permit: bool
    axon: AxonAddress | None  # None until the neuron serves one
    last_update: int  # block of the last weight-set (or registration)
    incentive: float = 0.0  # share of the subnet's incentive, in [0, 1]
    registered_at: int = 0  # block of registration


@dataclass(frozen=True)
class Metagraph:
    """A snapshot of a subnet."""

    netuid: int
    block: int
    neurons: tuple[NeuronInfo, ...]
    _by_hotkey: dict[str, NeuronInfo] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_hotkey.update({n.hotkey: n for n in self.neurons})

    def by_hotkey(self, hotkey: str) -> NeuronInfo | None:
        return self._by_hotkey.get(hotkey)

    def by_uid(self, uid: int) -> NeuronInfo | None:
        for n in self.neurons:
            if n.uid == uid:
                return n
        return None


class Chain(Protocol):
    """What the node needs from the chain. `wallet` is a `bittensor.Wallet`."""

    def block(self) -> int:
        """The current block number."""

    def register(self, netuid: int, wallet) -> tuple[int, bool]:
        """Register the wallet's hotkey; returns (uid, newly_registered)."""

    def serve_axon(self, netuid: int, wallet, ip: str, port: int) -> None:
        """Publish the address of the wallet's axon."""

    def metagraph(self, netuid: int) -> Metagraph:
        """Read the subnet."""

    def set_weights(self, netuid: int, wallet, uids: Sequence[int], weights: Sequence[float]) -> None:
        """Set the wallet's weights over uids (normalised by the chain)."""


def normalise_weights(uids: Sequence[int], weights: Sequence[float]) -> dict[int, float]:
    """Parallel uids and weights as `{uid: weight}` summing to 1; ChainError says what is wrong."""
    try:
        # operator.index accepts numpy and torch integers but not floats.
        uids = [operator.index(u) for u in uids]
        weights = [float(w) for w in weights]
    except (TypeError, ValueError) as exc:
        raise ChainError(f"uids must be integers and weights numbers: {exc}") from exc
    if len(uids) != len(weights):
        raise ChainError(f"got {len(uids)} uids but {len(weights)} weights")
    if not uids:
        raise ChainError("no weights given")
    if any(u < 0 for u in uids):
        raise ChainError(f"uids must be >= 0: {uids}")
    if len(set(uids)) != len(uids):
        raise ChainError(f"duplicate uids: {uids}")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ChainError(f"weights must be finite and >= 0: {weights}")
    total = math.fsum(weights)
    if total <= 0:
        raise ChainError("all weights are zero")
    return {u: w / total for u, w in zip(uids, weights)}
