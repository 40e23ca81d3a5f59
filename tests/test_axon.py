"""A real grpc.aio server on port 0 serving the real models; every RPC and every refusal."""

import asyncio
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import make_axon, miner_config, start_miner, stop_miner
from neuron import protocol, wire
from neuron.dendrite import Dendrite, Target
from neuron.engine.types import ForwardJob
from neuron.errors import BadResponse, Unavailable
from neuron.model import forward_logprobs, forward_topk
from neuron.pb.neuron.v1 import axon_pb2 as pb


@pytest.fixture(scope="module")
async def served(lm):
    """(lm, axon, dendrite, target) for each model; the server lives for the module."""
    axon = make_axon(lm, miner_config(**{"limits.max_seq_len": 64, "limits.max_batch": 4}))
    port = await start_miner(axon)
    dendrite = Dendrite()
    yield lm, axon, dendrite, Target(f"127.0.0.1:{port}")
    await dendrite.close()
    await stop_miner(axon)


def ids_of(lm, text):
    return lm.tokenizer(text).input_ids


async def test_info_describes_the_model_and_limits(served):
    lm, _, d, t = served
    r = await d.call(t, "Info", pb.InfoRequest(), 5)
    assert r.ok, r.message
    info = r.response
    assert info.vocab_size == lm.vocab_size and info.weights_fingerprint == lm.weights_fingerprint
    assert info.protocol_version == 2 and info.limits.max_seq_len == 64 and info.dtype == "float32"


async def test_forward_through_the_axon_equals_the_direct_computation(served):
    lm, _, d, t = served
    ids = torch.tensor([ids_of(lm, "The quick brown fox jumps over"), ids_of(lm, "the lazy dog, said the cat.")][:1])
    req = pb.ForwardRequest(input_ids=wire.to_pb(ids), topk=7, positions=[0, 2, ids.shape[1] - 1], want_hidden=True)
    r = await d.call(t, "Forward", req, 10)
    assert r.ok, r.message
    direct = forward_topk(lm, ids, [0, 2, ids.shape[1] - 1], 7, want_hidden=True)
    got_ids = wire.from_pb(r.response.topk_ids, name="ids")
    assert list(r.response.positions) == [0, 2, ids.shape[1] - 1]
    assert torch.equal(got_ids, direct.topk_ids)
    assert torch.equal(wire.from_pb(r.response.topk_logprobs, name="lp"), direct.topk_logprobs)
    assert torch.equal(wire.from_pb(r.response.rest_mass, name="rest"), direct.rest_mass)
    assert torch.equal(wire.from_pb(r.response.hidden, name="hidden"), direct.hidden)


async def test_forward_defaults_to_every_position(served):
    lm, _, d, t = served
    ids = torch.tensor([ids_of(lm, "every position please")] * 2)
    r = await d.call(t, "Forward", pb.ForwardRequest(input_ids=wire.to_pb(ids), topk=3), 10)
    assert r.ok, r.message
    assert list(r.response.topk_ids.shape) == [2, ids.shape[1], 3] and not r.response.HasField("hidden")


async def test_token_logprobs_through_the_axon_and_decode_forward(served):
    """echo + logprobs: every prompt token's log-probability given its prefix, decoded by the validator's codec."""
    lm, _, d, t = served
    rows = [ids_of(lm, "The quick brown fox jumps over"), ids_of(lm, "the lazy dog, said the cat.")]
    S = min(map(len, rows))
    ids = torch.tensor([r[:S] for r in rows])
    req = protocol.forward_request(ids, topk=4, want_token_logprobs=True)
    assert list(req.positions) == list(range(S - 1)) and req.want_token_logprobs
    r = await d.call(t, "Forward", req, 10)
    assert r.ok, r.message
    answer = protocol.decode_forward(r.response, 2, list(req.positions), 4, want_token_logprobs=True)
    full, _ = forward_logprobs(lm, ids)
    want = full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert answer.token_logprobs.shape == (2, S - 1) and torch.allclose(answer.token_logprobs, want, atol=1e-5)
    assert protocol.decode_forward(r.response, 2, list(req.positions), 4).token_logprobs is None  # not asked: ignored
    # Without the flag the field stays empty, as from a miner that predates it: unusable to a caller that wants it.
    plain = await d.call(t, "Forward", protocol.forward_request(ids[0].tolist(), topk=4, positions=[0, 1]), 10)
    assert plain.ok and not plain.response.HasField("token_logprobs")
    with pytest.raises(BadResponse, match="token_logprobs missing"):
        protocol.decode_forward(plain.response, 1, [0, 1], 4, want_token_logprobs=True)
    wrong = pb.ForwardResponse()
    wrong.CopyFrom(r.response)
    wrong.token_logprobs.CopyFrom(wire.to_pb(answer.token_logprobs[:1]))
    with pytest.raises(BadResponse, match="token_logprobs"):
        protocol.decode_forward(wrong, 2, list(req.positions), 4, want_token_logprobs=True)


