"""gumbel-v1 inside vLLM: the per-request arguments and the pure function its logits processor runs.

A seeded request goes to vLLM as greedy (temperature 0) with its real parameters in
`SamplingParams.extra_args[EXTRA_KEY]`; the processor (neuron/engine/vllm.py) computes the spec's choice
over the raw logits of those rows and leaves only that id finite, so vLLM's greedy argmax is exactly the
spec's token. vLLM computes `raw_logprobs` before any logits processor, so reported log-probabilities stay
those of the unmodified distribution. Free of vLLM, so it is tested in every venv.

`choose` is the spec's choice for the whole batch at once, with the cost of a decode step in mind. Ids are
ranked by one int64 key per id that orders (value descending, id ascending) with no ties, so torch's topk and
sort give the spec's order itself; top-k, top-p and the noise are then computed on candidates alone:
- top-k (with a top-p or not): the first k ids by key; a top-p's mass is the spec's softmax over the whole
  row with the other ids at -inf, its sum taken over the same values at the same places, so the same bits;
- top-p without a top-k: the row's log-sum-exp over every id (the spec's), its probabilities counted into a
  histogram of bins a quarter of an octave wide (BIN_SHIFT); the likeliest bins that hold the top-p mass
  are a prefix of the spec's order only a little longer than the nucleus, so only those ids are sorted, and
  the spec's cumulative sum over them decides the nucleus; a row whose candidates hold less exact mass than
  top_p + MASS_MARGIN (none of 1,200 random rows; tests force it) is sorted whole;
- the whole vocabulary: the noise over every id, but only for those rows.
On a GPU top-p rows are sorted whole (a sort is cheap there), so nothing is read back to the host; on the CPU
reading the candidates' counts costs nothing.
"""

from __future__ import annotations

import math
from functools import partial

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


NUCLEUS_SLACK = 1e-9  # mass beyond top_p that a top-p row's candidate bins must hold by the histogram's sums
# (float64 too, but added in another order than the spec's): enough that the exact check below passes.
MASS_MARGIN = 1e-12  # candidates hold the whole nucleus once their exact cumulative mass reaches top_p + this:
# the mass before any later id is then at least that minus one rounding of a sum below 2 (2**-53), so >= top_p.
BIN_SHIFT = 50  # a probability's bin: its float64 bits >> 50, the exponent and two mantissa bits, so bins a
# quarter of an octave wide (0.17 of a logit / T) and 2**13 per row. Measured on 8 rows of randn * 3 logits
# (flatter than SmolLM2's) at top-p 0.9: nuclei of 1,700-2,800 ids, candidates 2-10% more.
_PAD_KEY = -(1 << 63) | sampler.MASK32  # below every order key, and read back as id 0
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


