"""The validator against real axons (in-process, on loopback) and a real local chain."""

import asyncio
import json
import math

import pytest
import torch

from conftest import local_network, make_wallet, stop_miner
from neuron.axon import AxonServicer
from neuron.chain.local import LocalChain
from neuron.config import ValidatorConfig, with_overrides
from neuron.engine.types import FinishReason
from neuron.protocol import GenerateAnswer
from neuron.validator.challenge import GenCheck
from neuron.validator.judge import Judgement
from neuron.scoring import Evidence, GenSpec, Thresholds
from neuron.validator.loop import Validator
from neuron.validator.state import State


class Hanging(AxonServicer):
    """Signals when a Forward arrives, then never answers: the test kills its axon meanwhile."""

    arrived: asyncio.Event

    async def Forward(self, request, context):
        Hanging.arrived.set()
        await asyncio.Event().wait()


@pytest.fixture
async def network(tmp_path, tiny):
    """A local chain with a staked validator and three honest miners serving with auth on."""
    chain, vwallet, miners = await local_network(tmp_path, tiny, [None, None, Hanging])
    axons = list(miners.items())
    config = with_overrides(ValidatorConfig(), **{
        "model.name": "tiny", "subtensor.netuid": 1, "timeout_s": 5.0, "epoch_rounds": 1,
        "state_path": str(tmp_path / "state.json")})
    yield chain, vwallet, axons, config
    for _, axon in axons:
        await stop_miner(axon)


async def test_killing_a_miner_mid_round_costs_that_miner_and_nothing_else(network, tiny):
    chain, vwallet, axons, config = network
    Hanging.arrived = asyncio.Event()
    v = Validator(config, chain, vwallet, tiny)
    victim_uid, victim = axons[2]
    round_task = asyncio.ensure_future(v.run_round())
    await asyncio.wait_for(Hanging.arrived.wait(), 10)
    await stop_miner(victim)  # the miner dies with the validator's request in flight
    judgements = await round_task
    await v.close()
    assert not judgements[victim_uid].verified and judgements[victim_uid].reason
    for uid, _ in axons[:2]:
        assert judgements[uid].verified, judgements[uid].reason
        assert v.state.scores[uid] > 0
    assert v.state.scores[victim_uid] == 0
    w = chain.metagraph(1)
    assert w.by_uid(victim_uid).incentive == 0 and w.by_uid(axons[0][0]).incentive > 0


async def test_a_restarted_validator_resumes_its_moving_averages(network, tiny):
    chain, vwallet, axons, config = network
    await stop_miner(axons[2][1])
    v = Validator(config, chain, vwallet, tiny)
    await v.run_round()
    await v.run_round()
    scores, rounds = list(v.state.scores), v.state.rounds
    await v.close()
    again = Validator(config, chain, vwallet, tiny)  # a new process would do exactly this
    assert again.state.scores == scores and again.state.rounds == rounds == 2
    await again.run_round()
    uid = axons[0][0]
    assert again.state.scores[uid] > scores[uid]  # the average went on from where it was
    await again.close()


def test_a_uid_that_changes_hotkey_starts_from_zero(tmp_path, tiny):
    chain = LocalChain(tmp_path / "chain.sqlite")
    chain.create_subnet(1)
    vw = make_wallet(tmp_path / "w", "v")
    chain.register(1, vw)
    mw = make_wallet(tmp_path / "w", "m")
    uid, _ = chain.register(1, mw)
    config = with_overrides(ValidatorConfig(), **{"subtensor.netuid": 1, "state_path": str(tmp_path / "s.json")})
    v = Validator(config, chain, vw, tiny)
    v._sync(chain.metagraph(1))
    v.state.scores[uid] = 0.7
    mg = chain.metagraph(1)
    renamed = type(mg)(mg.netuid, mg.block, tuple(
        n if n.uid != uid else type(n)(**{**n.__dict__, "hotkey": "5" + "X" * 47}) for n in mg.neurons))
    v.state.evidence[str(uid)] = Evidence(cusum=0.5, tokens=100)
    v._sync(renamed)
    assert v.state.scores[uid] == 0.0
    assert str(uid) not in v.state.evidence  # the new hotkey's evidence starts afresh


def one_miner(tmp_path, tiny, th: Thresholds | None = None):
    """A validator on a local chain with one registered miner whose score is 0.7: (validator, uid)."""
    chain = LocalChain(tmp_path / "chain.sqlite")
    chain.create_subnet(1)
    vw = make_wallet(tmp_path / "w", "v")
    chain.register(1, vw)
    uid, _ = chain.register(1, make_wallet(tmp_path / "w", "m"))
    config = with_overrides(ValidatorConfig(), **{"subtensor.netuid": 1, "state_path": str(tmp_path / "s.json")})
    v = Validator(config, chain, vw, tiny, thresholds=th)
    v._sync(chain.metagraph(1))
    v.state.scores[uid] = 0.7
    return v, uid


def test_evidence_survives_a_restart_and_a_flagged_miner_loses_its_score(tmp_path, tiny):
    th = Thresholds(evidence_drift=0.01, evidence_limit=1.0, evidence_cap=0.5)
    v, uid = one_miner(tmp_path, tiny, th)
    passed = Judgement(True, "", margins=[0.0, 0.3, 0.3], errors=[0.001, 0.05, 0.002])
    assert v._weigh_evidence(uid, passed).verified  # 0.29 + 0.29 = 0.58 < 1
    assert v.state.evidence[str(uid)].cusum == pytest.approx(0.58)
    assert v.state.evidence[str(uid)].lp_cusum == pytest.approx(0.012)  # 0 -> 0.03 -> 0.012 (drift 0.02)
    v.state.save(v.state_path)
    again = Validator(v.config, v.chain, v.wallet, tiny, thresholds=th)
    assert again.state.evidence[str(uid)] == v.state.evidence[str(uid)]
    j = again._weigh_evidence(uid, Judgement(True, "", margins=[0.1] * 6, errors=[0.0] * 6))  # each round passed
    assert not j.verified and j.reason.startswith("evidence: token margins crossed the limit over 9 tokens")
    assert again.state.scores[uid] == 0.0
    assert not again._weigh_evidence(uid, Judgement(True, "", margins=[])).verified  # it stays flagged


