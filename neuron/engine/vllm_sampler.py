"""gumbel-v1 inside vLLM: the per-request arguments and the pure function its logits processor runs.

A seeded request goes to vLLM as greedy (temperature 0) with its real parameters in
`SamplingParams.extra_args[EXTRA_KEY]`; the processor (neuron/engine/vllm.py) computes the spec's choice
over the raw logits of those rows and leaves only that id finite, so vLLM's greedy argmax is exactly the
spec's token. vLLM computes `raw_logprobs` before any logits processor, so reported log-probabilities stay
those of the unmodified distribution. Free of vLLM, so it is tested in every venv.
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


def force_choice(logits: torch.Tensor, rows: dict[int, tuple[float, int, float, int, int]]) -> torch.Tensor:
    """For each batch row index -> (temperature, top_k, top_p, seed, step): leave only the spec's token
    finite (its logit unchanged), in place; other rows are untouched. Returns logits."""
    if not rows:
        return logits
    index = sorted(rows)
    idx = torch.tensor(index, dtype=torch.long, device=logits.device)
    rp = sampler.RowParams.build([rows[i] for i in index], device=logits.device)
    chosen = sampler.choose(logits.index_select(0, idx), rp)
    kept = logits[idx, chosen]
    logits[idx] = -math.inf
    logits[idx, chosen] = kept
    return logits