def _keys_at(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """order_keys of some float32 values at their vocabulary ids (two [N] tensors)."""
    bits = values.view(torch.int32)
    sign = bits >> 31
    ordered = ((bits & 0x7FFFFFFF) ^ sign) - sign
    return (ordered.long() << 32) | (sampler.MASK32 - ids)


def _lse_(scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.logsumexp(scaled, dim=1) by the same operations, so the same bits: the spec's softmax denominator.
    Overwrites scaled [B, V] (float64) with exp(scaled - its row's max); returns the log-sum-exp and that sum."""
    top = scaled.amax(dim=1, keepdim=True)
    top.masked_fill_(top.isinf(), 0.0)
    total = scaled.sub_(top).exp_().sum(dim=1)
    return total.log().add_(top.squeeze(1)), total


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


def _from_candidates(x: torch.Tensor, cand: torch.Tensor, allowed: torch.Tensor | None, temp: torch.Tensor,
                     top_p: torch.Tensor, lse: torch.Tensor | None,
                     step_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The spec's token per row from its candidates cand [B, K], the first K ids of the row in the spec's order,
    of which `allowed` [B, K] are in the running (None: all). With lse [B], the log-sum-exp of the allowed
    scaled logits over the whole row, the top-p rule runs on them as the spec's does (same values, the
    same sequential cumulative sum), and the candidates' mass comes back too: the answer is the spec's when
    no id after them would be kept. temp, top_p float64 [B] (top_p 1: off)."""
    scaled = x.gather(1, cand).double().div_(temp.unsqueeze(1))
    if allowed is not None:
        scaled.masked_fill_(~allowed, -math.inf)
    mass = None
    if lse is not None:
        probs = (scaled - lse.unsqueeze(1)).exp()
        cum = probs.cumsum(1)
        keep = ((cum - probs) < top_p.unsqueeze(1)) & torch.isfinite(scaled)
        scaled.masked_fill_(~keep & (top_p < 1.0).unsqueeze(1), -math.inf)
        mass = cum[:, -1]
    return _pick(cand, scaled.add_(sampler.gumbel(step_keys, x.shape[1], cand))), mass


def _top_k(x, temp, top_k, top_p, step_keys, *, K: int, any_top_p: bool) -> torch.Tensor:
    """Rows with a top-k (<= K), some perhaps with a top-p: every allowed id is among the first K."""
    cand = _ids_of(order_keys(x).topk(K, dim=1).values)
    allowed = torch.arange(K, device=x.device).unsqueeze(0) < top_k.unsqueeze(1)
    lse = None
    if any_top_p:
        # The spec's softmax runs over the whole row, the ids past the top-k at -inf: torch.logsumexp's steps, the
        # row's exp() zero but at the candidates, so that the sum adds the same values at the same places.
        scaled = x.gather(1, cand).double().div_(temp.unsqueeze(1)).masked_fill_(~allowed, -math.inf)
        top = scaled.amax(dim=1, keepdim=True)
        top.masked_fill_(top.isinf(), 0.0)
        row = _WORK.get("f64", x, torch.float64).zero_().scatter_(1, cand, scaled.sub_(top).exp_())
        lse = row.sum(dim=1).log_().add_(top.squeeze(1))
    return _from_candidates(x, cand, allowed, temp, top_p, lse, step_keys)[0]


def _top_p(x, temp, top_k, top_p, step_keys, *, sort: bool, slack: float) -> torch.Tensor:
    """Rows with a top-p and no top-k. sort: each whole row in the spec's order (no host read). Else the ids in
    the likeliest probability bins that hold top_p + slack of the row's mass by a histogram, and the whole row
    sorted only for rows where those turn out not to hold the nucleus (reads counts on the host)."""
    V = x.shape[1]
    e = _WORK.get("f64", x, torch.float64).copy_(x).div_(temp.unsqueeze(1))
    lse, total = _lse_(e)
    if sort:
        cand = _ids_of(order_keys(x).sort(dim=1, descending=True).values)
        return _from_candidates(x, cand, None, temp, top_p, lse, step_keys)[0]
    cand, counts = _likeliest(x, e, total * (top_p + slack))
    real = torch.arange(cand.shape[1]).unsqueeze(0) < counts.unsqueeze(1)
    tokens, mass = _from_candidates(x, cand, real, temp, top_p, lse, step_keys)
    short = (~(mass >= top_p + MASS_MARGIN) & (counts < V)).nonzero().squeeze(1)  # NaN mass: short too
    if short.numel():
        xs = x.index_select(0, short)
        cand = _ids_of(order_keys(xs).sort(dim=1, descending=True).values)
        rest = (t.index_select(0, short) for t in (temp, top_p, lse, step_keys))
        chosen, _ = _from_candidates(xs, cand, None, *rest)
        tokens.index_copy_(0, short, chosen)
    return tokens


def _likeliest(x: torch.Tensor, e: torch.Tensor, want: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ids in its likeliest probability bins (BIN_SHIFT) that together hold `want` [B] of e [B, V]
    (exp(scaled - max), float64 >= 0), as candidates [B, M] in the spec's order, id 0 past a row's count, and
    the counts [B]. A set of bins is a prefix of the spec's order: a bin holds every id of each value in it."""
    B, V = e.shape
    nb = 1 << (63 - BIN_SHIFT)
    bins = torch.bitwise_right_shift(e.view(torch.int64), BIN_SHIFT, out=_WORK.get("keys", e, torch.int64))
    bins.bitwise_and_(nb - 1)  # a NaN logit's bits may be negative
    mass_from_top = torch.zeros(B, nb, dtype=torch.float64).scatter_add_(1, bins, e).flip(1).cumsum(1)
    lowest = (nb - 1) - (mass_from_top < want.unsqueeze(1)).sum(1)  # -1: no set of bins holds `want`, take all
    flat = (bins >= lowest.unsqueeze(1)).view(-1).nonzero().squeeze(1)  # row-major
    row = flat.div(V, rounding_mode="floor")
    ids = flat - row * V
    counts = torch.bincount(row, minlength=B)
    keys = torch.full((B, max(1, int(counts.max()))), _PAD_KEY, dtype=torch.int64)
    keys[row, torch.arange(flat.numel()) - (counts.cumsum(0) - counts).index_select(0, row)] = \
        _keys_at(x.view(-1).index_select(0, flat), ids)
    return _ids_of(keys.sort(dim=1, descending=True).values), counts


def _mix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """sampler.mix32 in place (int64 values < 2**32; tmp a buffer of x's shape): the same bits."""
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp))
    x.mul_(sampler._M1).bitwise_and_(sampler.MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=tmp))
    x.mul_(sampler._M2).bitwise_and_(sampler.MASK32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=tmp))


