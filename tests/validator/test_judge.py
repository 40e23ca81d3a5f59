"""The judge's checks that need no model: stop strings and the text of a generation."""

from neuron.engine.types import FinishReason
from neuron.protocol import GenerateAnswer
from neuron.scoring import GenSpec
from neuron.validator.challenge import GenCheck
from neuron.validator.judge import stop_problem


class Letters:
    """A tokenizer whose token i is the i-th letter: decode is exact, so the checks are too."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids)


def _answer(ids, text, finish):
    return GenerateAnswer(tuple(ids), text, tuple([-1.0] * len(ids)), finish)


def test_a_stop_string_must_end_the_generation_at_the_token_that_completes_it():
    check = GenCheck((0,), GenSpec(8, 0.7, 0, 1.0, 1), stop=("cd",))
    tok = Letters()
    assert stop_problem(check, _answer([0, 1, 2, 3], "ab", FinishReason.STOP_SEQUENCE), tok) == ""
    # a miner that ignores the stop string goes on past it
    assert "spell" in stop_problem(check, _answer([0, 1, 2, 3, 4, 5], "abcdef", FinishReason.LENGTH), tok)
    assert "went on" in stop_problem(check, _answer([0, 1, 2, 3, 4, 5], "ab", FinishReason.LENGTH), tok)
    assert "went on" in stop_problem(check, _answer([0, 1, 2, 3, 4], "ab", FinishReason.STOP_SEQUENCE), tok)
    # a stop claimed where no stop string appeared (an early stop that saves compute)
    assert "no stop string" in stop_problem(check, _answer([0, 1], "ab", FinishReason.STOP_SEQUENCE), tok)
    # the text must be the tokens' text cut before the stop string
    assert "spell" in stop_problem(check, _answer([0, 1, 2, 3], "abcd", FinishReason.STOP_SEQUENCE), tok)
    plain = GenCheck((0,), GenSpec(8), stop=())
    assert stop_problem(plain, _answer([0, 1, 2], "abc", FinishReason.LENGTH), tok) == ""
    assert "spell" in stop_problem(plain, _answer([0, 1, 2], "abd", FinishReason.LENGTH), tok)


def test_the_next_tokens_logprobs_are_checked_and_the_cheapest_lie_is_caught(tiny):
    """The cheapest lie about a prompt's logprobs: compute the top-k honestly and report the top-1 logprob as
    every next token's (it skips the gather). Honest answers pass; the lie fails."""
    import dataclasses

    import torch

    from neuron.model import forward_topk
    from neuron.protocol import ForwardAnswer
    from neuron.scoring import Thresholds
    from neuron.validator.challenge import FwdCheck
    from neuron.validator.judge import _check_forward
    from neuron.validator.reference import Reference

    ids = tiny.tokenizer("The river ran past the old mill and on to the sea").input_ids
    positions = list(range(len(ids) - 1))
    out = forward_topk(tiny, torch.tensor([ids]), positions, 16, want_token_logprobs=True)
    honest = ForwardAnswer(tuple(positions), out.topk_ids, out.topk_logprobs, out.rest_mass, out.token_logprobs)
    check = FwdCheck(tuple(ids), tuple(positions), 16)
    logits = Reference(tiny).logits_at([ids], [positions])[0]
    assert _check_forward(check, honest, logits, Thresholds()).ok
    lie = dataclasses.replace(honest, token_logprobs=out.topk_logprobs[:, :, 0].clone())
    verdict = _check_forward(check, lie, logits, Thresholds())
    assert not verdict.ok and "token logprob error" in verdict.reason
