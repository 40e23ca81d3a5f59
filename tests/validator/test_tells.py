"""Can a miner tell a validator's challenge from a user's request? Not by the simplest recognisers.

300 challenges are built as the validator builds them (`make_challenge` over the validator's mix, a fresh
`taken` set per round) and 300 user requests go through the gateway's own request path
(`Gateway.completion_ask`) from bodies an application would send: corpus text, the users' parameter mix.
The gateway records every user request into the same mix the challenges are drawn from, as in a running
validator. Each recogniser sees only the pb.GenerateRequest a miner would get; its accuracy at telling the
two apart must be chance, within a margin that the sample size sets.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import pytest

from neuron.config import GatewayConfig
from neuron.dataset import PromptSource
from neuron.gateway import openai_api as oa
from neuron.gateway.app import Gateway
from neuron.harness.cheats.servicers import SelectiveServicer
from neuron.pb.neuron.v1 import axon_pb2 as pb
from neuron.validator.challenge import STOPS, ChallengeConfig, make_challenge
from neuron.validator.mix import BUCKETS, PRIOR, TrafficMix

N = 300  # of each
MINERS_PER_ROUND = 8
MAX_NEW_TOKENS = 16


def _user_body(lm, source: PromptSource, rng: random.Random) -> oa.CompletionRequest:
    """What an application sends: a shape from the users' mix, a corpus prompt of some length within it."""
    shapes = list(PRIOR)
    s = rng.choices(shapes, weights=[PRIOR[k] for k in shapes])[0]
    lo = max([0] + [b for b in BUCKETS if b < s.prompt_tokens])
    n = rng.randint(lo + 1, s.prompt_tokens)
    span = source.sample_span(rng, 4 * n, 8 * n)
    ids = lm.tokenizer(span).input_ids[:n]
    text = lm.tokenizer.decode(ids, skip_special_tokens=True).strip()
    body = {"model": "tiny", "prompt": text if s.text_prompt else lm.tokenizer(text).input_ids,
            "max_tokens": MAX_NEW_TOKENS, "temperature": s.temperature, "top_p": s.top_p}
    if s.top_k:
        body["top_k"] = s.top_k
    if s.n_stop:
        body["stop"] = rng.sample(STOPS, s.n_stop)
    if s.logprobs_topn:
        body["logprobs"] = s.logprobs_topn
    return oa.CompletionRequest.model_validate(body)


@pytest.fixture(scope="module")
def requests(tiny):
    rng = random.Random(20261204)
    source = PromptSource.default()
    mix = TrafficMix.default(MAX_NEW_TOKENS)
    gw = Gateway(GatewayConfig(auth=False), None, tiny, "tiny", verify=None, deadline_s=10.0, mix=mix, rng=random.Random(7))
    cfg = ChallengeConfig(max_new_tokens=MAX_NEW_TOKENS)
    challenges, users = [], []
    while len(challenges) < N:
        taken: set[str] = set()  # one round
        for _ in range(MINERS_PER_ROUND):
            users.append(gw.completion_ask(_user_body(tiny, source, rng)).request)
            challenges.append(make_challenge(tiny, source, rng, cfg, mix, taken).generate_request())
    return challenges[:N], users[:N], tiny


def _margin(n: int) -> float:
    """3.5 standard errors of an accuracy of 0.5 over n guesses (about 0.1 for n = 300)."""
    return 3.5 * 0.5 / math.sqrt(n)


def _accuracy(rule, challenges, users) -> float:
    right = sum(bool(rule(r)) for r in challenges) + sum(not rule(r) for r in users)
    return right / (len(challenges) + len(users))


def _shape(r: pb.GenerateRequest) -> tuple:
    return (bool(r.prompt_text), r.max_new_tokens, round(r.temperature, 4), r.top_k, round(r.top_p, 4), len(r.stop),
            r.logprobs_topn, r.sampler, r.HasField("seed"))


def _prompt_tokens(lm, r: pb.GenerateRequest) -> int:
    return len(lm.tokenizer(r.prompt_text).input_ids) if r.prompt_text else len(r.prompt_ids)


def _learned(feature, challenges, users):
    """The best rule over `feature` learned on one half (challenge where challenges were the majority), and
    its accuracy on the other half."""
    h = len(challenges) // 2
    seen: dict = defaultdict(Counter)
    for r in challenges[:h]:
        seen[feature(r)]["c"] += 1
    for r in users[:h]:
        seen[feature(r)]["u"] += 1
    return _accuracy(lambda r: seen[feature(r)]["c"] > seen[feature(r)]["u"], challenges[h:], users[h:]), 2 * (len(challenges) - h)


def test_no_challenge_carries_the_old_salt_line(requests):
    challenges, users, _ = requests
    assert sum(bool(SelectiveServicer.SALT_LINE.match(r.prompt_text)) for r in challenges) == 0
    assert all(r.sampler == pb.SAMPLER_GUMBEL_V1 and r.HasField("seed") for r in challenges + users)


def test_the_old_request_shape_rule_is_chance(requests):
    challenges, users, _ = requests
    acc = _accuracy(SelectiveServicer.looks_like_a_challenge, challenges, users)
    assert abs(acc - 0.5) < _margin(2 * N), acc


def test_a_rule_over_the_whole_shape_is_chance(requests):
    challenges, users, _ = requests
    acc, n = _learned(_shape, challenges, users)
    assert abs(acc - 0.5) < _margin(n), acc


def test_a_rule_over_the_prompt_length_is_chance(requests):
    challenges, users, lm = requests
    acc, n = _learned(lambda r: _prompt_tokens(lm, r), challenges, users)
    assert abs(acc - 0.5) < _margin(n), acc
    on_bucket = _accuracy(lambda r: _prompt_tokens(lm, r) in BUCKETS, challenges, users)
    assert abs(on_bucket - 0.5) < _margin(2 * N), on_bucket
