"""One miner's challenge in a round: a Forward and a seeded generation, shaped like user requests.

Nothing in a challenge tells it from a user's request: its prompts are plain corpus text (no salt line, no
random tokens), no two miners get the same prompt in a round, and every field a miner sees (prompt as text
or ids and its length, max_new_tokens, sampler parameters, stop strings, alternatives asked, Forward shape)
is drawn from the mix of shapes that users send (neuron/validator/mix.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from neuron import protocol, scoring
from neuron.config import LimitsConfig
from neuron.dataset import PromptSource
from neuron.engine.types import Sampler, SamplingParams
from neuron.model import LoadedModel
from neuron.pb.neuron.v1 import axon_pb2 as pb
from neuron.validator.mix import TrafficMix, length_in

@dataclass(frozen=True)
class ChallengeConfig:
    seq_len: int = 64  # longest Forward prompt (tokens); the length itself is drawn from the users' mix
    positions: int = 0  # positions checked per Forward; 0: every position, as a user's prompt logprobs ask
    topk: int = 16  # top-k asked when the mix has no user Forward yet (kept for calibration)
    max_new_tokens: int = 16  # tokens per Generate in the prior mix (users' traffic then shifts it)
    # Calibration's fixed mix (neuron/harness/calibration.py): the share of sampled generations, their parameters.
    sampled_fraction: float = 0.75
    sample_temperature: float = 0.7
    sample_top_k: int = 50
    sample_top_p: float = 0.9  # for half of the sampled requests


# Stop strings a challenge may carry: common ones users send to end a line or a turn.
STOPS = ("\n\n", "\n", ".", "###", "User:")


@dataclass(frozen=True)
class GenCheck:
    """What a seeded generation was asked, as the judge needs it: the same for challenges and user requests."""

    prompt_ids: tuple[int, ...]
    spec: scoring.GenSpec
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class FwdCheck:
    """What a Forward was asked (one sequence, every position's next-token logprob): challenges and users' echo."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    topk: int


@dataclass
class Challenge:
    """What one miner is asked; built fresh for every miner and round. Generation is seeded (gumbel-v1)."""

    forward_ids: list[int]
    positions: list[int]
    topk: int
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int
    top_p: float = 1.0
    prompt_text: str = ""  # sent as text when set (prompt_ids is then its tokenization)
    stop: tuple[str, ...] = ()
    logprobs_topn: int = 0

    @property
    def spec(self) -> scoring.GenSpec:
        return scoring.GenSpec(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed)

    @property
    def check(self) -> GenCheck:
        return GenCheck(tuple(self.prompt_ids), self.spec, self.stop)

    @property
    def fwd_check(self) -> FwdCheck:
        return FwdCheck(tuple(self.forward_ids), tuple(self.positions), self.topk)

    def forward_request(self) -> pb.ForwardRequest:
        # Exactly as the gateway asks a user's prompt logprobs: every position with a next token, its logprob.
        return protocol.forward_request(self.forward_ids, self.topk, self.positions, want_token_logprobs=True)

    def generate_request(self) -> pb.GenerateRequest:
        sampling = SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                                  sampler=Sampler.GUMBEL_V1)
        if self.prompt_text:
            return protocol.generate_request(prompt_text=self.prompt_text, max_new_tokens=self.max_new_tokens,
                                             sampling=sampling, stop=self.stop, logprobs_topn=self.logprobs_topn)
        return protocol.generate_request(self.prompt_ids, max_new_tokens=self.max_new_tokens, sampling=sampling,
                                         stop=self.stop, logprobs_topn=self.logprobs_topn)


def _text_of_tokens(lm: LoadedModel, source: PromptSource, rng: random.Random, n_tokens: int,
                    taken: set[str]) -> tuple[str, list[int]]:
    """A corpus span of about n_tokens tokens that no other miner got this round: its text and ids."""
    for _ in range(20):
        span = source.sample_span(rng, max(8, 3 * n_tokens), max(16, 6 * n_tokens))
        ids = lm.tokenizer(span).input_ids
        if len(ids) > n_tokens:
            cut = lm.tokenizer.decode(ids[:n_tokens], skip_special_tokens=True).strip()
            span, ids = cut, lm.tokenizer(cut).input_ids
        if span and span not in taken:
            break
    taken.add(span)
    return span, ids


def make_challenge(lm: LoadedModel, source: PromptSource, rng: random.Random, cfg: ChallengeConfig,
                   mix: TrafficMix | None = None, taken: set[str] | None = None) -> Challenge:
    """One miner's challenge; `taken` holds the round's prompts so far (no two miners get the same one)."""
    mix = mix or TrafficMix.for_config(cfg)
    taken = taken if taken is not None else set()
    fs = mix.sample_forward(rng)
    _, forward_ids = _text_of_tokens(lm, source, rng, max(2, min(length_in(rng, fs.seq_len), cfg.seq_len)), taken)
    n = len(forward_ids)
    # Positions with a next token (the last has none), all of them as a user's echo asks, or a sample.
    positions = list(range(n - 1)) if cfg.positions <= 0 else sorted(rng.sample(range(n - 1), min(cfg.positions, n - 1)))
    s = mix.sample(rng)
    # Prompt and new tokens within the context (the model's, and the miners' default limit), with room for a
    # re-tokenised text to come out a few tokens longer.
    room = min(lm.max_positions, LimitsConfig().max_seq_len) - s.max_new_tokens - 8
    text, prompt_ids = _text_of_tokens(lm, source, rng, max(2, min(length_in(rng, s.prompt_tokens), room)), taken)
    stop = tuple(rng.sample(STOPS, min(s.n_stop, len(STOPS))))
    return Challenge(forward_ids, positions, max(1, fs.topk), prompt_ids, s.max_new_tokens, s.temperature, s.top_k,
                     seed=rng.getrandbits(63), top_p=s.top_p, prompt_text=text if s.text_prompt else "", stop=stop,
                     logprobs_topn=s.logprobs_topn)
