"""A local chain in one SQLite file, shared by every process of a mock network."""

from __future__ import annotations

import math
import os
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import astuple, dataclass
from typing import Callable, Iterator, Mapping, Sequence

from neuron.chain.base import (
    AxonAddress,
    ChainError,
    Metagraph,
    NeuronInfo,
    NotRegistered,
    normalise_weights,
)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL)",
    """CREATE TABLE IF NOT EXISTS subnets (
        netuid INTEGER PRIMARY KEY,
        max_uids INTEGER NOT NULL,
        weights_rate_limit INTEGER NOT NULL,  -- blocks between two weight-sets of one hotkey
        min_validator_stake REAL NOT NULL,
        max_validators INTEGER NOT NULL,
        immunity_period INTEGER NOT NULL  -- blocks after registration a uid cannot be pruned
    )""",
    """CREATE TABLE IF NOT EXISTS neurons (
        netuid INTEGER NOT NULL,
        uid INTEGER NOT NULL,
        hotkey TEXT NOT NULL,
        coldkey TEXT NOT NULL,
        stake REAL NOT NULL,
        ip TEXT,  -- NULL until the neuron serves an axon
        port INTEGER,
        registered_at INTEGER NOT NULL,
        weights_set_at INTEGER,  -- NULL until the neuron first sets weights
        PRIMARY KEY (netuid, uid),
        UNIQUE (netuid, hotkey)
    )""",
    """CREATE TABLE IF NOT EXISTS weights (
        netuid INTEGER NOT NULL,
        src INTEGER NOT NULL,  -- uid of the validator that set the row
        dst INTEGER NOT NULL,  -- uid it weighs
        weight REAL NOT NULL,  -- src's row sums to 1
        PRIMARY KEY (netuid, src, dst)
    )""",
)


@dataclass(frozen=True)
class Subnet:
    """A subnet's hyperparameters."""

    netuid: int
    max_uids: int
    weights_rate_limit: int
    min_validator_stake: float
    max_validators: int
    immunity_period: int


def validator_permits(stakes: Mapping[int, float], max_validators: int, min_stake: float) -> set[int]:
    """Uids with a permit: the top `max_validators` by stake of those with `min_stake`; ties: lower uid."""
    eligible = [uid for uid, stake in stakes.items() if stake >= min_stake]
    eligible.sort(key=lambda uid: (-stakes[uid], uid))
    return set(eligible[:max_validators])


def consensus_incentive(
    stakes: Mapping[int, float], weights: Mapping[int, Mapping[int, float]], kappa: float = 0.5
) -> dict[int, float]:
    """Incentive per uid from validators' weights (`weights[v][uid]`, each row summing to 1).

    A Yuma-like clipped median: the consensus weight of a uid is the largest w such that validators
    holding more than `kappa` of the stake gave it at least w. Each validator's weight is clipped to
    that consensus, so a minority cannot lift a uid on its own; a uid's rank is the stake-weighted
    mean of the clipped weights, and incentive is rank normalised to sum 1. When the validators
    agree, nothing is clipped and this is the plain stake-weighted mean of their weights.
    """
    total = sum(stakes[v] for v in weights)
    if total <= 0:
        return {}
    rank = {}
    for uid in {u for row in weights.values() for u in row}:
        given = sorted(((row.get(uid, 0.0), stakes[v]) for v, row in weights.items()), reverse=True)
        consensus, backing = 0.0, 0.0
        for w, stake in given:
            backing += stake
            if backing > kappa * total:
                consensus = w
                break
        clipped = (stakes[v] * min(row.get(uid, 0.0), consensus) for v, row in weights.items())
        rank[uid] = sum(clipped) / total
    norm = sum(rank.values())
    return {uid: r / norm for uid, r in rank.items()} if norm > 0 else {}


