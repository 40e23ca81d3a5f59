"""The HF runner: preallocated per-sequence KV slots, and one batched decode step over them.

The KV cache is one buffer per layer, [slots, kv_heads, max_len, head_dim], allocated once. Every decode
step writes each row's new key/value at the same column `col`, which then advances round the buffer (a
ring); which columns a row may attend to is its row of a boolean mask. Attention does not care about
column order (positions are in the keys already; GPT-Neo's local layers are the exception, see
`ring_order`), so joining means prefilling the new prompts apart and copying their keys into their
slots' columns just before `col`, and leaving means nothing at all: the slot's mask row is rewritten
when it is reused. Positions live on the device and are incremented, not recomputed. The decode step
runs over the first `bucket` slots (a power of two at least as large as the highest slot in use), so its
shapes repeat and free slots in between are masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache

from neuron.engine import sampler as S
from neuron.engine.graphs import DecodeGraphs
from neuron.engine.types import SamplingParams
from neuron.model import LoadedModel, position_ids


class SlotCache(Cache):
    """The first `bucket` slots of the runner's buffers, as the HF model code expects a cache: the step's
    keys are written at column `col`, and attention reads the columns [lo, hi) only."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], col: torch.Tensor, lo: int, hi: int,
                 order: torch.Tensor | None = None):
        super().__init__(layers=[])
        self._keys, self._values, self._col, self._lo, self._hi, self._order = keys, values, col, lo, hi, order

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self._keys[layer_idx], self._values[layer_idx]
        k.index_copy_(2, self._col, key_states.to(k.dtype))
        v.index_copy_(2, self._col, value_states.to(v.dtype))
        if self._order is not None:  # the whole ring, oldest column first (Runner.ring_order)
            return k.index_select(2, self._order), v.index_select(2, self._order)
        return k[:, :, self._lo:self._hi], v[:, :, self._lo:self._hi]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class StepOutput:
    """What one prefill or decode step chose, copied to the host in one transfer."""

    slots: list[int]
    tokens: list[int]
    logprobs: list[float]
    finite: list[bool]  # False: the row's logits were not finite (that sequence fails, the others go on)
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a decoder's attention, from its HF config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class Runner:
    """Owns the model's device state for generation; every method runs on the engine thread."""

    def __init__(self, lm: LoadedModel, slots: int, max_len: int, cuda_graphs: bool = True):
        self.lm, self.slots, self.max_len = lm, slots, max_len
        dev = lm.device
        layers, kv_heads, head_dim = kv_shape(lm.model.config)
        self.keys = [torch.zeros(slots, kv_heads, max_len, head_dim, dtype=lm.dtype, device=dev) for _ in range(layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.mask = torch.zeros(slots, max_len, dtype=torch.bool, device=dev)
        self.positions = torch.zeros(slots, dtype=torch.long, device=dev)  # next position per slot
        self.last = torch.zeros(slots, dtype=torch.long, device=dev)  # last chosen token per slot
        # Columns counted without wrapping: the next step writes column tick % max_len in every row, and
        # each slot's oldest valid column is first[slot] (a sequence spans at most max_len columns).
        self.tick = 0
        self.first: dict[int, int] = {}
        self._col = torch.zeros(1, dtype=torch.long, device=dev)
        # GPT-Neo's local layers take as their window the last window_size key columns they are given, not the
        # last positions: for such a model each decode step gives the whole ring oldest-first, ending at its column.
        local = "local" in getattr(lm.model.config, "attention_layers", ())
        self.ring_order = torch.arange(max_len, device=dev) if local else None
        # Sampling state per slot, on the device; `params` mirrors it on the host for planning.
        self.temperature = torch.zeros(slots, dtype=torch.float64, device=dev)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=dev)
        self.top_p = torch.ones(slots, dtype=torch.float64, device=dev)
        self.seed = torch.zeros(slots, dtype=torch.long, device=dev)
        self.step_no = torch.zeros(slots, dtype=torch.long, device=dev)
        self.penalty = torch.ones(slots, dtype=torch.float32, device=dev)
        self.seen = torch.zeros(slots, lm.vocab_size, dtype=torch.bool, device=dev)
        self.params: dict[int, SamplingParams] = {}
        self.topn: dict[int, int] = {}
        self.kv_bytes = sum(k.numel() * k.element_size() * 2 for k in self.keys)
        self.kv_bytes_per_token = self.kv_bytes // (slots * max_len)
        self._mask_min = torch.finfo(self.keys[0].dtype).min
        self.choose = S.choose  # the sampling policy (the harness swaps in a cheating one)
        self.graphs = DecodeGraphs(self) if dev.type == "cuda" and cuda_graphs else None

    # ---- slots ----------------------------------------------------------------------------------

    def free_slot(self) -> int:
        return min(set(range(self.slots)) - self.params.keys())

    def release(self, slot: int) -> None:
        """The slot is free: nothing moves; it is masked until a new sequence is prefilled into it."""
        self.params.pop(slot, None)
        self.topn.pop(slot, None)
        self.first.pop(slot, None)
        self.mask[slot] = False
        self.positions[slot] = 0
        if not self.params:  # an empty batch starts again at column 0, far from wrapping
            self.tick = -(-self.tick // self.max_len) * self.max_len

    @property
    def bucket(self) -> int:
        """Rows a decode step runs over: a power of two covering the highest slot in use."""
        top = max(self.params, default=-1) + 1
        b = 1
        while b < top:
            b *= 2
        return min(b, self.slots)

    # ---- steps ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slots: list[int], prompts: list[list[int]], params: list[SamplingParams], topn: list[int],
                seeds: list[int]) -> StepOutput:
        """Run the new prompts (left-padded together), copy their keys into their slots, choose their first tokens."""
        dev, width = self.lm.device, max(len(p) for p in prompts)
        if not self.first:  # an empty batch sits at a block boundary: its prompts start there, unwrapped
            self.tick += width
        pad = self.lm.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                            past_key_values=DynamicCache(config=self.lm.model.config), use_cache=True, logits_to_keep=1)
        rows = torch.tensor(slots, device=dev)
        cols = (torch.arange(self.tick - width, self.tick, device=dev) % self.max_len)
        layers = out.past_key_values.layers
        if len(layers) != len(self.keys) or layers[0].keys.shape[1::2] != self.keys[0].shape[1::2]:
            raise RuntimeError(f"the model's KV cache {tuple(layers[0].keys.shape)} x {len(layers)} does not match "
                               f"the slots {tuple(self.keys[0].shape)} x {len(self.keys)} made from its config")
        for layer, keys, values in zip(layers, self.keys, self.values):
            keys[rows[:, None], :, cols[None, :]] = layer.keys.permute(0, 2, 1, 3).to(keys.dtype)
            values[rows[:, None], :, cols[None, :]] = layer.values.permute(0, 2, 1, 3).to(values.dtype)
        self.mask[rows] = False
        self.mask[rows[:, None], cols[None, :]] = mask.bool()
        self.positions[rows] = mask.sum(1)
        for slot, prompt, p, n, seed in zip(slots, prompts, params, topn, seeds):
            self.params[slot], self.topn[slot], self.first[slot] = p, n, self.tick - len(prompt)
            self.temperature[slot], self.top_k[slot], self.top_p[slot] = p.temperature, p.top_k, p.top_p
            self.seed[slot], self.step_no[slot], self.penalty[slot] = seed, 0, p.repetition_penalty
            if p.repetition_penalty != 1.0:
                self.seen[slot] = False
                self.seen[slot, torch.tensor(prompt, device=dev)] = True
        return self._choose(rows, slots, out.logits[:, -1, :])

    @torch.inference_mode()
    def decode(self) -> StepOutput:
        """One token for every sequence in the decode batch."""
        b = self.bucket
        slots = sorted(self.params)
        rows = torch.tensor(slots, device=self.lm.device)
        col = self.tick % self.max_len
        self._col.fill_(col)
        self.mask[:b, col] = True
        if self.ring_order is not None:
            torch.remainder(torch.arange(col + 1, col + 1 + self.max_len, device=self.lm.device), self.max_len,
                            out=self.ring_order)
        logits = self.graphs.logits(b) if self.graphs is not None else None
        if logits is None:
            # Attend over the columns in use when they do not wrap round the buffer (nearly always), else all.
            oldest = min(self.first.values())
            same_lap = oldest // self.max_len == self.tick // self.max_len and self.ring_order is None
            lo, hi = (oldest % self.max_len, col + 1) if same_lap else (0, self.max_len)
            logits = self.forward_step(b, self.attention_mask(b, lo, hi), lo, hi)
        self.positions[rows] += 1  # free rows stay at 0: they never walk off the position table
        self.tick += 1
        return self._choose(rows, slots, logits[rows, -1, :])

    def attention_mask(self, b: int, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The additive mask [b, 1, 1, hi - lo] of the columns each row may attend to (into `out` if given)."""
        out = torch.zeros(b, 1, 1, hi - lo, dtype=self.keys[0].dtype, device=self.lm.device) if out is None else out
        mask = self.mask[:b, None, None, lo:hi] if self.ring_order is None else self.mask[:b, None, None].index_select(
            3, self.ring_order)  # ring order: lo, hi are 0, max_len
        return out.fill_(0).masked_fill_(~mask, self._mask_min)

    def forward_step(self, b: int, attn: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The model over the first b slots' last tokens, keys written at the current column: logits [b, 1, V]."""
        cache = SlotCache([k[:b] for k in self.keys], [v[:b] for v in self.values], self._col, lo, hi, self.ring_order)
        return self.lm.model(input_ids=self.last[:b, None], attention_mask=attn, position_ids=self.positions[:b, None],
                             past_key_values=cache, use_cache=True).logits

    def _choose(self, rows: torch.Tensor, slots: list[int], logits: torch.Tensor) -> StepOutput:
        """The sampler over these rows, and the one copy of everything the host needs."""
        logits = logits.float()
        finite = torch.isfinite(logits).all(dim=1)
        logits = torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)
        logprobs = torch.log_softmax(logits, dim=-1)
        params = [self.params[s] for s in slots]
        chosen_from = logits
        if any(p.repetition_penalty != 1.0 for p in params):
            chosen_from = S.apply_repetition_penalty(logits, self.seen[rows], self.penalty[rows])
        rp = S.RowParams(self.temperature[rows], self.top_k[rows], self.top_p[rows], self.seed[rows],
                         self.step_no[rows], any_sampled=any(p.temperature > 0 for p in params),
                         max_top_k=max((p.top_k for p in params if p.temperature > 0), default=0),
                         all_top_k=all(p.top_k > 0 for p in params if p.temperature > 0),
                         any_top_p=any(p.top_p < 1 for p in params if p.temperature > 0),
                         any_unfiltered=any(p.top_k <= 0 and p.top_p >= 1 for p in params if p.temperature > 0))
        tokens = self.choose(chosen_from, rp)
        self.last[rows] = tokens
        self.step_no[rows] += 1
        if any(p.repetition_penalty != 1.0 for p in params):
            self.seen[rows, tokens] = True
        n = max(self.topn[s] for s in slots)
        cols = [tokens.double()[:, None], logprobs.gather(1, tokens[:, None]).double(), finite.double()[:, None]]
        if n:
            top = logprobs.topk(n, dim=-1)
            cols += [top.indices.double(), top.values.double()]
        host = torch.cat(cols, dim=1).cpu().tolist()  # the step's one device-to-host copy
        return StepOutput(slots=slots, tokens=[int(r[0]) for r in host], logprobs=[r[1] for r in host],
                          finite=[r[2] == 1.0 for r in host],
                          top_ids=[[int(x) for x in r[3:3 + self.topn[s]]] for r, s in zip(host, slots)],
                          top_logprobs=[r[3 + n:3 + n + self.topn[s]] for r, s in zip(host, slots)])
