"""The gumbel-v1 vLLM processor's function alone, per setting: the candidate path (vllm_sampler.force_choice)
against what the processor ran before it, sampler.choose on the seeded rows, timed in alternation.

    python scripts/bench_gumbel_processor.py [--rows 8] [--vocab 49152] [--reps 30] [--smollm2]

--smollm2 takes real decode-step logits of SmolLM2 (its HF model over dataset prompts) besides the
random ones (randn * 3: flatter than a real model, a hard case for top-p)."""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from neuron.engine import sampler as S
from neuron.engine import vllm_sampler as VS

SETTINGS = {"top_k 50": (0.8, 50, 1.0), "top_p 0.9": (1.0, 0, 0.9), "whole vocabulary": (1.0, 0, 1.0),
            "greedy": (0.0, 0, 1.0)}


def rows_for(name: str, n: int, step: int) -> dict:
    if name == "mixed":
        cycle = list(SETTINGS.values()) + [(0.7, 40, 0.95)]
        return {i: (*cycle[i % len(cycle)], 1000 + i, step) for i in range(n)}
    return {i: (*SETTINGS[name], 1000 + i, step) for i in range(n)}


def old_force_choice(logits: torch.Tensor, rows: dict) -> torch.Tensor:
    """The processor before the candidate path: sampler.choose over the seeded rows."""
    index = sorted(rows)
    idx = torch.tensor(index, dtype=torch.long, device=logits.device)
    chosen = S.choose(logits.index_select(0, idx), S.RowParams.build([rows[i] for i in index], logits.device))
    kept = logits[idx, chosen]
    logits[idx] = -math.inf
    logits[idx, chosen] = kept
    return logits


def time_pair(logits: torch.Tensor, name: str, reps: int) -> tuple[float, float]:
    old, new = [], []
    for step in range(reps + 1):
        rows = rows_for(name, logits.shape[0], step)
        for fn, out in ((old_force_choice, old), (VS.force_choice, new)):
            x = logits.clone()
            start = time.perf_counter()
            fn(x, rows)
            if step:  # the first round warms up
                out.append((time.perf_counter() - start) * 1e3)
        a = old_force_choice(logits.clone(), rows).argmax(1)
        b = VS.force_choice(logits.clone(), rows).argmax(1)
        if not torch.equal(a, b):
            raise SystemExit(f"{name}: the two paths disagree at step {step}: {a.tolist()} {b.tolist()}")
    return statistics.median(old), statistics.median(new)


def smollm2_logits(rows: int) -> torch.Tensor:
    """Next-token logits of SmolLM2 at the end of `rows` dataset prompts (a real model's distributions)."""
    import random

    from neuron.harness.bench.vllm import SMOLLM2, _prompts
    from neuron.model import load_model

    lm = load_model(str(SMOLLM2), device="cpu", dtype="auto")
    prompts = _prompts(lm.tokenizer, rows, 48, seed=random.Random(3).randrange(100))
    with torch.inference_mode():
        return torch.stack([lm.model(torch.tensor([p])).logits[0, -1].float() for p in prompts])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--smollm2", action="store_true")
    a = p.parse_args()
    sources = {"randn*3": torch.randn(a.rows, a.vocab, generator=torch.Generator().manual_seed(0)) * 3}
    if a.smollm2:
        sources["smollm2"] = smollm2_logits(a.rows)
    print(f"{a.rows} rows, median ms over {a.reps} alternations (torch threads {torch.get_num_threads()})")
    for src, logits in sources.items():
        for name in [*SETTINGS, "mixed"]:
            old, new = time_pair(logits, name, a.reps)
            print(f"{src:<8} {name:<17} before {old:8.2f} ms   after {new:8.2f} ms   x{old / new:5.1f}")


if __name__ == "__main__":
    main()