def test_forward_request_needs_two_tokens_for_token_logprobs():
    with pytest.raises(ValueError, match="two tokens"):
        protocol.forward_request([5], topk=1, want_token_logprobs=True)
    req = protocol.forward_request([5, 6, 7], topk=2)
    assert list(req.input_ids.shape) == [1, 3] and list(req.positions) == [] and not req.want_token_logprobs


async def test_greedy_generate_equals_model_generate_and_reports_raw_logprobs(served):
    lm, _, d, t = served
    prompt = ids_of(lm, "The capital of France is")
    ids = torch.tensor([prompt])
    ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                            pad_token_id=lm.tokenizer.pad_token_id)[0, len(prompt):].tolist()
    r = await d.call(t, "Generate", pb.GenerateRequest(prompt_text="The capital of France is", max_new_tokens=10), 30)
    assert r.ok, r.message
    got = list(r.response.token_ids)
    assert got == ref[: len(got)] and len(got) >= 1  # only new tokens: the prompt is never echoed
    assert r.response.text == lm.tokenizer.decode(got, skip_special_tokens=True)
    lp, _ = forward_logprobs(lm, torch.tensor([prompt + got]))
    expected = lp[0, len(prompt) - 1:-1].gather(-1, torch.tensor(got)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(list(r.response.logprobs)), expected, atol=1e-4)
    assert r.response.timings.prompt_tokens == len(prompt)


async def test_generate_with_sampling_stop_strings_and_alternatives(served):
    lm, _, d, t = served
    req = pb.GenerateRequest(prompt_ids=ids_of(lm, "Once upon a time"), max_new_tokens=12, temperature=0.8,
                             top_k=40, top_p=0.95, seed=11, repetition_penalty=1.1, logprobs_topn=3)
    a, b = await asyncio.gather(d.call(t, "Generate", req, 30), d.call(t, "Generate", req, 30))
    assert a.ok and b.ok, (a.message, b.message)
    assert list(a.response.token_ids) == list(b.response.token_ids)  # same seed, same tokens, batched or not
    assert all(len(top.ids) == 3 for top in a.response.top)
    text = a.response.text
    if len(text) > 3:
        stop = text[2:4]
        req.stop.append(stop)
        c = await d.call(t, "Generate", req, 30)
        assert c.response.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE and stop not in c.response.text


async def test_stream_yields_the_unary_tokens(served):
    lm, _, d, t = served
    req = pb.GenerateRequest(prompt_text="Streams of", max_new_tokens=8)
    unary = await d.call(t, "Generate", req, 30)
    chunks = [c async for c in d.stream(t, req, 30)]
    assert [c.token_id for c in chunks] == list(unary.response.token_ids)
    assert "".join(c.text for c in chunks) == unary.response.text
    assert chunks[-1].finish_reason == unary.response.finish_reason != pb.FINISH_REASON_UNSPECIFIED


async def test_cancelling_a_stream_stops_the_generation(served):
    lm, axon, d, t = served
    limit = 64 - len(ids_of(lm, "Cancel me"))
    req = pb.GenerateRequest(prompt_text="Cancel me", max_new_tokens=limit)
    got = []
    stream = d.stream(t, req, 30)
    async for c in stream:
        got.append(c)
        if len(got) == 2:
            break
    await stream.aclose()
    for _ in range(100):  # the engine drops the sequence between steps
        if axon.engine.stats().running == 0 and axon.engine.stats().queued == 0:
            break
        await asyncio.sleep(0.02)
    assert axon.engine.stats().running == 0, "the cancelled generation is still decoding"
    assert axon.engine.stats().kv_bytes_reserved == 0
    r = await d.call(t, "Generate", pb.GenerateRequest(prompt_text="after", max_new_tokens=2), 30)
    assert r.ok


