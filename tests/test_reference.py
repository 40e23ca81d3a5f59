"""The validator's reference: one padded batch for a round, the head only where asked, same logits as alone."""

import pytest
import torch

from neuron.model import forward_logprobs
from neuron.validator.reference import Reference


def test_a_padded_batch_gives_each_sequence_its_own_logits(lm):
    tok = lm.tokenizer
    seqs = [tok("a short one").input_ids, tok("a much longer sentence than the first one, by far").input_ids,
            tok("middle length text").input_ids]
    positions = [[0, 2], list(range(len(seqs[1]) - 1)), [1]]
    got = Reference(lm, max_batch=2).logits_at(seqs, positions)
    for s, p, g in zip(seqs, positions, got):
        alone = lm.model(input_ids=torch.tensor([s])).logits[0, p].float()
        assert g.shape == (len(p), lm.vocab_size)
        assert torch.allclose(g, alone, atol=1e-4), (g - alone).abs().max()


def test_generation_logits_predict_each_generated_token(tiny):
    prompt, generated = [5, 6, 7], [8, 9]
    (rows,) = Reference(tiny).generation_logits([prompt], [generated])
    full, _ = forward_logprobs(tiny, torch.tensor([prompt + generated]))
    assert torch.allclose(torch.log_softmax(rows, -1), full[0, 2:4], atol=1e-5)


def test_mismatched_inputs_are_a_bug(tiny):
    with pytest.raises(ValueError):
        Reference(tiny).logits_at([[1, 2]], [[0], [1]])
