"""Who gets the model: a real axon with auth on, real wallets, and a real local chain behind the miner's metagraph.

Every refusal must carry its status and cost no model work; a validator is served and the answer's
signature verifies; a forged or missing answer signature is caught by the dendrite; stake sets priority.
"""

import asyncio
import contextlib
import dataclasses
import threading
import time

import grpc
import pytest
import torch
from bittensor import http_auth

from conftest import HangsOn, make_axon, make_wallet, miner_config, start_miner, stop_miner
from neuron import auth, wire
from neuron.chain.local import LocalChain
from neuron.config import BatchingConfig
from neuron.dendrite import Dendrite, Target
from neuron.miner import MetagraphCache
from neuron.engine.hf import HFEngine
from neuron.engine.types import ForwardJob
from neuron.pb.neuron.v1 import axon_pb2 as pb

NETUID = 1
FORWARD = "/neuron.v1.Axon/Forward"
STAKES = {"validator": 100.0, "high": 50.0, "denied": 40.0, "low": 3.0, "poor": 2.0, "miner": 0.0, "latecomer": 0.0}
UNREGISTERED = ("stranger", "impostor")


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """(chain, wallets): registered hotkeys staked as STAKES (permit for stake >= 1), two unregistered."""
    root = tmp_path_factory.mktemp("admission")
    chain = LocalChain(root / "chain.db")
    chain.create_subnet(NETUID)
    wallets = {name: make_wallet(root / "wallets", name) for name in [*STAKES, *UNREGISTERED]}
    for name, stake in STAKES.items():
        chain.register(NETUID, wallets[name])
        if stake:
            chain.add_stake(NETUID, wallets[name].hotkey.ss58_address, stake)
    permits = {n.hotkey for n in chain.metagraph(NETUID).neurons if n.validator_permit}
    assert permits == {wallets[n].hotkey.ss58_address for n, s in STAKES.items() if s >= 1.0}
    return chain, wallets


@pytest.fixture(scope="module")
async def dendrites(net):
    """A dendrite signing with each wallet's hotkey."""
    _, wallets = net
    ds = {name: Dendrite(w.hotkey) for name, w in wallets.items()}
    yield ds
    for d in ds.values():
        await d.close()


@contextlib.asynccontextmanager
async def serving(lm, chain, keypair, **overrides):
    """A miner's axon on port 0, auth on, admitting from the local chain's metagraph."""
    metagraph = MetagraphCache(chain, NETUID)
    await metagraph.refresh()
    axon = make_axon(lm, miner_config(**{"auth.required": True, **overrides}), keypair=keypair, metagraph=metagraph)
    port = await start_miner(axon)
    try:
        yield axon, f"127.0.0.1:{port}", metagraph
    finally:
        await stop_miner(axon)


def forward_request(first_token: int = 5) -> pb.ForwardRequest:
    return pb.ForwardRequest(input_ids=wire.to_pb(torch.tensor([[first_token, 6, 7, 8]])), topk=2)


def work(axon) -> tuple[int, int]:
    stats = axon.engine.stats()
    return stats.forward_rows, stats.forward_batches