def bad_forward(lm):
    ok = torch.tensor([ids_of(lm, "hello there")])
    return {
        "missing input_ids": pb.ForwardRequest(topk=3),
        "ids outside the vocabulary": pb.ForwardRequest(input_ids=wire.to_pb(ok + lm.vocab_size), topk=3),
        "negative ids": pb.ForwardRequest(input_ids=wire.to_pb(ok * 0 - 1), topk=3),
        "batch over the limit": pb.ForwardRequest(input_ids=wire.to_pb(ok.repeat(5, 1)), topk=3),
        "sequence over the limit": pb.ForwardRequest(input_ids=wire.to_pb(torch.ones(1, 65, dtype=torch.long)), topk=3),
        "empty sequence": pb.ForwardRequest(input_ids=pb.Tensor(dtype="int64", shape=[1, 0]), topk=3),
        "topk zero": pb.ForwardRequest(input_ids=wire.to_pb(ok), topk=0),
        "topk over the limit": pb.ForwardRequest(input_ids=wire.to_pb(ok), topk=65),
        "position outside": pb.ForwardRequest(input_ids=wire.to_pb(ok), topk=3, positions=[ok.shape[1]]),
        "float ids": pb.ForwardRequest(input_ids=wire.to_pb(ok.float()), topk=3),
        "1-D ids": pb.ForwardRequest(input_ids=wire.to_pb(ok[0]), topk=3),
        "bytes do not match the shape": pb.ForwardRequest(input_ids=pb.Tensor(dtype="int64", shape=[1, 4], data=b"\0" * 8), topk=3),
        "absurd shape": pb.ForwardRequest(input_ids=pb.Tensor(dtype="int64", shape=[1 << 30, 1 << 30], data=b""), topk=3),
        "token logprobs at the last position": pb.ForwardRequest(input_ids=wire.to_pb(ok), topk=3, want_token_logprobs=True,
                                                                 positions=[0, ok.shape[1] - 1]),
        "token logprobs at every position": pb.ForwardRequest(input_ids=wire.to_pb(ok), topk=3, want_token_logprobs=True),
        "token logprobs of one token": pb.ForwardRequest(input_ids=wire.to_pb(ok[:, :1]), topk=3, want_token_logprobs=True,
                                                         positions=[0]),
    }


def bad_generate(lm):
    return {
        "no prompt": pb.GenerateRequest(max_new_tokens=4),
        "both prompts": pb.GenerateRequest(prompt_text="a", prompt_ids=[1], max_new_tokens=4),
        "prompt id outside the vocabulary": pb.GenerateRequest(prompt_ids=[lm.vocab_size], max_new_tokens=4),
        "zero new tokens": pb.GenerateRequest(prompt_text="a", max_new_tokens=0),
        "too many new tokens": pb.GenerateRequest(prompt_text="a", max_new_tokens=257),
        "prompt plus new tokens too long": pb.GenerateRequest(prompt_ids=[5] * 60, max_new_tokens=10),
        "negative temperature": pb.GenerateRequest(prompt_text="a", max_new_tokens=4, temperature=-1),
        "nan top_p": pb.GenerateRequest(prompt_text="a", max_new_tokens=4, top_p=float("nan")),
        "top_p above one": pb.GenerateRequest(prompt_text="a", max_new_tokens=4, top_p=1.5),
        "too many alternatives": pb.GenerateRequest(prompt_text="a", max_new_tokens=4, logprobs_topn=21),
        "empty stop string": pb.GenerateRequest(prompt_text="a", max_new_tokens=4, stop=[""]),
        "too many stop strings": pb.GenerateRequest(prompt_text="a", max_new_tokens=4, stop=["x"] * 9),
        "huge text prompt": pb.GenerateRequest(prompt_text="a" * 20000, max_new_tokens=4),
        "temperature below the minimum": pb.GenerateRequest(prompt_text="a", max_new_tokens=4, temperature=1e-38),
        "penalty below the minimum": pb.GenerateRequest(prompt_text="a", max_new_tokens=4, repetition_penalty=1e-39),
        "unknown sampler": pb.GenerateRequest(prompt_text="a", max_new_tokens=4, sampler=7),
        "seeded sampler without a seed": pb.GenerateRequest(prompt_text="a", max_new_tokens=4, sampler=pb.SAMPLER_GUMBEL_V1),
        "seeded sampler with a penalty": pb.GenerateRequest(prompt_text="a", max_new_tokens=4, seed=1, repetition_penalty=1.2,
                                                            sampler=pb.SAMPLER_GUMBEL_V1),
        "seed out of range": pb.GenerateRequest(prompt_text="a", max_new_tokens=4, seed=(1 << 64) - 1),
        "too many prompt ids": pb.GenerateRequest(prompt_ids=[1] * 100000, max_new_tokens=4),
    }


