"""gumbel-v1 inside vLLM: the per-request arguments and the pure function its logits processor runs.

A seeded request goes to vLLM as greedy (temperature 0) with its real parameters in
`SamplingParams.extra_args[EXTRA_KEY]`; the processor (neuron/engine/vllm.py) computes the spec's choice
over the raw logits of those rows and leaves only that id finite, so vLLM's greedy argmax is exactly the
spec's token. vLLM computes `raw_logprobs` before any logits processor, so reported log-probabilities stay
those of the unmodified distribution. Free of vLLM, so it is tested in every venv.

`choose` is the spec's choice for the whole batch at once, with the cost of a decode step in mind. Rows are
ranked once by one int64 key per id that orders (value descending, id ascending) with no ties, so torch's
topk gives the spec's order itself; top-k, top-p and the noise are then computed on the candidates alone:
- top-k: the first k candidates;
- top-p: the nucleus is found among the likeliest ids, a few tiers of them (NUCLEUS_TIERS), with the mass
  over the whole row; a row whose candidates do not hold the top-p mass goes to the next tier, and past
  the last to the whole row sorted;
- the whole vocabulary: the noise over every id, but only for those rows.
On a GPU the nucleus is searched over the whole row (a sort is cheap there), so nothing is read back to the
host; on the CPU reading whether a tier sufficed costs nothing.
"""

from __future__ import annotations

import math

import torch

from neuron.engine import sampler
from neuron.engine.types import SamplingParams

EXTRA_KEY = "neuron_gumbel_v1"


def extra_args(sp: SamplingParams) -> dict:
    """What the processor needs of a seeded request, as vLLM carries it (plain JSON-able values)."""
    return {EXTRA_KEY: {"temperature": float(sp.temperature), "top_k": int(sp.top_k),
                        "top_p": float(sp.top_p), "seed": int(sp.seed or 0)}}


def row_args(extra: dict | None) -> tuple[float, int, float, int] | None:
    """(temperature, top_k, top_p, seed) of a request's extra_args, or None for a request without them."""
    args = (extra or {}).get(EXTRA_KEY)
    if args is None:
        return None
    return float(args["temperature"]), int(args["top_k"]), float(args["top_p"]), int(args["seed"])


NUCLEUS_TIERS = (64, 4096)  # candidate counts tried in turn for a top-p row without a top-k (CPU)
_LOW_IDS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _low_ids(vocab: int, device: torch.device) -> torch.Tensor:
    """2**32 - 1 - id for every id (int64): the low half of the order keys, larger for lower ids."""
    key = (torch.device(device), vocab)
    if key not in _LOW_IDS:
        _LOW_IDS[key] = sampler.MASK32 - torch.arange(vocab, device=device, dtype=torch.int64)
    return _LOW_IDS[key]


class _Workspace:
    """Buffers over the vocabulary kept from one step to the next on the CPU: glibc hands tensors this large
    back to the system when they are freed, and faulting fresh pages in again costs more than the arithmetic
    (measured here: twice the time). On other devices torch's caching allocator already reuses memory."""

    MAX_ROWS = 64  # beyond this many rows, plain tensors (the buffers would hold too much memory)

    def __init__(self):
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised [B, V] tensor of `dtype`, B and V those of `like`."""
        B, V = like.shape
        if like.device.type != "cpu" or B > self.MAX_ROWS:
            return torch.empty(B, V, dtype=dtype, device=like.device)
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.shape[0] < B or buf.shape[1] != V:
            buf = self.buffers[name, dtype] = torch.empty(max(B, 8), V, dtype=dtype)
        return buf[:B]


_WORK = _Workspace()


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 [B, V] keys of float32 logits: key(a) > key(b) exactly when a's value is larger, or equal with a
    lower id. The float's bits as a signed magnitude (so -0.0 and 0.0 are equal) in the high half, the
    reversed id in the low half. Dividing by a temperature T > 0 (float64) keeps this order: a float32
    value times 1/T loses no distinction float64 can hold."""
    bits = x.view(torch.int32)
    sign = torch.bitwise_right_shift(bits, 31, out=_WORK.get("sign", x, torch.int32))  # -1 if negative, else 0
    ordered = torch.bitwise_and(bits, 0x7FFFFFFF, out=_WORK.get("ordered", x, torch.int32))
    ordered.bitwise_xor_(sign).sub_(sign)  # the magnitude, negated for negative values
    keys = _WORK.get("keys", x, torch.int64).copy_(ordered)
    return keys.bitwise_left_shift_(32).bitwise_or_(_low_ids(x.shape[1], x.device))


