"""The harness: honest seeded decoding passes the checks, every generation cheat is caught, no cheat switch
in the production miner."""

import dataclasses
import random

import pytest

from neuron.harness import calibration as cal
from neuron.validator.challenge import ChallengeConfig
from neuron.config import ConfigError, MinerConfig
from neuron.dataset import PromptSource
from neuron.harness import cheat_miner
from neuron.harness.cheats import GENERATION, KINDS, names
from neuron.harness.decode import decode, engine_decode
from neuron.scoring import Thresholds

TH = Thresholds()
CFG = ChallengeConfig(max_new_tokens=16, sampled_fraction=1.0)


@pytest.fixture(scope="module")
def challenges(tiny):
    return cal.challenges(tiny, PromptSource.default(), random.Random(5), 8, CFG)


def test_the_engine_and_the_direct_loop_sample_the_same_tokens(tiny, challenges):
    prompts, specs = [c.prompt_ids for c in challenges], cal.specs_of(challenges)
    direct = decode(tiny, prompts, specs)
    engine = engine_decode(tiny, prompts, specs)
    assert [a.tokens for a in direct] == [a.tokens for a in engine]
    ref = cal.Reference(tiny)
    checks = cal.generation_checks(ref, challenges, engine, TH, model="tiny", label="float32", honest=True, batch=8)
    assert all(c.ok for c in checks), [c.reason for c in checks if not c.ok]


@pytest.mark.parametrize("kind", names(GENERATION))
def test_every_generation_cheat_is_caught_on_the_tiny_model(tiny, kind):
    # int8 is a small, steady deviation: the evidence across rounds catches it, not one challenge.
    chs = cal.challenges(tiny, PromptSource.default(), random.Random(6), 16, CFG)
    checks = cal.generation_cheat_run(cal.Reference(tiny), (kind,), PromptSource.default(), random.Random(6), 16,
                                      CFG, TH, model="tiny")
    assert len(checks) == len(chs)
    changed = [c for c in checks if c.changed]
    assert changed, kind
    if kind == "int8":
        assert any(m > 0 for c in checks for m in c.margins)
    else:
        assert any(not c.ok for c in changed), kind


def test_the_production_miner_has_no_cheat_switch():
    assert "dishonest" not in {f.name for f in dataclasses.fields(MinerConfig)}
    assert set(names(GENERATION)) <= set(KINDS)


def test_a_cheating_miner_refuses_a_real_chain():
    with pytest.raises(ConfigError, match="mock network only"):
        cheat_miner.main(["--kind", "greedy", "--subtensor.network", "finney"])
    with pytest.raises(ConfigError, match="expected one of"):
        cheat_miner.main(["--kind", "nonsense", "--subtensor.network", "local"])
    assert cheat_miner.main([]) == 2


@pytest.mark.parametrize("model", ["tiny_gpt_neo", "tiny_gpt_neo_4bit"])
def test_the_model_cheats_build_on_the_seed_models_and_change_the_logits(model, request):
    """The mock network's model cheats work on GPT-Neo's layout and on a bitsandbytes model (whose packed weights
    they leave alone)."""
    import torch

    from neuron.harness.cheats import MODEL, cheat_model

    lm = request.getfixturevalue(model)
    ids = torch.tensor([lm.tokenizer("The capital of France is").input_ids])
    honest = lm.model(input_ids=ids).logits
    for kind in names(MODEL):
        cheat = cheat_model(kind, lm)
        assert not torch.allclose(cheat.model(input_ids=ids).logits, honest, atol=1e-3), kind
    assert len(cheat_model("truncated", lm).model.transformer.h) == 1