def _whole_vocabulary(x, temp, top_k, top_p, step_keys) -> torch.Tensor:
    """Rows with neither top-k nor top-p: logits / T + g over every id, in buffers."""
    scores = _WORK.get("f64", x, torch.float64).copy_(x).div_(temp.unsqueeze(1))
    bits = torch.bitwise_xor(step_keys.unsqueeze(1), sampler._id_hashes(x.shape[1], x.device),
                             out=_WORK.get("keys", x, torch.int64))
    _mix32_(bits, _WORK.get("tmp", x, torch.int64))
    u = _WORK.get("u", x, torch.float64).copy_(bits)
    u.add_(0.5).mul_(1.0 / 4294967296.0)
    scores.sub_(u.log_().neg_().log_())  # + g = - log(-log u)
    return scores.argmax(dim=1)  # the first maximum: ties go to the lowest id


def choose(logits: torch.Tensor, rows: list[tuple[float, int, float, int, int]], sort_nucleus: bool | None = None,
           slack: float = NUCLEUS_SLACK) -> torch.Tensor:
    """The spec's token (int64 [B], on the logits' device) of each row of logits [B, V] under its
    (temperature, top_k, top_p, seed, step): what sampler.choose gives, computed on candidates.
    sort_nucleus: top-p rows sorted whole, with no host read (default: on devices other than the CPU);
    slack: NUCLEUS_SLACK's value (tests vary it to reach the other paths)."""
    x = logits.float().contiguous()
    B, V = x.shape
    dev = x.device
    temps = [t for t, *_ in rows]
    ks = [min(k, V) if k > 0 and t > 0 else 0 for t, k, *_ in rows]
    ps = [p if t > 0 else 1.0 for t, _, p, *_ in rows]
    greedy = any(t <= 0 for t in temps)
    # greedy rows: the first maximum, the lowest id among ties
    tokens = x.argmax(dim=1) if greedy else torch.empty(B, dtype=torch.int64, device=dev)
    with_k = [i for i in range(B) if ks[i]]
    nucleus = [i for i in range(B) if temps[i] > 0 and not ks[i] and ps[i] < 1.0]
    whole = [i for i in range(B) if temps[i] > 0 and not ks[i] and ps[i] >= 1.0]
    if not with_k and not nucleus and not whole:
        return tokens
    seeds, steps = _to(dev, [r[3] for r in rows], torch.int64), _to(dev, [r[4] for r in rows], torch.int64)
    per_row = (x, _to(dev, [t if t > 0 else 1.0 for t in temps], torch.float64), _to(dev, ks, torch.int64),
               _to(dev, ps, torch.float64), sampler.step_keys(seeds, steps))
    sort = dev.type != "cpu" if sort_nucleus is None else sort_nucleus
    for group, rule in ((with_k, partial(_top_k, K=max(ks), any_top_p=any(ps[i] < 1.0 for i in with_k))),
                        (nucleus, partial(_top_p, sort=sort, slack=slack)), (whole, _whole_vocabulary)):
        if not group:
            continue
        if len(group) == B:
            tokens = rule(*per_row)
        else:
            at = _to(dev, group, torch.int64)
            tokens[at] = rule(*(t.index_select(0, at) for t in per_row))
    return tokens


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