def _logsumexp(x: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(x.double() / temp) over each row (the same operations, so the same bits), in a buffer."""
    scaled = _WORK.get("f64", x, torch.float64).copy_(x).div_(temp.unsqueeze(1))
    top = scaled.amax(dim=1, keepdim=True)
    top.masked_fill_(top.isinf(), 0.0)
    return scaled.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))


def _to(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    """Host values as a tensor on `device`, copied without making the host wait for the device."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _ids_of(keys: torch.Tensor) -> torch.Tensor:
    return sampler.MASK32 - (keys & sampler.MASK32)


def _pick(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The id of the best score per row, the lowest id among exact ties (ids in any order)."""
    best = scores.max(dim=1, keepdim=True).values
    return torch.where(scores == best, ids, torch.iinfo(torch.int64).max).min(dim=1).values


def _from_candidates(x: torch.Tensor, cand: torch.Tensor, temp: torch.Tensor, top_k: torch.Tensor,
                     top_p: torch.Tensor, any_top_p: bool, nucleus_rows: torch.Tensor,
                     full_lse: torch.Tensor | None, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's token per row from its candidates cand [B, K] (the first K ids in the spec's order), and
    whether the candidates held the row's top-p mass (the answer is exact only then).

    temp, top_p float64 [B]; top_k int64 [B] (0: off, else <= K); any_top_p: whether some top_p < 1 (known on
    the host); nucleus_rows bool [B]: top-p rows without a top-k, whose mass is over the whole row (full_lse
    [B], the log-sum-exp of the row's scaled logits)."""
    B, K = cand.shape
    scaled = x.gather(1, cand).double() / temp.unsqueeze(1)
    pos = torch.arange(K, device=x.device)
    allowed = pos.unsqueeze(0) < torch.where(top_k > 0, top_k, K).unsqueeze(1)
    covered = torch.ones(B, dtype=torch.bool, device=x.device)
    if any_top_p:
        masked = scaled.masked_fill(~allowed, -math.inf)
        lse = torch.logsumexp(masked, dim=1)
        if full_lse is not None:
            lse = torch.where(nucleus_rows, full_lse, lse)
        probs = (masked - lse.unsqueeze(1)).exp()
        mass = probs.cumsum(1)
        keep = ((mass - probs) < top_p.unsqueeze(1)) & torch.isfinite(masked)
        allowed = torch.where((top_p < 1.0).unsqueeze(1), keep, allowed)
        covered = ~nucleus_rows | (mass[:, -1] >= top_p)
    scores = (scaled + sampler.gumbel(keys, x.shape[1], cand)).masked_fill(~allowed, -math.inf)
    return _pick(cand, scores), covered


def _mix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """sampler.mix32 in place (int64 values < 2**32; tmp a buffer of x's shape): the same bits."""
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp))
    x.mul_(sampler._M1).bitwise_and_(sampler.MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=tmp))
    x.mul_(sampler._M2).bitwise_and_(sampler.MASK32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=tmp))


