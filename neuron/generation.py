"""Batched decoding with a KV cache: sequences join between steps and leave when they finish."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from neuron.model import LoadedModel, position_ids

LENGTH, EOS, STOP_SEQUENCE = "length", "eos", "stop_sequence"


@dataclass(frozen=True)
class GenParams:
    """One generation's sampling parameters and stop conditions (already validated)."""

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: random
    repetition_penalty: float = 1.0  # 1: off
    stop: tuple[str, ...] = ()
    logprobs_topn: int = 0


@dataclass
class Step:
    """One generated token, as streamed to the caller."""

    token_id: int
    logprob: float  # under the unmodified model distribution
    top_ids: list[int]
    top_logprobs: list[float]
    text: str  # the text this token adds
    finish_reason: str | None = None


@dataclass
class Sequence:
    """A generation in flight."""

    prompt_ids: list[int]
    params: GenParams
    generated: list[int] = field(default_factory=list)
    text: str = ""  # text of `generated` emitted so far (cut before a stop string)
    decoded: str = ""  # text of generated[:read], some of it maybe held back from `text`
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    # Incremental detokenisation: generated[prefix:read] is the window decoded last step.
    prefix: int = 0
    read: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _filter_logits(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to one row of logits (float32 [V])."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(seq.prompt_ids + seq.generated, device=logits.device).unique()
        vals = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.temperature == 0.0:
        return logits
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < p.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop tokens once the mass before them already reaches top_p; the first always stays.
        drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _choose(logits: torch.Tensor, seq: Sequence) -> int:
    filtered = _filter_logits(logits, seq)
    if seq.params.temperature == 0.0:
        return int(filtered.argmax())
    probs = filtered.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=seq.generator))


class Decoder:
    """Owns a batch of sequences and their KV cache; every call runs on the model's worker thread."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.seqs: list[Sequence] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [B, L] 1 for real tokens, 0 for left padding

    def __len__(self) -> int:
        return len(self.seqs)

    def new_sequence(self, prompt_ids: list[int], params: GenParams) -> Sequence:
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=self.lm.device)
            gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        return Sequence(list(prompt_ids), params, generator=gen)

    @torch.inference_mode()
    def add(self, seqs: list[Sequence]) -> list[Step]:
        """Prefill new sequences (left-padded together), join them to the batch; their first tokens."""
        width = max(len(s.prompt_ids) for s in seqs)
        pad = self.lm.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in seqs], device=self.lm.device)
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs],
                            device=self.lm.device)
        # logits_to_keep=1: the LM head runs on the last position only, not on the whole prompt.
        out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
                            logits_to_keep=1)
        self._join(out.past_key_values, mask)
        self.seqs.extend(seqs)
        return self._advance(seqs, out.logits[:, -1, :])

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, Step]]:
        """One token for every sequence in the batch."""
        last = torch.tensor([[s.generated[-1]] for s in self.seqs], device=self.lm.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.seqs), 1)], dim=1)
        pos = position_ids(self.mask)[:, -1:]
        out = self.lm.model(input_ids=last, attention_mask=self.mask, position_ids=pos,
                            past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return list(zip(self.seqs, self._advance(self.seqs, out.logits[:, -1, :])))

    def remove(self, done: list[Sequence]) -> None:
        """Drop finished or cancelled sequences from the batch (and leading all-padding columns)."""
        if not done:
            return
        keep = [i for i, s in enumerate(self.seqs) if not any(s is d for d in done)]
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.lm.device)
        self.mask = self.mask[index]
        start = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # columns that are padding in every row
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def _join(self, cache, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(mask, 1)], dim=0)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)], dim=0)
            mine.values = torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)], dim=0)

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Step]:
        """Choose each row's next token from logits [B, V]: the batch shares one log-softmax and one copy
        to the host; only rows that sample or penalise repetition take the per-row path."""
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(-1)
        for i, seq in enumerate(seqs):
            if seq.params.temperature > 0 or seq.params.repetition_penalty != 1.0:
                tokens[i] = _choose(logits[i], seq)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        topn = max(s.params.logprobs_topn for s in seqs)
        top_lp, top_ids = [[]] * len(seqs), [[]] * len(seqs)
        if topn:
            values, indices = logprobs.topk(topn, dim=-1)
            top_lp, top_ids = values.tolist(), indices.tolist()
        steps = []
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
            seq.generated.append(token)
            # The end is known before the text: the last delta flushes what was held back.
            if token == self.lm.eos_token_id:
                seq.finish_reason = EOS
            elif len(seq.generated) >= seq.params.max_new_tokens:
                seq.finish_reason = LENGTH
            n = seq.params.logprobs_topn
            step = Step(token, chosen[i], top_ids[i][:n], top_lp[i][:n], self._text_delta(seq))
            step.finish_reason = seq.finish_reason
            steps.append(step)
        return steps

    def _text_delta(self, seq: Sequence) -> str:
        """Text added by the last token. Held back while a multi-byte character is incomplete, or while the
        text ends with the start of a stop string, so the deltas of a generation add up to its decoded
        tokens cut before the first stop string.

        Only a short window of tokens is decoded each step (the last emitted window, then the new ones),
        so the cost per token does not grow with the length.
        """
        decode = self.lm.tokenizer.decode
        before = decode(seq.generated[seq.prefix:seq.read], skip_special_tokens=True)
        after = decode(seq.generated[seq.prefix:], skip_special_tokens=True)
        new = after[len(before):]
        full = seq.decoded + new
        stops = seq.params.stop
        # Only a match reaching into the new text is new: earlier text was searched already.
        cuts = [c for c in (full.find(s, max(0, len(seq.decoded) - len(s) + 1)) for s in stops) if c != -1]
        if cuts:
            seq.finish_reason = STOP_SEQUENCE
            shown = full[:min(cuts)]
        elif seq.finished:
            shown = full
        elif new.endswith("\ufffd"):
            return ""
        else:
            seq.decoded, seq.prefix, seq.read = full, seq.read, len(seq.generated)
            held = max((k for s in stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
            shown = full[:len(full) - held]
        delta = shown[len(seq.text):]
        seq.text += delta
        return delta
