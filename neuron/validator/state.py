"""What the validator keeps across rounds and restarts: scores, per-uid stats and evidence, saved as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from neuron import scoring
from neuron.validator.judge import Judgement, Outcome

SPEED_WINDOW = 32  # answers per uid and source whose seconds per token the speed term takes the median of


@dataclass
class UidStats:
    """What the validator saw of one uid, for operators and the mock network's report."""

    hotkey: str = ""
    queried: int = 0
    verified: int = 0
    last_reason: str = ""
    reasons: dict[str, int] = field(default_factory=dict)  # failure kind -> count
    streak: int = 0  # checks verified in a row, challenges and user answers alike (0 after any failure)
    clean: int = -1  # checks verified since its last wrong answer (-1: never a wrong answer)
    users_checked: int = 0  # user answers judged (the gateway's verified share)
    users_failed: int = 0  # of which failed
    # Seconds per generated token of its latest answers, by source ("challenge", "user"): the speed term takes
    # the worse median, so serving challenges faster than users gains nothing.
    speed: dict[str, list[float]] = field(default_factory=dict)

    def record(self, j: Judgement, user: bool = False) -> None:
        self.streak = self.streak + 1 if j.verified else 0
        if j.outcome is Outcome.WRONG:  # not a refusal or a timeout: a wrong answer (calibration: no honest one)
            self.clean = 0
        elif j.verified and self.clean >= 0:
            self.clean += 1
        if user:
            self.users_checked += 1
            self.users_failed += not j.verified
        else:
            self.queried += 1
            self.verified += j.verified
        self.last_reason = j.reason
        if not j.verified:
            kind = re.split(r"\s-?\d", j.reason)[0][:100]  # numbers vary; the kind of failure does not
            self.reasons[kind] = self.reasons.get(kind, 0) + 1

    def add_speed(self, source: str, seconds_per_token: float) -> None:
        window = self.speed.setdefault(source, [])
        window.append(float(seconds_per_token))
        del window[:-SPEED_WINDOW]

    def slowdown(self) -> float:
        """How much slower per token this uid served users than challenges (>= 1; 1 without user answers)."""
        c, u = (sorted(self.speed.get(k, [])) for k in ("challenge", "user"))
        if not c or not u or c[len(c) // 2] <= 0:
            return 1.0
        return max(1.0, u[len(u) // 2] / c[len(c) // 2])


@dataclass
class State:
    """Everything that must survive a restart; saved atomically as JSON (never pickle)."""

    scores: list[float] = field(default_factory=list)
    hotkeys: list[str] = field(default_factory=list)  # hotkey each score belongs to
    rounds: int = 0
    queue: list[int] = field(default_factory=list)  # uids still to query in this permutation
    stats: dict[str, UidStats] = field(default_factory=dict)
    evidence: dict[str, scoring.Evidence] = field(default_factory=dict)  # uid -> generation evidence (CUSUM)
    mix: dict = field(default_factory=dict)  # the users' request shapes as counts (TrafficMix.to_json); {}: none yet

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        data = {"scores": self.scores, "hotkeys": self.hotkeys, "rounds": self.rounds, "queue": self.queue,
                "stats": {k: v.__dict__ for k, v in self.stats.items()},
                "evidence": {k: dataclasses.asdict(v) for k, v in self.evidence.items()}, "mix": self.mix}
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "State":
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(scores=[float(x) for x in data["scores"]], hotkeys=[str(h) for h in data["hotkeys"]],
                       rounds=int(data["rounds"]), queue=[int(u) for u in data["queue"]],
                       stats={k: UidStats(**v) for k, v in data.get("stats", {}).items()},
                       evidence={k: scoring.Evidence(**v) for k, v in data.get("evidence", {}).items()},
                       mix=dict(data.get("mix", {})))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"validator state {path} is unreadable ({exc}); move it away to start afresh") from None


