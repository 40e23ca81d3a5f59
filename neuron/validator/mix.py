"""The shape of user traffic, kept as counts (never prompts), that challenges are drawn from.

A miner sees, of a generation: the prompt's form (text or ids) and length, max_new_tokens, the sampling
parameters, stop strings, and the alternatives asked per token; of a Forward (a user's echo with
logprobs): the length, the positions and the top-k. Challenges take every one of these from the mix that
users actually send, so no field tells a challenge from a user. Until users have sent enough, a prior mix
stands in; each user request shifts the mix by one count, and old counts decay so the mix follows traffic.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """Everything about a generation request a miner can see, except its prompt's words and seed."""

    text_prompt: bool  # the prompt travels as text (else as token ids)
    prompt_tokens: int  # bucketed (BUCKETS) so that counts stay few
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    n_stop: int  # stop strings
    logprobs_topn: int


@dataclass(frozen=True)
class ForwardShape:
    """What a miner sees of a Forward: prompt length (bucketed) and top-k; every position is asked."""

    seq_len: int
    topk: int


BUCKETS = (8, 16, 32, 64, 128, 256, 512)


def bucket(n: int) -> int:
    """The smallest bucket holding n tokens (the largest for longer prompts)."""
    return next((b for b in BUCKETS if n <= b), BUCKETS[-1])


def length_in(rng: random.Random, b: int) -> int:
    """A prompt length drawn within bucket b (lengths above the one below it, up to b): a challenge asked for
    exactly the bucket's edge would be told from users, whose lengths spread over the bucket."""
    lo = max((x for x in BUCKETS if x < b), default=0)
    return rng.randint(lo + 1, b)


# What users of an OpenAI-style completions API send when nothing is known yet: text prompts, mostly
# sampled at the clients' usual defaults, some greedy, a few with stop strings or logprobs.
PRIOR: dict[Shape, float] = {
    Shape(True, 32, 16, 0.7, 50, 1.0, 0, 0): 3.0,
    Shape(True, 32, 16, 0.7, 50, 0.9, 0, 0): 3.0,
    Shape(True, 16, 16, 1.0, 0, 0.95, 0, 0): 2.0,
    Shape(True, 64, 16, 0.0, 0, 1.0, 0, 0): 2.0,
    Shape(False, 32, 16, 0.7, 50, 0.9, 0, 0): 1.0,
    Shape(True, 32, 16, 0.8, 40, 0.95, 1, 0): 1.0,
    Shape(True, 16, 16, 0.7, 0, 1.0, 0, 2): 1.0,
}
# Every Forward asks at least this top-k, challenges and users' echo alike: the top-k checks' thresholds were
# measured at 16 (docs/calibration.md); a user asking fewer alternatives gets the first of them.
FORWARD_TOPK = 16
FORWARD_PRIOR: dict[ForwardShape, float] = {ForwardShape(16, FORWARD_TOPK): 1.0, ForwardShape(32, FORWARD_TOPK): 1.0,
                                            ForwardShape(64, FORWARD_TOPK): 1.0}


class TrafficMix:
    """Counts of request shapes, user traffic over a prior; at most `max_shapes` distinct shapes are kept."""

    def __init__(self, prior: dict[Shape, float] | None = None, forward_prior: dict[ForwardShape, float] | None = None,
                 decay: float = 0.999, max_shapes: int = 256, floor: float = 0.25):
        self.prior: dict[Shape, float] = dict(prior or PRIOR)
        self.floor = floor
        self.counts: Counter = Counter(self.prior)
        self.forward_counts: Counter = Counter(forward_prior or FORWARD_PRIOR)
        self.decay, self.max_shapes = decay, max_shapes

    @classmethod
    def default(cls, max_new_tokens: int) -> "TrafficMix":
        """The prior with every generation asking max_new_tokens (the validator's --max_new_tokens)."""
        return cls({dataclasses.replace(s, max_new_tokens=max_new_tokens): w for s, w in PRIOR.items()})

    @classmethod
    def for_config(cls, cfg) -> "TrafficMix":
        """Calibration's fixed mix (a ChallengeConfig): greedy, sampled, and sampled with top_p, token-id prompts."""
        n, half = cfg.max_new_tokens, cfg.sampled_fraction / 2
        t, k, p = cfg.sample_temperature, cfg.sample_top_k, cfg.sample_top_p
        prompt = max(1, cfg.seq_len // 2)
        shapes = {Shape(False, prompt, n, 0.0, 0, 1.0, 0, 0): 1 - cfg.sampled_fraction,
                  Shape(False, prompt, n, t, k, 1.0, 0, 0): half, Shape(False, prompt, n, t, k, p, 0, 0): half}
        return cls({s: w for s, w in shapes.items() if w > 0}, {ForwardShape(cfg.seq_len, cfg.topk): 1.0})

    def to_json(self) -> dict:
        return {"generate": [[*dataclasses.astuple(k), c] for k, c in self.counts.items()],
                "forward": [[*dataclasses.astuple(k), c] for k, c in self.forward_counts.items()]}

    @classmethod
    def from_json(cls, data: dict, fallback: "TrafficMix") -> "TrafficMix":
        """The mix saved in the validator's state (users' shapes survive a restart); `fallback` if none or bad."""
        try:
            gen = {Shape(*row[:-1]): float(row[-1]) for row in data["generate"]}
            fwd = {ForwardShape(*row[:-1]): float(row[-1]) for row in data["forward"]}
        except (KeyError, TypeError, ValueError):
            return fallback
        if not gen or not fwd:
            return fallback
        mix = cls(fallback.prior, fallback.forward_counts, floor=fallback.floor)
        mix.counts, mix.forward_counts = Counter(gen), Counter(fwd)
        return mix

    def _add(self, counts: Counter, key) -> None:
        for k in counts:
            counts[k] *= self.decay
        counts[key] += 1.0
        if len(counts) > self.max_shapes:
            del counts[min(counts, key=counts.__getitem__)]

    def record(self, shape: Shape) -> None:
        """One user generation request's shape."""
        self._add(self.counts, shape)

    def record_forward(self, shape: ForwardShape) -> None:
        """One user prompt-logprobs request's shape."""
        self._add(self.forward_counts, shape)

    def sample(self, rng: random.Random) -> Shape:
        """A shape from the users' counts, or from the prior a `floor` share of the time: every parameter
        stays checked even when users stop sending it (a shape no user sends tells a miner only that the
        parameter it sets is being checked, which is what honouring it costs anyway)."""
        counts = self.prior if rng.random() < self.floor else self.counts
        shapes = list(counts)
        return rng.choices(shapes, weights=[counts[k] for k in shapes])[0]

    def sample_forward(self, rng: random.Random) -> ForwardShape:
        shapes = list(self.forward_counts)
        return rng.choices(shapes, weights=[self.forward_counts[k] for k in shapes])[0]
