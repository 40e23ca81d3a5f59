"""The model each miner declares (its Info answer), so a validator judges a miner only against the same model.

A quantized checkpoint is a declared model of its own: verification cannot tell gentle quantization from
honest noise by tokens alone, so a 4-bit miner judged against a float16 reference would be rejected round
after round for serving what it said it served. A miner whose declaration differs from the validator's
model gets a verdict that says so (Outcome.OTHER_MODEL), and no evidence from answers that were never
comparable. A declaration is a claim, not a proof: answers are still judged, so a miner that declares the
validator's model and serves another is caught as before.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from loguru import logger

from neuron.dendrite import Dendrite, Target
from neuron.model import LoadedModel
from neuron.pb.neuron.v1 import axon_pb2 as pb

# Seconds a miner's declaration is trusted before it is asked again (a miner may restart with another model).
REFRESH_S = 900.0


@dataclass(frozen=True)
class Declared:
    """What identifies a served model: the checkpoint files, the tokenizer, the declared quantization."""

    model_id: str
    weights_fingerprint: str
    tokenizer_fingerprint: str
    quantization: str

    @classmethod
    def of_model(cls, lm: LoadedModel) -> Declared:
        return cls(lm.name, lm.weights_fingerprint, lm.tokenizer_fingerprint, lm.quantization)

    @classmethod
    def from_info(cls, info: pb.InfoResponse) -> Declared:
        return cls(info.model_id, info.weights_fingerprint, info.tokenizer_fingerprint, info.quantization)

    def describe(self) -> str:
        return f"{self.model_id or '(unnamed)'} ({self.quantization or 'not quantized'}, weights {self.weights_fingerprint[:12]})"


def difference(mine: Declared, theirs: Declared) -> str:
    """Why `theirs` is not the model `mine` judges against ("" when it is the same model)."""
    parts = []
    if theirs.quantization != mine.quantization:
        parts.append(f"quantization {theirs.quantization or 'none'} (this validator: {mine.quantization or 'none'})")
    if theirs.weights_fingerprint != mine.weights_fingerprint:
        parts.append(f"weights {theirs.weights_fingerprint[:12] or '(none)'} "
                     f"(this validator: {mine.weights_fingerprint[:12]})")
    if theirs.tokenizer_fingerprint != mine.tokenizer_fingerprint:
        parts.append(f"tokenizer {theirs.tokenizer_fingerprint[:12] or '(none)'} "
                     f"(this validator: {mine.tokenizer_fingerprint[:12]})")
    if not parts:
        return ""
    return (f"declared model differs: {theirs.describe()}, this validator judges {mine.describe()}: "
            + ", ".join(parts) + "; a miner is judged only against the model it declares")


class Declarations:
    """The miners' declarations, asked with Info (public, unsigned, no model work); a miner that does not answer
    Info is judged by its answers alone. A miner is asked when first met, then again after a random time around
    refresh_s (`watch`), never in step with the rounds: an Info is no sign that a challenge follows."""

    def __init__(self, mine: Declared, refresh_s: float = REFRESH_S, clock=time.monotonic,
                 rng: random.Random | None = None):
        self.mine, self.refresh_s, self.clock = mine, refresh_s, clock
        self.rng = rng or random.Random()
        self._seen: dict[tuple[str, str], tuple[Declared | None, float]] = {}  # -> (declaration, when to ask again)

    def unknown(self, target: Target) -> bool:
        """Never asked: the round that first meets it asks it with its challenge (a tell of that round only)."""
        return (target.address, target.hotkey) not in self._seen

    async def refresh(self, dendrite: Dendrite, targets: list[Target], timeout_s: float) -> None:
        """Ask the targets never asked or due again."""
        now = self.clock()
        due = [t for t in targets if self._seen.get((t.address, t.hotkey), (None, -float("inf")))[1] <= now]
        # No hotkey in the target: Info answers are not signed (as the start-up probe asks them).
        results = await asyncio.gather(*(dendrite.call(Target(t.address), "Info", pb.InfoRequest(), timeout_s)
                                         for t in due))
        for t, r in zip(due, results):
            key = (t.address, t.hotkey)
            if r.ok:
                self._seen[key] = (Declared.from_info(r.response), now + self.refresh_s * self.rng.uniform(0.5, 1.5))
            else:  # asked again within a minute, keeping what it declared before (the signatures check the hotkey)
                self._seen[key] = (self._seen.get(key, (None, 0.0))[0], now + self.rng.uniform(30.0, 90.0))

    async def watch(self, dendrite: Dendrite, targets, stop: asyncio.Event, timeout_s: float = 5.0) -> None:
        """Until `stop`: every 5 to 15 s (at random), ask whichever of `await targets()` is due."""
        while not stop.is_set():
            try:
                await self.refresh(dendrite, await targets(), timeout_s)
            except Exception as exc:  # a chain read that failed: the next turn tries again
                logger.warning(f"asking the miners' declarations failed, trying again: {exc}")
            try:
                await asyncio.wait_for(stop.wait(), self.rng.uniform(5.0, 15.0))
            except asyncio.TimeoutError:
                pass

    def problem(self, target: Target) -> str:
        """Why this miner is not judged here ("" when it declares this validator's model, or declared nothing)."""
        declared, _ = self._seen.get((target.address, target.hotkey), (None, 0.0))
        return difference(self.mine, declared) if declared is not None else ""
