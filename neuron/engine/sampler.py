"""The seeded Gumbel-max sampler (docs/sampling.md), batched over rows: one pass for the whole decode batch.

For seed s, generation step t and vocabulary id v, u = (bits(s, t, v) + 0.5) / 2**32 where bits is a
counter-based 32-bit integer hash; g = -log(-log(u)); the token is the argmax over the allowed ids of
logits / T + g, where top-k then top-p over logits / T decide the allowed ids, and ties go to the lowest
id. Greedy (T = 0) is the argmax of the raw logits. Everything is integer arithmetic below 2**63 and
float64, so CPU, CUDA and any other engine compute the same bits.

The validator recomputes the same noise over its reference logits (`perturbed_scores`), which is what
makes a miner's tokens evidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
MAX_SEED = (1 << 63) - 1
NUCLEUS_CANDIDATES = 1024  # ids sorted for top-p when they hold the nucleus (else the whole vocabulary)
# Multipliers below 2**31: a 32-bit value times one stays below 2**63, so no int64 ever overflows.
_M1, _M2 = 0x21F0AAAD, 0x735A2D97
# Domain constants (hex digits of pi) so that seed 0, step 0, id 0 is no fixed point of the hash.
_C_SEED_LO, _C_SEED_HI, _C_STEP, _C_ID = 0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xor-shift-multiply), on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 15)


def mix32_int(x: int) -> int:
    """mix32 on one Python int: the reference the spec's test vectors are made with."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    return x ^ (x >> 15)


def step_key_int(seed: int, step: int) -> int:
    """The 32-bit key of (seed, step): seed in [0, 2**63), step in [0, 2**32)."""
    k = mix32_int((seed & MASK32) ^ _C_SEED_LO)
    k = mix32_int(k ^ (seed >> 32) ^ _C_SEED_HI)
    return mix32_int(k ^ step ^ _C_STEP)


def bits_int(seed: int, step: int, token: int) -> int:
    """The 32 random bits of (seed, step, token id)."""
    return mix32_int(step_key_int(seed, step) ^ mix32_int(token ^ _C_ID))


def step_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """step_key_int over rows: int64 [B] seeds and steps -> int64 [B] keys, on their device."""
    k = mix32((seeds & MASK32) ^ _C_SEED_LO)
    k = mix32(k ^ (seeds >> 32) ^ _C_SEED_HI)
    return mix32(k ^ steps ^ _C_STEP)


_ID_HASH: dict[tuple[torch.device, int], torch.Tensor] = {}


def _id_hashes(vocab: int, device: torch.device) -> torch.Tensor:
    """mix32(id ^ C_ID) for every id, computed once per device and vocabulary size."""
    key = (torch.device(device), vocab)
    if key not in _ID_HASH:
        _ID_HASH[key] = mix32(torch.arange(vocab, device=device, dtype=torch.int64) ^ _C_ID)
    return _ID_HASH[key]