async def raw_call(address: str, body: bytes, metadata) -> tuple[grpc.StatusCode, str]:
    """Send exact bytes and metadata, as an attacker on the wire could."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await channel.unary_unary(FORWARD)(body, metadata=metadata, timeout=10)
            return grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""


async def test_a_validator_is_served_and_every_answer_is_signed(tiny, net, dendrites):
    chain, wallets = net
    miner = wallets["miner"].hotkey
    async with serving(tiny, chain, miner) as (axon, address, _):
        d, target = dendrites["validator"], Target(address, miner.ss58_address)
        forward = await d.call(target, "Forward", forward_request(), 10)
        assert forward.ok and forward.signed, forward.message
        assert work(axon) == (1, 1)
        generate = await d.call(target, "Generate", pb.GenerateRequest(prompt_text="hi", max_new_tokens=3), 30)
        assert generate.ok and generate.signed and len(generate.response.token_ids) >= 1, generate.message
        stream = await d.stream_all(target, pb.GenerateRequest(prompt_text="hi", max_new_tokens=3), 30)
        assert stream.ok and stream.signed and len(stream.response) >= 1, stream.message
        assert axon.guard.admission.refused == 0


@pytest.mark.parametrize("caller, overrides, code, reason", [
    ("stranger", {}, grpc.StatusCode.PERMISSION_DENIED, "not registered"),
    ("miner", {}, grpc.StatusCode.PERMISSION_DENIED, "no validator permit"),  # registered, no permit
    ("poor", {"auth.min_stake": 5.0}, grpc.StatusCode.PERMISSION_DENIED, "below the minimum"),  # has a permit
    ("denied", {"auth.deny_hotkeys": "DENIED"}, grpc.StatusCode.PERMISSION_DENIED, "deny list"),
])
async def test_a_refused_caller_gets_its_status_and_no_model_work(tiny, net, dendrites, caller, overrides, code,
                                                                  reason):
    chain, wallets = net
    miner = wallets["miner"].hotkey
    overrides = {k: wallets["denied"].hotkey.ss58_address if v == "DENIED" else v for k, v in overrides.items()}
    async with serving(tiny, chain, miner, **overrides) as (axon, address, _):
        target = Target(address, miner.ss58_address)
        refused = await dendrites[caller].call(target, "Forward", forward_request(), 10)
        assert refused.code == code and reason in refused.message, (refused.code, refused.message)
        assert work(axon) == (0, 0) and axon.guard.admission.refused == 1
        served = await dendrites["validator"].call(target, "Forward", forward_request(), 10)
        assert served.ok, served.message  # the same axon serves a validator: the refusal was about the caller
        assert work(axon) == (1, 1)


async def test_the_rate_limit_answers_resource_exhausted_before_the_model(tiny, net, dendrites):
    chain, wallets = net
    miner = wallets["miner"].hotkey
    async with serving(tiny, chain, miner, **{"auth.rate_per_s": 0.0, "auth.burst": 2}) as (axon, address, _):
        d, target = dendrites["validator"], Target(address, miner.ss58_address)
        results = [await d.call(target, "Forward", forward_request(), 10) for _ in range(3)]
        assert [r.code for r in results] == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert "rate limit" in results[2].message
        assert work(axon) == (2, 2) and axon.guard.admission.refused == 1
        other = await dendrites["high"].call(target, "Forward", forward_request(), 10)
        assert other.ok, other.message  # the limit is per hotkey


async def test_one_caller_cannot_take_the_whole_queue(tiny, net, dendrites):
    """Calls a caller has in flight (hung here, as streams it never reads would be) count against its share:
    past it, the caller is refused at once while another caller is still admitted; the share comes back
    as its calls end."""
    chain, wallets = net
    miner = wallets["miner"].hotkey
    hangs = HangsOn(tiny.model, poison=7)
    lm = dataclasses.replace(tiny, model=hangs)
    async with serving(lm, chain, miner, **{"auth.max_in_flight": 2}) as (axon, address, _):
        d, target = dendrites["validator"], Target(address, miner.ss58_address)
        in_flight = axon.guard.admission._in_flight
        mine, theirs = wallets["validator"].hotkey.ss58_address, wallets["high"].hotkey.ss58_address
        held = [asyncio.create_task(d.call(target, "Forward", forward_request(first_token=7), 30)) for _ in range(2)]
        await until(lambda: in_flight[mine] == 2, "two calls in flight")
        refused = await d.call(target, "Forward", forward_request(), 10)
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--auth.max_in_flight" in refused.message
        other = asyncio.create_task(dendrites["high"].call(target, "Forward", forward_request(), 30))
        await until(lambda: in_flight[theirs] == 1, "the other caller admitted")  # the share is per hotkey
        hangs.release.set()
        assert all(r.ok for r in await asyncio.gather(*held, other))
        assert not in_flight
        again = await d.call(target, "Forward", forward_request(), 10)
        assert again.ok, again.message


def signed(keypair, body: bytes, receiver: str, nonce_ns: int | None = None) -> list[tuple[str, str]]:
    headers = http_auth.sign(keypair, method=auth.REQUEST, path=FORWARD, body=body, receiver_ss58=receiver,
                             nonce_ns=nonce_ns)
    return [(k.lower(), v) for k, v in headers.items()]


@pytest.mark.parametrize("attack, reason", [
    ("replayed", "ReplayedRequest"),
    ("tampered body", "BadSignature"),
    ("addressed to another hotkey", "WrongReceiver"),
    ("stale nonce", "StaleRequest"),
    ("wrong signature", "BadSignature"),
    ("missing metadata", "not signed"),
])
async def test_a_bad_signature_is_unauthenticated_and_costs_no_model_work(tiny, net, attack, reason):
    chain, wallets = net
    miner, validator = wallets["miner"].hotkey, wallets["validator"].hotkey
    body, other_body = forward_request(5).SerializeToString(), forward_request(9).SerializeToString()
    async with serving(tiny, chain, miner) as (axon, address, _):
        expected_work = (0, 0)
        meta = signed(validator, body, miner.ss58_address)
        if attack == "replayed":
            assert await raw_call(address, body, meta) == (grpc.StatusCode.OK, "")
            expected_work = (1, 1)
        elif attack == "tampered body":
            body = other_body
        elif attack == "addressed to another hotkey":
            meta = signed(validator, body, wallets["high"].hotkey.ss58_address)
        elif attack == "stale nonce":
            meta = signed(validator, body, miner.ss58_address, nonce_ns=time.time_ns() - 60 * 10**9)
        elif attack == "wrong signature":  # the impostor signs, and claims the validator's hotkey
            meta = [(k, validator.ss58_address if k == auth.HOTKEY_KEY else v)
                    for k, v in signed(wallets["impostor"].hotkey, body, miner.ss58_address)]
        elif attack == "missing metadata":
            meta = []
        code, message = await raw_call(address, body, meta)
        assert code == grpc.StatusCode.UNAUTHENTICATED and reason in message, (code, message)
        assert work(axon) == expected_work
        assert axon.guard.admission.refused == (1 if attack == "replayed" else 0)


async def test_stake_and_permits_are_read_from_the_chain_on_refresh(tiny, net, dendrites):
    chain, wallets = net
    miner, late = wallets["miner"].hotkey, wallets["latecomer"].hotkey
    async with serving(tiny, chain, miner) as (axon, address, metagraph):
        target = Target(address, miner.ss58_address)
        before = await dendrites["latecomer"].call(target, "Forward", forward_request(), 10)
        assert before.code == grpc.StatusCode.PERMISSION_DENIED
        chain.add_stake(NETUID, late.ss58_address, 10.0)
        try:
            await metagraph.refresh()
            after = await dendrites["latecomer"].call(target, "Forward", forward_request(), 10)
            assert after.ok and after.signed, after.message
        finally:
            chain.add_stake(NETUID, late.ss58_address, -10.0)


async def test_the_dendrite_catches_an_answer_signed_by_someone_else(tiny, net, dendrites):
    chain, wallets = net
    miner, impostor = wallets["miner"].hotkey, wallets["impostor"].hotkey
    # An impostor serves at the address the validator believes is the miner's, and signs with its own key.
    async with serving(tiny, chain, impostor, **{"auth.required": False}) as (axon, address, _):
        d = dendrites["validator"]
        expected = Target(address, miner.ss58_address)
        for result in (await d.call(expected, "Forward", forward_request(), 10),
                       await d.stream_all(expected, pb.GenerateRequest(prompt_text="hi", max_new_tokens=2), 30)):
            assert not result.ok and result.code == grpc.StatusCode.DATA_LOSS and not result.signed
            assert f"signed by {impostor.ss58_address[:8]}" in result.message, result.message
        honest = await d.call(Target(address, impostor.ss58_address), "Forward", forward_request(), 10)
        assert honest.ok and honest.signed, honest.message  # the same answer is fine from whom it claims to be


async def test_the_dendrite_catches_an_unsigned_answer(tiny, net, dendrites):
    chain, wallets = net
    miner = wallets["miner"].hotkey
    async with serving(tiny, chain, None, **{"auth.required": False}) as (axon, address, _):
        d = dendrites["validator"]
        result = await d.call(Target(address, miner.ss58_address), "Forward", forward_request(), 10)
        assert not result.ok and result.code == grpc.StatusCode.DATA_LOSS and "not signed" in result.message
        unchecked = await d.call(Target(address), "Forward", forward_request(), 10)
        assert unchecked.ok and not unchecked.signed  # no hotkey expected, nothing to check
        anonymous = Dendrite()  # signs nothing, so it cannot check what comes back
        try:
            stream = await anonymous.stream_all(Target(address, miner.ss58_address),
                                                pb.GenerateRequest(prompt_text="hi", max_new_tokens=2), 30)
            assert stream.ok and not stream.signed
        finally:
            await anonymous.close()


class Gate(torch.nn.Module):
    """The real model behind a gate: records the first token of each batch, then waits until opened."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.entered, self.opened = threading.Event(), threading.Event()
        self.seen: list[int] = []

    def forward(self, input_ids, **kwargs):
        self.seen.append(int(input_ids[0, 0]))
        self.entered.set()
        self.opened.wait(30)
        return self.inner(input_ids=input_ids, **kwargs)


