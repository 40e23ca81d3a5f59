"""What every bench figure is: A and B measured in alternation, their ratio, and the table they print."""

from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

NETUID = 1  # the subnet of the benches' local chains


@dataclass
class Figure:
    """One line of the table: A and B measured in alternation, and what A / B should reach."""

    key: str
    label: str
    a: float  # median of A
    b: float  # median of B
    ratio: float  # median of A / B over adjacent pairs: drifts in machine load cancel
    unit: str
    target: str = ""  # ">= 1.3", "<= 1.10", or "" for none

    @classmethod
    def paired(cls, key: str, label: str, xs: list[float], ys: list[float], unit: str, target: str = "") -> "Figure":
        ratio = statistics.median(x / y for x, y in zip(xs, ys))
        return cls(key, label, statistics.median(xs), statistics.median(ys), ratio, unit, target)

    @property
    def met(self) -> bool | None:
        if not self.target:
            return None
        op, value = self.target.split()
        return self.ratio >= float(value) if op == ">=" else self.ratio <= float(value)

    def as_dict(self) -> dict:
        return {**asdict(self), "met": self.met}


async def alternate(reps: int, *measures) -> list[list[float]]:
    """Each measure (an async function returning a number) run `reps` times in turn: A, B, A, B, ..."""
    runs: list[list[float]] = [[] for _ in measures]
    for _ in range(reps):
        for out, measure in zip(runs, measures):
            out.append(await measure())
    return runs


def status_kb(pid: int, field: str) -> int:
    """A /proc/PID/status field in kB (VmRSS, VmHWM)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile of xs by nearest rank (nan for none)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")


def table(figures: list[Figure], notes: list[str]) -> str:
    rows = [("figure", "A", "B", "A/B", "target")]
    for f in figures:
        mark = "" if f.met is None else (" ok" if f.met else " MISSED")
        rows.append((f.label, f"{f.a:.4g} {f.unit}", f"{f.b:.4g} {f.unit}", f"{f.ratio:.2f}x",
                     (f.target + mark) if f.target else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + notes)