def gumbel(keys: torch.Tensor, vocab: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """float64 Gumbel noise [B, V] for every id, or [B, K] at `ids` [B, K] only."""
    table = _id_hashes(vocab, keys.device)
    h = table.unsqueeze(0) if ids is None else table[ids]
    u = (mix32(keys.unsqueeze(1) ^ h).double() + 0.5) * (1.0 / 4294967296.0)
    return -torch.log(-torch.log(u))


@dataclass
class RowParams:
    """Per-row sampling parameters of a batch, on the logits' device, plus what the host knows of them."""

    temperature: torch.Tensor  # float64 [B]; 0 = greedy
    top_k: torch.Tensor  # int64 [B]; 0 = off
    top_p: torch.Tensor  # float64 [B]; 1 = off
    seed: torch.Tensor  # int64 [B]
    step: torch.Tensor  # int64 [B]: index of the token being chosen (0 for the first new token)
    # Host-side summary, so the sampler plans without reading the device.
    any_sampled: bool
    max_top_k: int  # largest top-k among sampled rows (0: none has one)
    all_top_k: bool  # every sampled row has a top-k: noise is needed at max_top_k candidates only
    any_top_p: bool
    any_unfiltered: bool = False  # some sampled row has neither top-k nor top-p: noise over the whole vocabulary

    @classmethod
    def build(cls, rows: list[tuple[float, int, float, int, int]], device: torch.device | str = "cpu") -> "RowParams":
        """rows: (temperature, top_k, top_p, seed, step) per row."""
        t, k, p, s, st = zip(*rows) if rows else ((), (), (), (), ())
        sampled = [i for i, x in enumerate(t) if x > 0]
        return cls(
            temperature=torch.tensor(t, dtype=torch.float64, device=device),
            top_k=torch.tensor(k, dtype=torch.int64, device=device),
            top_p=torch.tensor(p, dtype=torch.float64, device=device),
            seed=torch.tensor(s, dtype=torch.int64, device=device),
            step=torch.tensor(st, dtype=torch.int64, device=device),
            any_sampled=bool(sampled),
            max_top_k=max((k[i] for i in sampled), default=0),
            all_top_k=bool(sampled) and all(k[i] > 0 for i in sampled),
            any_top_p=any(p[i] < 1.0 for i in sampled),
            any_unfiltered=any(k[i] <= 0 and p[i] >= 1.0 for i in sampled),
        )


def _allowed(scaled: torch.Tensor, rp: RowParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The allowed ids [B, V] (top-k, then top-p over the rest), and, when every sampled row has a top-k,
    the candidate ids [B, K] that hold all allowed ids (so noise is needed there only)."""
    B, V = scaled.shape
    k = torch.where(rp.top_k > 0, rp.top_k.clamp(max=V), V)
    allowed = torch.ones_like(scaled, dtype=torch.bool)
    K = min(rp.max_top_k, V) if rp.all_top_k else V
    if rp.max_top_k > 0:
        kmax = min(rp.max_top_k, V)
        kth = scaled.topk(kmax, dim=1).values.gather(1, (k.clamp(max=kmax) - 1).unsqueeze(1))
        greater = scaled > kth
        tied = scaled == kth
        # Ties at the k-th value: the lowest ids among them, as many as the top k still has room for.
        room = k.unsqueeze(1) - greater.sum(1, keepdim=True)
        in_top = greater | (tied & (tied.cumsum(1) <= room))
        allowed = torch.where((k < V).unsqueeze(1), in_top, allowed)
    candidates = None
    masked = scaled.masked_fill(~allowed, -math.inf)
    if K < V:
        # Candidate ids in ascending order, then stably by value: the spec's (value desc, id asc) order.
        candidates = masked.topk(K, dim=1).indices.sort(dim=1).values
    if rp.any_top_p:
        nucleus_from = candidates
        if candidates is None and V > NUCLEUS_CANDIDATES:
            # A nucleus rarely holds more than a few hundred ids: sort only the most likely ones when, in every
            # top-p row, they already hold the top-p mass (one host read decides), else the whole vocabulary.
            top = masked.topk(NUCLEUS_CANDIDATES, dim=1)
            likely = top.indices.sort(dim=1).values
            mass = (top.values - torch.logsumexp(masked, dim=1, keepdim=True)).exp().sum(1)
            # topk breaks ties at its cut arbitrarily: the set is the spec's first ids only when no finite id
            # outside it ties the last value (else the whole row, as the spec's order decides those ties).
            cut = top.values[:, -1:]
            prefix = ((masked >= cut) & torch.isfinite(masked)).sum(1) <= NUCLEUS_CANDIDATES
            if bool(((prefix & (mass >= rp.top_p)) | (rp.top_p >= 1.0)).all()):
                nucleus_from = likely
        if nucleus_from is not None:
            vals = masked.gather(1, nucleus_from)
            vals, order = vals.sort(dim=1, descending=True, stable=True)
            idx = nucleus_from.gather(1, order)
        else:
            vals, idx = masked.sort(dim=1, descending=True, stable=True)
        # Probabilities over the ids kept so far (the whole row's mass, of which these are the likely part).
        probs = (vals - torch.logsumexp(masked, dim=1, keepdim=True)).exp()
        before = probs.cumsum(1) - probs
        keep = (before < rp.top_p.unsqueeze(1)) & torch.isfinite(vals)
        nucleus = torch.zeros_like(allowed).scatter(1, idx, keep)
        allowed = torch.where((rp.top_p < 1.0).unsqueeze(1), nucleus, allowed)
        if candidates is None and nucleus_from is not None and not rp.any_unfiltered \
                and rp.max_top_k <= NUCLEUS_CANDIDATES:
            candidates = nucleus_from  # every sampled row is filtered to within these: noise is needed there only
    return allowed, candidates


def perturbed_scores(logits: torch.Tensor, rp: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """logits / T + g over the whole vocabulary (float64 [B, V]) and the allowed ids (bool [B, V]).

    Greedy rows get the raw logits and every id allowed. The sampler's choice is the argmax of the
    scores over the allowed ids; the validator measures how far a miner's token is from it.
    """
    x = logits.double()
    greedy = rp.temperature <= 0
    scaled = x / torch.where(greedy, 1.0, rp.temperature).unsqueeze(1)
    allowed, _ = _allowed(scaled, rp)
    noise = gumbel(step_keys(rp.seed, rp.step), x.shape[1])
    scores = torch.where(greedy.unsqueeze(1), x, scaled + noise)
    return scores, allowed | greedy.unsqueeze(1)


def choose(logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
    """The sampler's token per row, int64 [B], on the logits' device (no host synchronisation)."""
    x = logits.double()
    tokens = x.argmax(dim=1)
    if not rp.any_sampled:
        return tokens
    greedy = rp.temperature <= 0
    scaled = x / torch.where(greedy, 1.0, rp.temperature).unsqueeze(1)
    allowed, candidates = _allowed(scaled, rp)
    keys = step_keys(rp.seed, rp.step)
    if candidates is not None:  # noise at the K candidates only: far cheaper than the whole vocabulary
        cand_scores = scaled.gather(1, candidates) + gumbel(keys, x.shape[1], candidates)
        cand_scores = cand_scores.masked_fill(~allowed.gather(1, candidates), -math.inf)
        # argmax takes the first maximum: candidates are in ascending id order, so ties go to the lowest id.
        sampled = candidates.gather(1, cand_scores.argmax(dim=1, keepdim=True)).squeeze(1)
    else:
        scores = (scaled + gumbel(keys, x.shape[1])).masked_fill(~allowed, -math.inf)
        sampled = scores.argmax(dim=1)
    return torch.where(greedy, tokens, sampled)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF's repetition penalty on rows' seen ids (bool [B, V]): positive logits / p, negative * p.
    Only for Sampler.ANY: seeded requests refuse it, so the validator need not know the history."""
    p = penalty.to(logits.dtype).unsqueeze(1)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)