async def test_every_bad_input_gets_invalid_argument_and_the_server_keeps_serving(served):
    lm, axon, d, t = served
    good = pb.ForwardRequest(input_ids=wire.to_pb(torch.tensor([ids_of(lm, "good")])), topk=2)
    cases = [("Forward", k, v) for k, v in bad_forward(lm).items()] + [("Generate", k, v) for k, v in bad_generate(lm).items()]
    rows_before = axon.engine.stats().forward_rows
    for method, what, req in cases:
        r = await d.call(t, method, req, 10)
        assert r.code == grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {r.code} {r.message}"
        assert r.message and "internal" not in r.message.lower(), what
        assert (await d.call(t, "Forward", good, 10)).ok, f"not serving after {what}"
    assert axon.engine.stats().forward_rows == rows_before + len(cases)  # only the good requests reached the model


async def test_garbage_bytes_and_oversized_messages_are_refused(served):
    lm, _, d, t = served
    stub = d.channel(t.address).unary_unary("/neuron.v1.Axon/Forward")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(b"\xff\xff\xff\xff", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(b"\0" * (5 * 1024 * 1024), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_health_and_reflection_are_served(served):
    _, _, d, t = served
    health = health_pb2_grpc.HealthStub(d.channel(t.address))
    resp = await health.Check(health_pb2.HealthCheckRequest(service="neuron.v1.Axon"), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(d.channel(t.address))
    names = []
    async for r in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        names += [s.name for s in r.list_services_response.service]
    assert "neuron.v1.Axon" in names and "grpc.health.v1.Health" in names


async def test_a_full_queue_answers_resource_exhausted_at_once(tiny):
    axon = make_axon(tiny, miner_config(**{"batching.queue_size": 2, "batching.max_generate_batch": 1}))
    port = await start_miner(axon)
    d = Dendrite()
    t = Target(f"127.0.0.1:{port}")
    try:
        long = pb.GenerateRequest(prompt_text="x", max_new_tokens=200)
        results = await asyncio.gather(*(d.call(t, "Generate", long, 60) for _ in range(8)))
        codes = [r.code for r in results]
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
        exhausted = [r for r in results if r.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert all(r.latency_s < 1.0 for r in exhausted)
    finally:
        await d.close()
        await stop_miner(axon)


async def test_work_whose_deadline_passed_in_the_queue_is_not_started(tiny):
    axon = make_axon(tiny, miner_config(**{"batching.max_generate_batch": 1}))
    port = await start_miner(axon)
    d = Dendrite()
    t = Target(f"127.0.0.1:{port}")
    try:
        busy = asyncio.ensure_future(d.call(t, "Generate", pb.GenerateRequest(prompt_text="x", max_new_tokens=200), 60))
        await asyncio.sleep(0.05)
        rows = axon.engine.stats().forward_rows
        ids = torch.tensor([ids_of(tiny, "late")])
        # Forwards run between decoding steps, so fill the step with a queued generation instead.
        late = await d.call(t, "Generate", pb.GenerateRequest(prompt_text="late", max_new_tokens=2), 0.001)
        assert late.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await busy).ok
        assert axon.engine.stats().forward_rows == rows
        ok = await d.call(t, "Forward", pb.ForwardRequest(input_ids=wire.to_pb(ids), topk=1), 10)
        assert ok.ok
    finally:
        await d.close()
        await stop_miner(axon)


async def test_stop_refuses_new_calls_and_lets_in_flight_ones_finish(tiny):
    axon = make_axon(tiny, miner_config())
    assert axon.down == "starting"  # what the readiness probe answers until the axon serves
    port = await start_miner(axon)
    assert axon.down is None
    d = Dendrite()
    t = Target(f"127.0.0.1:{port}")
    in_flight = asyncio.ensure_future(d.call(t, "Generate", pb.GenerateRequest(prompt_text="x", max_new_tokens=50), 30))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await stop_miner(axon, grace=5)
    assert axon.down == "shutting down"
    assert (await in_flight).ok
    assert time.monotonic() - started < 5
    after = await d.call(t, "Info", pb.InfoRequest(), 2)
    assert after.code == grpc.StatusCode.UNAVAILABLE
    await d.close()


async def test_the_axon_only_serves_its_engine_whose_owner_stops_it(tiny):
    axon = make_axon(tiny, miner_config())
    job = ForwardJob(torch.tensor([[5, 6, 7]]), None, 4)
    port = await start_miner(axon)
    d = Dendrite()
    try:
        assert (await d.call(Target(f"127.0.0.1:{port}"), "Info", pb.InfoRequest(), 5)).ok
    finally:
        await d.close()
    await axon.stop(grace=0)
    assert (await axon.engine.forward(job)).topk_ids.shape == (1, 3, 4)  # the engine outlives the server
    await axon.engine.stop(0)
    with pytest.raises(Unavailable):
        await axon.engine.forward(job)