def test_disagreement_evidence_survives_a_restart_and_an_older_state_file_still_loads(tmp_path, tiny):
    th = Thresholds(disagreement_drift=0.1, disagreement_limit=3.0)
    v, uid = one_miner(tmp_path, tiny, th)
    # Two near-ties swapped in a passed round (margins 0.001: nothing for the margin CUSUM): 0.9 -> 0.8 -> 1.7.
    assert v._weigh_evidence(uid, Judgement(True, "", margins=[0.001, 0.0, 0.001], errors=[0.0] * 3)).verified
    assert v.state.evidence[str(uid)].dis_cusum == pytest.approx(1.7)
    v.state.save(v.state_path)
    again = Validator(v.config, v.chain, v.wallet, tiny, thresholds=th)
    assert again.state.evidence[str(uid)] == v.state.evidence[str(uid)]
    j = again._weigh_evidence(uid, Judgement(True, "", margins=[0.001, 0.001], errors=[0.0] * 2))  # 2.6 -> 3.5
    assert not j.verified and j.reason.startswith("evidence: disagreements crossed the limit over 5 tokens (4 not")
    assert again.state.scores[uid] == 0.0
    # A state file written before this statistic: its evidence loads with the new counter at 0.
    data = json.loads(v.state_path.read_text())
    data["evidence"][str(uid)].pop("dis_cusum")
    v.state_path.write_text(json.dumps(data))
    old = State.load(v.state_path).evidence[str(uid)]
    assert old.dis_cusum == 0.0 and old.disagreements == 2 and old.tokens == 3


async def test_user_answers_feed_the_disagreement_evidence(tmp_path, tiny):
    # A user's greedy answer judged by the gateway's path (verify_users -> judge_users -> evidence): two tokens that
    # are not the reference's choice count twice, whatever their margins.
    th = Thresholds(evidence_limit=50.0, lp_evidence_limit=50.0, disagreement_drift=0.1, disagreement_limit=3.0)
    v, uid = one_miner(tmp_path, tiny, th)
    prompt = tiny.tokenizer("The validator checks every answer")["input_ids"]
    ids = list(prompt)
    with torch.inference_mode():
        for step in range(8):
            logits = tiny.model(torch.tensor([ids])).logits[0, -1].double()
            logits[tiny.eos_token_id] = -math.inf
            order = logits.argsort(descending=True)
            ids.append(int(order[1] if step in (2, 5) else order[0]))
        lp = torch.log_softmax(tiny.model(torch.tensor([ids])).logits[0].double(), -1)
    tokens = ids[len(prompt):]
    logprobs = tuple(float(lp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(tokens))
    answer = GenerateAnswer(tuple(tokens), tiny.tokenizer.decode(tokens, skip_special_tokens=True), logprobs,
                            FinishReason.LENGTH)
    check = GenCheck(tuple(prompt), GenSpec(max_new_tokens=8))
    [j] = await v.verify_users([(uid, v.state.hotkeys[uid], check, answer, 0.1)])
    ev = v.state.evidence[str(uid)]
    assert ev.tokens == 8 and ev.disagreements == 2 and sum(m > 0 for m in j.margins) == 2
    assert ev.dis_cusum == pytest.approx(1.4)  # 0.9 at step 2, 0.7 at 4, 1.6 at 5, then two drifts
    assert v.state.stats[str(uid)].users_checked == 1


def test_steady_logprob_errors_flag_a_miner_whose_every_token_is_the_samplers(tmp_path, tiny):
    v, uid = one_miner(tmp_path, tiny)
    # int8-like: every token the sampler's choice, every logprob 0.06 off (each round passes on its own).
    rounds = [v._weigh_evidence(uid, Judgement(True, "", margins=[0.0] * 16, errors=[0.06] * 16)) for _ in range(3)]
    assert not rounds[-1].verified and "logprob errors crossed the limit" in rounds[-1].reason
    assert v.state.scores[uid] == 0.0


def test_unreadable_state_is_a_clear_error(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable.*move it away"):
        State.load(path)
    State(scores=[0.5], hotkeys=["a"], rounds=3).save(path)
    assert State.load(path).rounds == 3 and not (tmp_path / "state.json.tmp").exists()


async def test_run_validator_stops_after_its_rounds_and_saves_state(network, tmp_path):
    from neuron.validator.loop import run_validator

    chain, vwallet, axons, config = network
    await stop_miner(axons[2][1])
    config = with_overrides(config, **{"rounds": 2, "round_interval_s": 0.0, "timeout_s": 2.0})
    await asyncio.wait_for(run_validator(config, chain, vwallet), 60)
    state = State.load(tmp_path / "state.json")
    assert state.rounds == 2 and state.scores[axons[0][0]] > 0


async def test_an_unregistered_validator_is_told_how_to_register(network, tmp_path):
    from neuron.chain.base import ChainError
    from neuron.validator.loop import run_validator

    chain, _, _, config = network
    stranger = make_wallet(tmp_path / "w", "stranger")
    with pytest.raises(ChainError, match="not registered.*neuron register"):
        await run_validator(config, chain, stranger)
