"""A validator judges a miner only against the model the miner declares (weights, tokenizer, quantization)."""

from __future__ import annotations

import asyncio
import time

from conftest import local_network, stop_miner
from neuron.axon import AxonServicer
from neuron.config import ValidatorConfig, with_overrides
from neuron.validator.declared import REFRESH_S, Declared, difference
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
    chain, vwallet, miners = await local_network(tmp_path, tiny, [None, DeclaresFourBit])
    uids, axons = list(miners), list(miners.values())
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
        assert DeclaresFourBit.asked == 1  # asked with the round that first met it, not with every round
        assert v.state.scores[uids[1]] == 0 < v.state.scores[uids[0]]
        # Later asks come from the watch, out of step with the rounds: nothing is due before 0.5 x REFRESH_S ...
        stop = asyncio.Event()
        v.declarations.clock = lambda: time.monotonic() + 0.4 * REFRESH_S
        watching = asyncio.create_task(v.watch_declarations(stop))
        await asyncio.sleep(1.0)
        assert DeclaresFourBit.asked == 1
        stop.set()
        await watching
        # ... and everything is due after 1.5 x REFRESH_S; a round then asks nothing.
        v.declarations.clock = lambda: time.monotonic() + 1.6 * REFRESH_S
        stop.clear()
        watching = asyncio.create_task(v.watch_declarations(stop))
        await asyncio.sleep(1.0)
        stop.set()
        await watching
        assert DeclaresFourBit.asked == 2
        await v.run_round()
        assert DeclaresFourBit.asked == 2
    finally:
        await v.close()
        for axon in axons:
            await stop_miner(axon)