def _whole_vocabulary(x: torch.Tensor, temp: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The token of rows with neither top-k nor top-p: logits / T + g over every id, in buffers."""
    scores = _WORK.get("f64", x, torch.float64).copy_(x).div_(temp.unsqueeze(1))
    bits = torch.bitwise_xor(keys.unsqueeze(1), sampler._id_hashes(x.shape[1], x.device),
                             out=_WORK.get("keys", x, torch.int64))
    _mix32_(bits, _WORK.get("tmp", x, torch.int64))
    u = _WORK.get("u", x, torch.float64).copy_(bits)
    u.add_(0.5).mul_(1.0 / 4294967296.0)
    scores.sub_(u.log_().neg_().log_())  # + g = - log(-log u)
    return scores.argmax(dim=1)  # the first maximum: ties go to the lowest id


def choose(logits: torch.Tensor, rows: list[tuple[float, int, float, int, int]],
           tiers: tuple[int, ...] | None = None) -> torch.Tensor:
    """The spec's token (int64 [B], on the logits' device) of each row of logits [B, V] under its
    (temperature, top_k, top_p, seed, step): what sampler.choose gives, computed on candidates."""
    x = logits.float().contiguous()
    B, V = x.shape
    dev = x.device
    if tiers is None:
        tiers = NUCLEUS_TIERS if dev.type == "cpu" else (V,)
    temps = [t for t, *_ in rows]
    ks = [min(k, V) if k > 0 and t > 0 else 0 for t, k, *_ in rows]
    ps = [p if t > 0 else 1.0 for t, _, p, *_ in rows]
    nucleus = [t > 0 and k == 0 and p < 1.0 for t, k, p in zip(temps, ks, ps)]
    tokens = x.argmax(dim=1)  # greedy rows: the first maximum, the lowest id among ties
    filtered = [i for i in range(B) if ks[i] > 0 or nucleus[i]]
    whole = [i for i in range(B) if temps[i] > 0 and not ks[i] and not nucleus[i]]
    if not filtered and not whole:
        return tokens
    temp = _to(dev, [t if t > 0 else 1.0 for t in temps], torch.float64)
    seeds, steps = _to(dev, [r[3] for r in rows], torch.int64), _to(dev, [r[4] for r in rows], torch.int64)
    step_keys = sampler.step_keys(seeds, steps)
    if filtered:
        at = _to(dev, filtered, torch.int64) if len(filtered) < B else None
        pick = (lambda t: t) if at is None else (lambda t: t.index_select(0, at))
        xs = pick(x)
        top_k = _to(dev, [ks[i] for i in filtered], torch.int64)
        top_p = _to(dev, [ps[i] for i in filtered], torch.float64)
        nucleus_rows = _to(dev, [nucleus[i] for i in filtered], torch.bool)
        any_nucleus = any(nucleus[i] for i in filtered)
        K = min(V, max([ks[i] for i in filtered] + [tiers[0]] * any_nucleus))
        keys = order_keys(xs)
        cand = _ids_of(keys.topk(K, dim=1).values)
        full_lse = None
        if any_nucleus:  # the row's mass: over the whole row, as the spec's softmax is
            full_lse = _logsumexp(xs, pick(temp))
        chosen, covered = _from_candidates(xs, cand, pick(temp), top_k, top_p, any(ps[i] < 1.0 for i in filtered),
                                           nucleus_rows, full_lse, pick(step_keys))
        if K < V and any_nucleus:
            chosen = _widen(xs, keys, chosen, covered, pick(temp), top_p, full_lse, pick(step_keys), tiers[1:])
        if at is None:
            tokens = chosen
        else:
            tokens[at] = chosen
    if whole:
        at = _to(dev, whole, torch.int64) if len(whole) < B else None
        pick = (lambda t: t) if at is None else (lambda t: t.index_select(0, at))
        chosen = _whole_vocabulary(pick(x), pick(temp), pick(step_keys))
        if at is None:
            tokens = chosen
        else:
            tokens[at] = chosen
    return tokens


def _widen(x, keys, tokens, covered, temp, top_p, full_lse, step_keys, tiers) -> torch.Tensor:
    """Top-p rows whose candidates fell short of their mass: the next tier of candidates, and past the last
    one the whole row in the spec's order. Reads `covered` on the host: only ever called on the CPU."""
    short = (~covered).nonzero().flatten()
    n, V = short.numel(), x.shape[1]
    if n == 0:
        return tokens
    if n < x.shape[0]:
        x, keys, temp, top_p, full_lse, step_keys = (t.index_select(0, short)
                                                     for t in (x, keys, temp, top_p, full_lse, step_keys))
    if tiers and tiers[0] < V:
        cand = _ids_of(keys.topk(tiers[0], dim=1).values)
    else:
        cand = _ids_of(keys.sort(dim=1, descending=True).values)
    chosen, ok = _from_candidates(x, cand, temp, torch.zeros(n, dtype=torch.int64), top_p, True,
                                  torch.ones(n, dtype=torch.bool), full_lse, step_keys)
    if cand.shape[1] < V:
        chosen = _widen(x, keys, chosen, ok, temp, top_p, full_lse, step_keys, tiers[1:])
    return chosen if n == tokens.shape[0] else tokens.index_copy_(0, short, chosen)


def force_choice(logits: torch.Tensor, rows: dict[int, tuple[float, int, float, int, int]]) -> torch.Tensor:
    """For each batch row index -> (temperature, top_k, top_p, seed, step): leave only the spec's token
    finite (its logit unchanged), in place; other rows are untouched. Returns logits."""
    if not rows:
        return logits
    index = sorted(rows)
    idx = _to(logits.device, index, torch.int64)
    x = logits[:len(index)] if index[-1] == len(index) - 1 else logits.index_select(0, idx)
    chosen = choose(x, [rows[i] for i in index])
    kept = logits[idx, chosen]
    logits[idx] = -math.inf
    logits[idx, chosen] = kept
    return logits