class LocalChain:
    """The Chain protocol over one SQLite file, safe to share between processes.

    Blocks advance with wall time from the genesis stored in the file; `block_time` applies when the
    file is created, and an existing chain keeps its own. `clock` is the wall clock (tests pass a fake).
    With `create=False` a missing file is an error: a mistyped path must not become a new, empty chain.
    """

    def __init__(self, path, block_time: float = 1.0, *, clock: Callable[[], float] = time.time,
                 create: bool = True):
        if not block_time > 0:
            raise ChainError(f"block_time must be positive, not {block_time}")
        self.path = str(path)
        if not create and not os.path.isfile(self.path):
            raise ChainError(f"local chain {self.path} does not exist (check --subtensor.chain_path); "
                             f"`neuron register --subtensor.network local` creates one")
        self._clock = clock
        try:
            with closing(self._connect()) as db:
                # WAL lets readers (the validator's metagraph) run while a miner registers.
                db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise ChainError(f"local chain {self.path}: {exc}") from exc
        with self._transaction(write=True) as db:
            for statement in _SCHEMA:
                db.execute(statement)
            query = "INSERT OR IGNORE INTO meta VALUES ('genesis', ?), ('block_time', ?)"
            db.execute(query, (clock(), block_time))
            meta = dict(db.execute("SELECT key, value FROM meta"))
        self.genesis: float = meta["genesis"]
        self.block_time: float = meta["block_time"]

    # Plumbing ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # A connection per call: cheap, and safe across threads and forked or spawned processes.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 30000")
        return db

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction; writes take the lock up front (BEGIN IMMEDIATE) so read-then-write is atomic."""
        try:
            db = self._connect()
        except sqlite3.Error as exc:
            raise ChainError(f"local chain {self.path}: {exc}") from exc
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise ChainError(f"local chain {self.path}: {exc}") from exc
        finally:
            db.close()

    @staticmethod
    def _subnet(db: sqlite3.Connection, netuid: int) -> Subnet:
        row = db.execute("SELECT * FROM subnets WHERE netuid = ?", (netuid,)).fetchone()
        if row is None:
            raise ChainError(f"subnet {netuid} does not exist")
        return Subnet(*row)

    @staticmethod
    def _uid(db: sqlite3.Connection, netuid: int, hotkey: str) -> int | None:
        query = "SELECT uid FROM neurons WHERE netuid = ? AND hotkey = ?"
        row = db.execute(query, (netuid, hotkey)).fetchone()
        return None if row is None else row[0]

    @staticmethod
    def _scores(db: sqlite3.Connection, subnet: Subnet) -> tuple[set[int], dict[int, float]]:
        """(uids with a validator permit, incentive per uid), from the current stakes and weights."""
        stakes = dict(db.execute("SELECT uid, stake FROM neurons WHERE netuid = ?", (subnet.netuid,)))
        permits = validator_permits(stakes, subnet.max_validators, subnet.min_validator_stake)
        rows: dict[int, dict[int, float]] = {}
        query = "SELECT src, dst, weight FROM weights WHERE netuid = ?"
        for src, dst, weight in db.execute(query, (subnet.netuid,)):
            if src in permits:  # a validator that lost its permit no longer counts
                rows.setdefault(src, {})[dst] = weight
        return permits, consensus_incentive(stakes, rows)

    # Admin ------------------------------------------------------------------

    def create_subnet(
        self,
        netuid: int,
        max_uids: int = 64,
        weights_rate_limit: int = 10,
        min_validator_stake: float = 1.0,
        max_validators: int = 8,
        immunity_period: int = 10,
    ) -> bool:
        """Create a subnet; returns False (and changes nothing) when it already exists."""
        if min(netuid, weights_rate_limit, max_validators, immunity_period) < 0 or max_uids < 1:
            raise ChainError("create_subnet: every setting must be >= 0, and max_uids >= 1")
        with self._transaction(write=True) as db:
            subnet = Subnet(
                netuid, max_uids, weights_rate_limit, min_validator_stake, max_validators, immunity_period
            )
            query = "INSERT OR IGNORE INTO subnets VALUES (?, ?, ?, ?, ?, ?)"
            cursor = db.execute(query, astuple(subnet))
            return cursor.rowcount == 1

    def add_stake(self, netuid: int, hotkey: str, amount: float) -> float:
        """Add `amount` (negative to remove) to a registered hotkey's stake; returns the new stake."""
        if not math.isfinite(amount):
            raise ChainError(f"stake amount must be finite, not {amount}")
        with self._transaction(write=True) as db:
            self._subnet(db, netuid)
            query = "SELECT stake FROM neurons WHERE netuid = ? AND hotkey = ?"
            row = db.execute(query, (netuid, hotkey)).fetchone()
            if row is None:
                raise NotRegistered(f"hotkey {hotkey} is not registered on subnet {netuid}")
            stake = row[0] + amount
            if stake < 0:
                raise ChainError(f"hotkey {hotkey} has only {row[0]} staked on subnet {netuid}")
            query = "UPDATE neurons SET stake = ? WHERE netuid = ? AND hotkey = ?"
            db.execute(query, (stake, netuid, hotkey))
            return stake

    def subnet(self, netuid: int) -> Subnet:
        """The subnet's hyperparameters (ChainError when it does not exist)."""
        with self._transaction(write=False) as db:
            return self._subnet(db, netuid)

    def stake(self, netuid: int, wallet, hotkey: str, amount: float) -> float:
        """Stake `amount` onto `hotkey` (free on a local chain); returns the hotkey's new stake."""
        if not amount > 0:
            raise ChainError(f"the amount to stake must be positive, not {amount}")
        return self.add_stake(netuid, hotkey, amount)

    def unstake(self, netuid: int, wallet, hotkey: str, amount: float) -> float:
        """Remove `amount` of stake from `hotkey`; returns the hotkey's new stake."""
        if not amount > 0:
            raise ChainError(f"the amount to unstake must be positive, not {amount}")
        return self.add_stake(netuid, hotkey, -amount)

    def registration_cost(self, netuid: int) -> float:
        """What registering costs, in TAO: nothing on a local chain."""
        return 0.0

    # Chain protocol ---------------------------------------------------------

    def block(self) -> int:
        return max(0, int((self._clock() - self.genesis) // self.block_time))

    def uid_of(self, netuid: int, hotkey: str) -> int | None:
        """The hotkey's uid on the subnet, or None."""
        with self._transaction(write=False) as db:
            return self._uid(db, netuid, hotkey)

    def register(self, netuid: int, wallet) -> tuple[int, bool]:
        """Give the hotkey the lowest free uid; on a full subnet, the uid of the weakest non-immune one."""
        hotkey, coldkey = wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address
        with self._transaction(write=True) as db:
            subnet = self._subnet(db, netuid)
            uid = self._uid(db, netuid, hotkey)
            if uid is not None:
                return uid, False
            now = self.block()
            taken = {u for (u,) in db.execute("SELECT uid FROM neurons WHERE netuid = ?", (netuid,))}
            uid = next((u for u in range(subnet.max_uids) if u not in taken), None)
            if uid is None:
                uid = self._prunable(db, subnet, now)
            # The newcomer starts clean: a pruned uid's stake, axon and weights (both ways) go with it.
            query = "DELETE FROM weights WHERE netuid = ? AND (src = ? OR dst = ?)"
            db.execute(query, (netuid, uid, uid))
            query = "INSERT OR REPLACE INTO neurons VALUES (?, ?, ?, ?, 0.0, NULL, NULL, ?, NULL)"
            db.execute(query, (netuid, uid, hotkey, coldkey, now))
            return uid, True

    def _prunable(self, db: sqlite3.Connection, subnet: Subnet, now: int) -> int:
        """The uid to give away on a full subnet: lowest incentive, then oldest registration.

        Never an immune uid, and never a validator permit holder: on the real chain a validator's
        dividends keep its emission up, but here incentive alone would prune every validator first.
        """
        permits, incentive = self._scores(db, subnet)
        query = "SELECT uid, registered_at FROM neurons WHERE netuid = ?"
        rows = db.execute(query, (subnet.netuid,)).fetchall()
        mortal = [
            (incentive.get(uid, 0.0), registered_at, uid)
            for uid, registered_at in rows
            if now - registered_at >= subnet.immunity_period and uid not in permits
        ]
        if mortal:
            return min(mortal)[2]
        immune = [registered_at for uid, registered_at in rows if uid not in permits]
        if not immune:
            raise ChainError(f"subnet {subnet.netuid} is full and every uid holds a validator permit")
        wait = min(immune) + subnet.immunity_period - now
        raise ChainError(
            f"subnet {subnet.netuid} is full ({subnet.max_uids} uids) and every uid is immune or a "
            f"validator; retry in {wait} blocks"
        )

    def serve_axon(self, netuid: int, wallet, ip: str, port: int) -> None:
        if not isinstance(ip, str) or not ip.strip():
            raise ChainError(f"axon ip must be a non-empty string, not {ip!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ChainError(f"axon port must be in 1..65535, not {port!r}")
        hotkey = wallet.hotkey.ss58_address
        with self._transaction(write=True) as db:
            self._subnet(db, netuid)
            query = "UPDATE neurons SET ip = ?, port = ? WHERE netuid = ? AND hotkey = ?"
            cursor = db.execute(query, (ip.strip(), port, netuid, hotkey))
            if cursor.rowcount == 0:
                raise NotRegistered(f"hotkey {hotkey} is not registered on subnet {netuid}")

    def set_weights(self, netuid: int, wallet, uids: Sequence[int], weights: Sequence[float]) -> None:
        row = normalise_weights(uids, weights)
        hotkey = wallet.hotkey.ss58_address
        with self._transaction(write=True) as db:
            subnet = self._subnet(db, netuid)
            query = "SELECT uid, stake, weights_set_at FROM neurons WHERE netuid = ? AND hotkey = ?"
            found = db.execute(query, (netuid, hotkey)).fetchone()
            if found is None:
                raise NotRegistered(f"hotkey {hotkey} is not registered on subnet {netuid}")
            uid, stake, last = found
            permits, _ = self._scores(db, subnet)
            if uid not in permits:
                raise ChainError(
                    f"uid {uid} ({hotkey}) has no validator permit on subnet {netuid}: a permit needs "
                    f"stake >= {subnet.min_validator_stake} and a place in the top {subnet.max_validators} "
                    f"by stake (it has {stake})"
                )
            now = self.block()
            if last is not None and now - last < subnet.weights_rate_limit:
                wait = subnet.weights_rate_limit - (now - last)
                raise ChainError(
                    f"uid {uid} set weights on subnet {netuid} {now - last} blocks ago; the rate limit is "
                    f"{subnet.weights_rate_limit} blocks, so wait {wait} more"
                )
            taken = {u for (u,) in db.execute("SELECT uid FROM neurons WHERE netuid = ?", (netuid,))}
            missing = sorted(set(row) - taken)
            if missing:
                raise ChainError(f"uids {missing} are not registered on subnet {netuid}")
            db.execute("DELETE FROM weights WHERE netuid = ? AND src = ?", (netuid, uid))
            entries = [(netuid, uid, dst, w) for dst, w in row.items() if w > 0]
            db.executemany("INSERT INTO weights VALUES (?, ?, ?, ?)", entries)
            query = "UPDATE neurons SET weights_set_at = ? WHERE netuid = ? AND uid = ?"
            db.execute(query, (now, netuid, uid))

    def metagraph(self, netuid: int) -> Metagraph:
        with self._transaction(write=False) as db:
            subnet = self._subnet(db, netuid)
            permits, incentive = self._scores(db, subnet)
            rows = db.execute(
                "SELECT uid, hotkey, coldkey, stake, ip, port, registered_at, weights_set_at "
                "FROM neurons WHERE netuid = ? ORDER BY uid",
                (netuid,),
            ).fetchall()
        neurons = tuple(
            NeuronInfo(
                uid=uid,
                hotkey=hotkey,
                coldkey=coldkey,
                stake=stake,
                validator_permit=uid in permits,
                axon=AxonAddress(ip, port) if ip is not None else None,
                last_update=registered_at if weights_set_at is None else weights_set_at,
                incentive=incentive.get(uid, 0.0),
                registered_at=registered_at,
            )
            for uid, hotkey, coldkey, stake, ip, port, registered_at, weights_set_at in rows
        )
        return Metagraph(netuid=netuid, block=self.block(), neurons=neurons)

