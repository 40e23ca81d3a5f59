"""The miners a validator talks to, shared by the round loop and the gateway: the metagraph (cached), the
dendrite, which miners may serve users, and how many requests each has in flight."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass

from neuron.chain.base import Chain, Metagraph
from neuron.dendrite import Dendrite, Target


@dataclass(frozen=True)
class Miner:
    uid: int
    hotkey: str
    target: Target


class MinerPool:
    """`choose` gives a user the verified, unflagged miner (`set_standing`) with the fewest requests in flight
    per unit of score, ties drawn at random: (in flight + U(0, 1)) / score, least first. Under load each miner
    holds requests in proportion to its score (equal scores: equal shares, never two apart, so no miner
    finishes a crowd late); idle, the draw favours the better scores and still spreads users over all."""

    def __init__(self, chain: Chain, netuid: int, dendrite: Dendrite, me: str, refresh_s: float = 12.0,
                 rng: random.Random | None = None, clock=time.monotonic):
        self.chain, self.netuid, self.dendrite, self.me = chain, netuid, dendrite, me
        self.refresh_s, self.clock = refresh_s, clock
        self.rng = rng or random.Random()
        self._mg: Metagraph | None = None
        self._mg_at = -float("inf")
        self._lock = asyncio.Lock()
        self.standing: dict[int, float] = {}  # uid -> score, of the miners that may serve users
        self.in_flight: dict[int, int] = {}

    async def metagraph(self, fresh: bool = False) -> Metagraph:
        """The subnet, re-read from the chain at most every refresh_s (always when fresh)."""
        async with self._lock:
            if fresh or self._mg is None or self.clock() - self._mg_at >= self.refresh_s:
                self._mg = await asyncio.to_thread(self.chain.metagraph, self.netuid)
                self._mg_at = self.clock()
            return self._mg

    def serving(self, mg: Metagraph) -> dict[int, Miner]:
        """Every other neuron that serves an axon, by uid."""
        return {n.uid: Miner(n.uid, n.hotkey, Target(str(n.axon), n.hotkey))
                for n in mg.neurons if n.axon is not None and n.hotkey != self.me}

    def set_standing(self, scores: dict[int, float]) -> None:
        """Which miners may serve users from now on, with their scores (> 0)."""
        self.standing = {u: s for u, s in scores.items() if s > 0}

    def revoke(self, uid: int) -> None:
        """Take a miner out of user traffic at once (a failed or flagged answer)."""
        self.standing.pop(uid, None)

    def available(self) -> int:
        return len(self.standing)

    async def choose(self, exclude: set[int] = frozenset()) -> Miner | None:
        """One miner for a user request, or None when no verified miner is left."""
        serving = self.serving(await self.metagraph())
        uids = [u for u in self.standing if u in serving and u not in exclude]
        if not uids:
            return None
        return serving[min(uids, key=lambda u: (self.in_flight.get(u, 0) + self.rng.random()) / self.standing[u])]

    @contextlib.contextmanager
    def lease(self, miner: Miner):
        """Counts a request in flight on `miner` for as long as the block runs."""
        self.in_flight[miner.uid] = self.in_flight.get(miner.uid, 0) + 1
        try:
            yield miner
        finally:
            left = self.in_flight[miner.uid] - 1
            if left:
                self.in_flight[miner.uid] = left
            else:
                del self.in_flight[miner.uid]
