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
import time
from dataclasses import dataclass

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
    """The miners' declarations, asked with Info (public, unsigned, no model work) at most every REFRESH_S per
    address and hotkey; a miner that does not answer Info is judged by its answers alone."""

    def __init__(self, mine: Declared, refresh_s: float = REFRESH_S, clock=time.monotonic):
        self.mine, self.refresh_s, self.clock = mine, refresh_s, clock
        self._seen: dict[tuple[str, str], tuple[Declared | None, float]] = {}

    async def refresh(self, dendrite: Dendrite, targets: list[Target], timeout_s: float) -> None:
        """Ask the targets whose declaration is unknown or older than refresh_s."""
        now = self.clock()
        stale = [t for t in targets if now - self._seen.get((t.address, t.hotkey), (None, -float("inf")))[1]
                 >= self.refresh_s]
        # No hotkey in the target: Info answers are not signed (as the start-up probe asks them).
        results = await asyncio.gather(*(dendrite.call(Target(t.address), "Info", pb.InfoRequest(), timeout_s)
                                         for t in stale))
        for t, r in zip(stale, results):
            # An Info that failed is asked again next round; the hotkey check is the round's signatures' job.
            self._seen[(t.address, t.hotkey)] = (Declared.from_info(r.response), now) if r.ok else (None, -float("inf"))

    def problem(self, target: Target) -> str:
        """Why this miner is not judged here ("" when it declares this validator's model, or declared nothing)."""
        declared, _ = self._seen.get((target.address, target.hotkey), (None, 0.0))
        return difference(self.mine, declared) if declared is not None else ""
