"""Generation cheats' sampler policies, with the sampler's signature: choose(logits [B, V], RowParams) -> [B].

Each answers a seeded request with tokens the seeded sampler would not choose, and reports their exact
logprobs (the old checks could not tell: docs/calibration.md).
"""

from __future__ import annotations

import math

import torch

from neuron.engine import sampler
from neuron.engine.sampler import RowParams


def _rows(rp: RowParams) -> list[tuple[float, int, float, int, int]]:
    return list(zip(rp.temperature.tolist(), rp.top_k.tolist(), rp.top_p.tolist(), rp.seed.tolist(), rp.step.tolist()))


class Greedy:
    """Answers a sampling request with the greedy tokens (one argmax instead of a sampler)."""

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        return logits.double().argmax(dim=1)


class Temperature:
    """Samples, with the right seed, at another temperature than asked."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        rows = [(self.temperature if t > 0 else 0.0, k, p, s, st) for t, k, p, s, st in _rows(rp)]
        return sampler.choose(logits, RowParams.build(rows, logits.device))


class Ignore:
    """Samples with the right seed and the other parameters, but ignores one: top_p as 1, or top_k as 0 (a
    sampler, or a backend, that does not implement it)."""

    def __init__(self, parameter: str):
        if parameter not in ("top_p", "top_k"):
            raise ValueError(f"cannot ignore {parameter!r}: top_p or top_k")
        self.parameter = parameter

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        off = 1.0 if self.parameter == "top_p" else 0
        rows = [(t, off if self.parameter == "top_k" else k, off if self.parameter == "top_p" else p, s, st)
                for t, k, p, s, st in _rows(rp)]
        return sampler.choose(logits, RowParams.build(rows, logits.device))


class LeastLikely:
    """Steers: at every sampled step, the least likely token that the top-k/top-p filter allows."""

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        _, allowed = sampler.perturbed_scores(logits, rp)
        low = logits.double().masked_fill(~allowed, float("inf")).argmin(dim=1)
        return torch.where(rp.temperature > 0, low, sampler.choose(logits, rp))


class Nudge:
    """Steers within honest noise: at every step, of the allowed tokens whose margin to the sampler's choice
    is at most `delta` (logit units, as the validator measures it), the least likely. Calibration-only (a
    "nudgeDELTA" kind): the cheapest cheat against the margin checks, since it never fails a round."""

    def __init__(self, delta: float):
        self.delta = delta

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        scores, allowed = sampler.perturbed_scores(logits, rp)
        scores = scores.masked_fill(~allowed, -math.inf)
        scale = torch.where(rp.temperature > 0, rp.temperature.double(), 1.0).unsqueeze(1)
        near = (scores.max(dim=1, keepdim=True).values - scores) * scale <= self.delta
        return logits.double().masked_fill(~near, math.inf).argmin(dim=1)


class Bias:
    """Steers the text toward chosen tokens: their logits raised by `bias` before the seeded sampler."""

    def __init__(self, token_ids: list[int], bias: float):
        self.token_ids, self.bias = list(token_ids), bias

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        steered = logits.clone()
        steered[:, self.token_ids] += self.bias
        return sampler.choose(steered, rp)


class EarlyEos:
    """Stops with EOS at the first step where P(eos) >= level (what the old rule let through);
    with `after` tokens (e.g. sentence ends), only right after one of them."""

    def __init__(self, eos: int, level: float = 1e-3, steer: Bias | None = None):
        self.eos, self.level, self.steer = eos, level, steer
        self._last: torch.Tensor | None = None

    def choose(self, logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
        p_eos = torch.softmax(logits.double(), dim=1)[:, self.eos]
        base = (self.steer or sampler).choose(logits, rp)
        stop = p_eos >= self.level
        if self.steer is not None:  # stop only after a steered-to token (a sentence end)
            last = self._last if self._last is not None and rp.step.max() > 0 else torch.zeros_like(stop)
            stop = stop & last
            self._last = torch.isin(base, torch.tensor(self.steer.token_ids, device=base.device))
        return torch.where(stop, torch.full_like(base, self.eos), base)


def sentence_end_ids(tokenizer) -> list[int]:
    """Token ids that end a sentence: '.', '!', '?' alone or after a space."""
    ids = set()
    for text in (".", "!", "?", " .", ".\n"):
        enc = tokenizer(text, add_special_tokens=False).input_ids
        if len(enc) == 1:
            ids.add(enc[0])
    return sorted(ids)


def steer_target_ids(tokenizer, word: str = " the") -> list[int]:
    """The first token of the word an attacker steers the text toward."""
    return tokenizer(word, add_special_tokens=False).input_ids[:1]
