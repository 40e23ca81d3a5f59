"""The default Thresholds against measured noise: no honest miner rejected, every cheat caught.

Honest: over 1,000 checks (one verify_forward or verify_generation call over one sequence) by
miners in float32 and float16, in batches of 1 to 16 with left padding, generating in a batched
decoder that sequences join, on the tiny model and on SmolLM2. Dishonest: every kind of
neuron.calibration.DISHONEST fails on SmolLM2, whose real weights are what thresholds are set on.
"""

from __future__ import annotations

import random

import pytest
from conftest import SMOLLM2

from neuron import calibration as cal
from neuron.challenge import ChallengeConfig
from neuron.dataset import PromptSource
from neuron.model import load_model
from neuron.scoring import Thresholds, sampled_rank_limit


TH = Thresholds()
# float16 on this CPU is slow, so SmolLM2 gets short prompts; the tiny model gets the validator's.
TINY = ChallengeConfig()
SMALL = ChallengeConfig(seq_len=24, max_new_tokens=8)


@pytest.fixture(scope="module")
def honest_checks(tiny, smollm2):
    source = PromptSource.default()
    tiny16 = load_model("tiny", device="cpu", dtype="float16")
    checks = cal.honest_run(cal.Reference(tiny), {"float32": tiny, "float16": tiny16}, source, random.Random(1),
                            list(range(1, 17)), TINY, TH, model="tiny", rounds=2)
    smol16 = load_model(str(SMOLLM2), device="cpu", dtype="float16")
    checks += cal.honest_run(cal.Reference(smollm2), {"float32": smollm2, "float16": smol16}, source,
                             random.Random(2), [1, 16], SMALL, TH, model="smollm2")
    return checks


def test_no_honest_miner_is_rejected(honest_checks):
    assert len(honest_checks) >= 1000
    assert {(c.model, c.miner) for c in honest_checks} == {
        (m, d) for m in ("tiny", "smollm2") for d in ("float32", "float16")}
    assert {c.batch for c in honest_checks if c.model == "tiny"} == set(range(1, 17))
    assert {c.batch for c in honest_checks if c.model == "smollm2"} == {1, 16}
    assert {c.kind for c in honest_checks} == {"forward", "greedy", "sampled"}
    rejected = [(c.model, c.miner, c.kind, c.batch, c.reason) for c in honest_checks if not c.ok]
    assert rejected == []


def test_honest_samples_stay_within_the_top_k_limit(honest_checks):
    # The sampled-rank check must hold for any token of an honest top-k, not only those drawn.
    limit = sampled_rank_limit(TH, TINY.sample_top_k)
    assert max(c.metrics["sample_topk_rank"] for c in honest_checks if c.kind == "forward") <= limit


@pytest.fixture(scope="module")
def dishonest_checks(smollm2):
    ref = cal.Reference(smollm2)
    cheats = cal.dishonest_models(smollm2, seed=3)
    return cal.dishonest_run(ref, cheats, PromptSource.default(), random.Random(3), 2, SMALL, TH, model="smollm2")


def test_every_cheat_is_caught_on_smollm2(dishonest_checks):
    assert {c.miner for c in dishonest_checks} == set(cal.DISHONEST)
    for kind in cal.DISHONEST:
        mine = [c for c in dishonest_checks if c.miner == kind]
        # Model cheats are caught by their forward answers alone; an early stop only generates.
        caught = [c for c in mine if c.kind == "forward"] if kind != "early_stop" else mine
        assert caught and all(not c.ok for c in caught), (kind, [c.metrics for c in caught if c.ok])
