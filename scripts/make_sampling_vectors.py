"""Write docs/sampling_vectors.json: the seeded sampler's conformance vectors (docs/sampling.md).

Hash vectors come from the scalar reference (`bits_int`); token vectors from `choose` on small
fabricated logit rows, chosen to hit ties, top-k and top-p boundaries and greedy rows.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from neuron.engine import sampler as S

OUT = Path(__file__).resolve().parent.parent / "docs" / "sampling_vectors.json"


def hash_vectors(rng: random.Random) -> list[dict]:
    cases = [(0, 0, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0), (S.MAX_SEED, 0, 0), (S.MAX_SEED, 4294967295, 50271),
             (123456789, 7, 42), ((1 << 32) + 5, 3, 9)]
    cases += [(rng.getrandbits(63), rng.randrange(1 << 16), rng.randrange(50272)) for _ in range(24)]
    out = []
    for s, t, v in cases:
        b = S.bits_int(s, t, v)
        out.append({"seed": str(s), "step": t, "id": v, "bits": b, "u": (b + 0.5) / 4294967296.0})
    return out


def token_vectors(rng: random.Random) -> list[dict]:
    rows = [
        ([1.0, 3.0, 3.0, 0.5], 0.0, 0, 1.0),  # greedy tie: lowest id
        ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], 1.0, 0, 1.0),
        ([2.0, 1.0, 1.0, 1.0, 0.0, -1.0], 0.7, 2, 1.0),  # top-k boundary inside a three-way tie
        ([5.0, 4.0, 1.0, 0.0, -3.0, 2.0], 1.0, 0, 0.5),  # top-p keeps the first two
        ([0.0] * 8, 1.0, 3, 0.6),  # all tied: ids 0..2 by top-k, then top-p keeps 0 and 1
        ([1.0, -20.0, 0.5, 0.2, 0.1, 3.0, -1.0, 0.0], 1.5, 4, 0.9),
        ([1.0, -20.0, 0.5, 0.2, 0.1, 3.0, -1.0, 0.0], 0.05, 0, 1.0),  # near-greedy temperature
    ]
    for _ in range(12):
        n = rng.randrange(4, 33)
        rows.append(([round(rng.gauss(0, 2), 3) for _ in range(n)], rng.choice([0.3, 0.7, 1.0, 2.0]),
                     rng.choice([0, 0, 3, 10]), rng.choice([1.0, 1.0, 0.8, 0.95])))
    out = []
    for logits, t, k, p in rows:
        for seed, step in ((0, 0), (rng.getrandbits(63), rng.randrange(1000))):
            rp = S.RowParams.build([(t, k, p, seed, step)])
            row = torch.tensor([logits], dtype=torch.float32)
            token = int(S.choose(row, rp)[0])
            _, allowed = S.perturbed_scores(row, rp)
            out.append({"logits": logits, "temperature": t, "top_k": k, "top_p": p, "seed": str(seed), "step": step,
                        "allowed": allowed[0].nonzero().flatten().tolist(), "token": token})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    rng = random.Random(20261125)
    data = {"spec": "gumbel-v1", "hash": hash_vectors(rng), "tokens": token_vectors(rng)}
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {len(data['hash'])} hash and {len(data['tokens'])} token vectors to {args.out}")


if __name__ == "__main__":
    main()
