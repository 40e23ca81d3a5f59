"""The validator's reference: its own model's raw logits at the positions the checks need, batched over a round.

One left-padded pass for all the round's Forward prompts and one for all its teacher-forced generations;
the LM head runs only at the asked positions where the model allows it (neuron.model `_body_and_head`).
"""

from __future__ import annotations

import torch

from neuron.model import LoadedModel, _body_and_head, position_ids

# Positions whose full-vocabulary logits are computed at once by the head (bounds memory: 49,152
# float32 logits are 192 KB a position).
HEAD_CHUNK = 256


class Reference:
    """Raw float32 logits of the validator's model, one padded batch per call."""

    def __init__(self, lm: LoadedModel, max_batch: int = 64):
        self.lm = lm
        self.max_batch = max_batch  # sequences per model call: bounds activation memory on large rounds

    @torch.inference_mode()
    def logits_at(self, seqs: list[list[int]], positions: list[list[int]]) -> list[torch.Tensor]:
        """For each sequence, the raw logits [len(positions), V] (float32, CPU) predicting the token
        after each position. Sequences of any lengths; they run left-padded, max_batch at a time."""
        if len(seqs) != len(positions):
            raise ValueError(f"{len(seqs)} sequences but {len(positions)} position lists")
        out: list[torch.Tensor] = []
        # Similar lengths together waste less padding; answers go back in the callers' order.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        done: dict[int, torch.Tensor] = {}
        for start in range(0, len(order), self.max_batch):
            idx = order[start:start + self.max_batch]
            for i, logits in zip(idx, self._batch([seqs[i] for i in idx], [positions[i] for i in idx])):
                done[i] = logits
        out = [done[i] for i in range(len(seqs))]
        return out

    def _batch(self, seqs: list[list[int]], positions: list[list[int]]) -> list[torch.Tensor]:
        lm = self.lm
        width = max(len(s) for s in seqs)
        pad = lm.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in seqs], device=lm.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=lm.device)
        rows = torch.cat([torch.full((len(p),), r) for r, p in enumerate(positions)]).to(lm.device)
        cols = torch.cat([torch.tensor(p, dtype=torch.long) + (width - len(s))
                          for s, p in zip(seqs, positions)]).to(lm.device)
        split = _body_and_head(lm.model)
        if split is not None:
            body, head = split
            hidden = body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                          use_cache=False).last_hidden_state[rows, cols]
            logits = torch.cat([head(hidden[i:i + HEAD_CHUNK]).float() for i in range(0, len(rows), HEAD_CHUNK)])
        else:
            out = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
            logits = out.logits[rows, cols].float()
        return list(logits.cpu().split([len(p) for p in positions]))

    def generation_logits(self, prompts: list[list[int]], generations: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced over each prompt + its generated tokens: [T, V] logits predicting each token."""
        seqs = [list(p) + list(g) for p, g in zip(prompts, generations)]
        positions = [list(range(len(p) - 1, len(p) - 1 + len(g))) for p, g in zip(prompts, generations)]
        return self.logits_at(seqs, positions)
