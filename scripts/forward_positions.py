"""Where a lower precision's honest Forward noise sits: each metric's worst value by position (docs/calibration.md,
"Forward at every position"). The prompts are those of scripts/vllm_disagreements.py's Forward checks (same seed),
every position of each 64-token prompt, top-16, each position judged alone by `scoring.verify_forward` against
the float32 reference.

    python scripts/forward_positions.py --model ~/.cache/neuron/smollm2-135m --dtype float16   (about 8 min here)
"""

from __future__ import annotations

import argparse
import collections
import os
import random

import torch

WORSE_IS_LOWER = {"topk_overlap"}


def bucket(position: int) -> str:
    return str(position) if position < 6 else ("6-15" if position < 16 else "16-62")


def main() -> None:
    from neuron import scoring
    from neuron.dataset import PromptSource
    from neuron.model import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.expanduser("~/.cache/neuron/smollm2-135m"))
    p.add_argument("--dtype", default="float16")
    p.add_argument("--prompts", type=int, default=520)
    a = p.parse_args()
    ref_lm, lm = load_model(a.model, "cpu", "float32"), load_model(a.model, "cpu", a.dtype)
    rng, source = random.Random(7), PromptSource.default()
    for _ in range(240):  # the generations' prompts come first in vllm_disagreements.py
        source.sample_span(rng, 60, 200)
    spans = [tuple(ref_lm.tokenizer(source.sample_span(rng, 400, 1200)).input_ids[:64]) for _ in range(a.prompts)]
    prompts = list(dict.fromkeys(s for s in spans if len(s) == 64))
    worst: dict[str, dict[str, float]] = collections.defaultdict(dict)
    th = scoring.Thresholds()
    with torch.no_grad():
        for start in range(0, len(prompts), 16):
            x = torch.tensor(prompts[start:start + 16])
            ref = torch.log_softmax(ref_lm.model(x).logits.float(), -1)
            got = torch.log_softmax(lm.model(x).logits.float(), -1)
            for row in range(x.shape[0]):
                top = got[row, :63].topk(16, -1)
                rest = (1 - top.values.double().exp().sum(-1)).clamp(min=0).float()
                for pos in range(63):
                    v = scoring.verify_forward(ref[row, pos:pos + 1], top.indices[pos:pos + 1],
                                               top.values[pos:pos + 1], rest[pos:pos + 1], th)
                    for name, value in v.metrics.items():
                        if name == "median_logprob_error":  # one position: the same as its logprob error
                            continue
                        old = worst[bucket(pos)].get(name)
                        pick = min if name in WORSE_IS_LOWER else max
                        worst[bucket(pos)][name] = value if old is None else pick(old, value)
    print(f"{a.dtype} against float32, {len(prompts)} prompts of 64 tokens, every position: worst by position")
    for key in sorted(worst, key=lambda k: (len(k), k)):
        print(key, {name: round(value, 4) for name, value in sorted(worst[key].items())})


if __name__ == "__main__":
    main()
