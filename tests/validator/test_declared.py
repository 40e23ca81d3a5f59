"""A validator judges a miner only against the model the miner declares (weights, tokenizer, quantization)."""

from __future__ import annotations

from conftest import make_axon, make_wallet, miner_config
from neuron.axon import AxonServicer
from neuron.chain.local import LocalChain
from neuron.config import ValidatorConfig, with_overrides
from neuron.validator.declared import Declared, difference
from neuron.validator.judge import Outcome
from neuron.validator.loop import Validator


def test_the_same_model_has_no_difference_and_another_says_what_differs(tiny, tiny_gpt_neo):
    mine = Declared.of_model(tiny)
    assert difference(mine, Declared.of_model(tiny)) == ""
    four_bit = Declared(tiny.name, tiny.weights_fingerprint, tiny.tokenizer_fingerprint, "bnb-4bit-nf4")
    why = difference(mine, four_bit)
    assert why.startswith("declared model differs") and "quantization bnb-4bit-nf4 (this validator: none)" in why
    assert "weights" not in why.split(": ", 2)[2]  # only what differs is named
    why = difference(mine, Declared.of_model(tiny_gpt_neo))
    assert f"weights {tiny_gpt_neo.weights_fingerprint[:12]} (this validator: {tiny.weights_fingerprint[:12]})" in why
    assert "quantization" not in why.split(": ", 2)[2] and "tokenizer" not in why  # same tokenizer, not quantized


class DeclaresFourBit(AxonServicer):
    """Serves the tiny model honestly but declares a 4-bit checkpoint of it; counts the Info calls."""

    asked = 0

    async def Info(self, request, context):
        DeclaresFourBit.asked += 1
        info = await super().Info(request, context)
        info.quantization = "bnb-4bit-nf4"
        return info


async def test_a_miner_that_declares_another_model_is_not_judged_against_ours(tmp_path, tiny):
    chain = LocalChain(tmp_path / "chain.sqlite", block_time=0.05)
    chain.create_subnet(1, weights_rate_limit=1, min_validator_stake=1.0, max_validators=2)
    vwallet = make_wallet(tmp_path / "w", "validator")
    chain.register(1, vwallet)
    chain.add_stake(1, vwallet.hotkey.ss58_address, 100.0)
    axons, uids = [], []
    for i, servicer in enumerate((AxonServicer, DeclaresFourBit)):
        w = make_wallet(tmp_path / "w", f"miner{i}")
        uid, _ = chain.register(1, w)
        axon = make_axon(tiny, miner_config(**{"auth.required": True}), keypair=w.hotkey,
                         metagraph=lambda: chain.metagraph(1), servicer_factory=servicer)
        chain.serve_axon(1, w, "127.0.0.1", await axon.start())
        axons.append(axon)
        uids.append(uid)
    config = with_overrides(ValidatorConfig(), **{
        "model.name": "tiny", "subtensor.netuid": 1, "timeout_s": 10.0, "state_path": str(tmp_path / "state.json")})
    v = Validator(config, chain, vwallet, tiny)
    DeclaresFourBit.asked = 0
    try:
        for _ in range(2):
            judgements = await v.run_round()
            honest, other = judgements[uids[0]], judgements[uids[1]]
            assert honest.verified, honest.reason
            assert not other.verified and other.outcome is Outcome.OTHER_MODEL
            assert other.reason.startswith("declared model differs") and "bnb-4bit-nf4" in other.reason
            # Its answers were never comparable: they are no evidence against it.
            assert v.state.evidence[str(uids[1])].tokens == 0 < v.state.evidence[str(uids[0])].tokens
        assert DeclaresFourBit.asked == 1  # a declaration is asked once, not every round
        assert v.state.scores[uids[1]] == 0 < v.state.scores[uids[0]]
    finally:
        await v.close()
        for axon in axons:
            await axon.stop(grace=0)