async def until(condition, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_queued_work_runs_in_stake_order_through_the_axon(tiny, net, dendrites):
    chain, wallets = net
    miner = wallets["miner"].hotkey
    gate = Gate(tiny.model)
    gated = dataclasses.replace(tiny, model=gate)
    one_per_batch = {"batching.max_batch_tokens": 4, "batching.max_wait_ms": 0.0}
    async with serving(gated, chain, miner, **one_per_batch) as (axon, address, _):
        target = Target(address, miner.ss58_address)

        def ask(who, token):
            return asyncio.ensure_future(dendrites[who].call(target, "Forward", forward_request(token), 30))

        try:
            calls = [ask("validator", 10)]  # occupies the model
            await until(gate.entered.is_set, "the first batch to reach the model")
            calls.append(ask("low", 20))  # stake 3, queued first
            await until(lambda: axon.engine.stats().queued == 1, "the low-stake request to queue")
            calls.append(ask("high", 30))  # stake 50, queued second
            await until(lambda: axon.engine.stats().queued == 2, "the high-stake request to queue")
        finally:
            gate.opened.set()
        results = await asyncio.gather(*calls)
        assert all(r.ok for r in results), [r.message for r in results]
        assert gate.seen == [10, 30, 20]


async def test_the_engine_runs_lower_priority_numbers_first(tiny):
    gate = Gate(tiny.model)
    gate.opened.set()
    engine = HFEngine(dataclasses.replace(tiny, model=gate), BatchingConfig(max_batch_tokens=4, max_wait_ms=0.0), 64)
    jobs = {token: ForwardJob(torch.tensor([[token, 1, 2, 3]]), None, 1) for token in (11, 12, 13, 14)}
    priorities = {11: -2.0, 12: -50.0, 13: 0.0, 14: -50.0}  # -stake; ties keep arrival order
    tasks = [asyncio.ensure_future(engine.forward(jobs[t], priority=priorities[t])) for t in jobs]
    await until(lambda: engine.stats().queued == 4, "all four to queue")  # queued before the engine starts
    await engine.start()
    try:
        await asyncio.gather(*tasks)
    finally:
        await engine.stop()
    assert gate.seen == [12, 14, 11, 13]
