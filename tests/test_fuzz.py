"""Property-based tests: random requests, valid and not, for every RPC against a real axon on the tiny model.

Every answer is OK or a documented refusal with a message, never UNKNOWN or INTERNAL, and the miner
still serves a good request afterwards. Hypothesis drives pytest-asyncio's loop (its documented
support for async tests); examples are derandomised so CI runs the same ones every time.
"""

from __future__ import annotations

import math
import struct

import grpc
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings

from conftest import make_axon, make_wallet, miner_config, start_miner, stop_miner
from neuron import auth, wire
from neuron.pb.neuron.v1 import axon_pb2 as pb

AXON = "/neuron.v1.Axon/"
F32_MIN = float(np.float32(0.01))  # the documented minimum as it travels (float32): accepted
LIMITS = {"limits.max_seq_len": 48, "limits.max_new_tokens": 8, "limits.max_batch": 3, "limits.max_topk": 8,
          "limits.max_logprobs_topn": 4, "limits.max_stop_sequences": 3, "limits.max_stop_chars": 8,
          "limits.max_prompt_chars": 256, "batching.max_wait_ms": 0.0}
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
AUTH_REFUSALS = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
async def dev(tiny):
    """An auth-off miner (a dev miner), and a channel to it."""
    axon = make_axon(tiny, miner_config(**LIMITS))
    port = await start_miner(axon)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield axon, channel
    await channel.close()
    await stop_miner(axon)


@pytest.fixture(scope="module")
async def guarded(tiny, tmp_path_factory):
    """An auth-on miner, its hotkey, a validator's keypair it admits, and a channel to it."""
    wallets = tmp_path_factory.mktemp("wallets")
    miner, validator = make_wallet(wallets, "miner").hotkey, make_wallet(wallets, "validator").hotkey
    config = miner_config(**LIMITS, **{"auth.required": True, "auth.allow_hotkeys": (validator.ss58_address,),
                                       "auth.rate_per_s": 1000.0, "auth.burst": 1000})
    axon = make_axon(tiny, config, keypair=miner)
    port = await start_miner(axon)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield axon, channel, miner.ss58_address, validator
    await channel.close()
    await stop_miner(axon)


async def answer(channel, method: str, body: bytes, metadata=(), timeout: float = 20.0) -> tuple[grpc.StatusCode, str]:
    """The status and message of one call; a stream is read to its end."""
    body = bytes(body)
    try:
        if method == "GenerateStream":
            call = channel.unary_stream(AXON + method)(body, timeout=timeout, metadata=metadata)
            async for _ in call:
                pass
        else:
            await channel.unary_unary(AXON + method)(body, timeout=timeout, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def assert_documented(code: grpc.StatusCode, message: str, allowed=REFUSALS) -> None:
    event(code.name)  # --hypothesis-show-statistics shows how often each status came back
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), f"{code.name}: {message}"
    assert code == grpc.StatusCode.OK or code in allowed, f"{code.name}: {message}"
    assert code == grpc.StatusCode.OK or message.strip(), f"{code.name} without a message"


async def still_serves(channel, vocab: int, metadata=()) -> None:
    ids = torch.tensor([[1, 2, min(3, vocab - 1)]])
    fwd = pb.ForwardRequest(input_ids=wire.to_pb(ids), topk=2).SerializeToString()
    gen = pb.GenerateRequest(prompt_text="still here", max_new_tokens=2).SerializeToString()
    assert await answer(channel, "Forward", fwd, metadata) == (grpc.StatusCode.OK, "")
    assert await answer(channel, "Generate", gen, metadata) == (grpc.StatusCode.OK, "")


# ---- strategies --------------------------------------------------------------------------------

class Body(bytes):
    """A request body whose repr stays short (Hypothesis prints every failing example)."""

    def __repr__(self) -> str:
        return f"Body({len(self)} bytes: {bytes(self[:48])!r}...)" if len(self) > 48 else f"Body({bytes(self)!r})"


uint32 = st.integers(0, 2**32 - 1)
small = st.integers(0, 70)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, 0.01, 1e-38, 1e-39, 1e-45, 0.5, 1.0, 100.0, 100.01, -0.0, -1.0])
texts = st.text(max_size=40) | st.sampled_from(["", "a", "\x00", "\ud7ff" * 3, "é" * 100, "The capital of"])


@st.composite
def tensors(draw, vocab: int = 512):
    """Mostly well-formed int64 id tensors of random shapes; sometimes wrong dtypes, shapes or bytes."""
    kind = draw(st.sampled_from(["ids", "ids", "ids", "dtype", "shape", "bytes", "huge"]))
    if kind == "huge":
        n = draw(st.sampled_from([5, 64, 10_000, 300_000]))
        return pb.Tensor(dtype="int64", shape=draw(st.sampled_from([[1] * n, [1, n], [n, n, n]])), data=b"")
    shape = draw(st.lists(st.integers(0, 50), min_size=0, max_size=5) if kind == "shape"
                 else st.tuples(st.integers(1, 4), st.integers(1, 50)).map(list))
    count = math.prod(shape) if shape else 0
    data = b""  # a shape of more elements than that has no bytes to match
    if count <= 200:
        values = draw(st.lists(st.integers(-3, vocab + 3) | st.integers(-2**63, 2**63 - 1), min_size=count,
                               max_size=count))
        data = struct.pack(f"<{count}q", *values)
    dtype = "int64"
    if kind == "dtype":
        dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "int32", "", "pickle"]) | st.text(max_size=8))
    if kind == "bytes":
        data = draw(st.binary(max_size=64))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def valid_forwards(draw) -> Body:
    rows, seq = draw(st.integers(1, 3)), draw(st.integers(1, 48))
    ids = draw(st.lists(st.integers(0, 511), min_size=rows * seq, max_size=rows * seq))
    # Token log-probabilities need listed positions, all before the last.
    tokens = seq >= 2 and draw(st.booleans())
    positions = (st.lists(st.integers(0, seq - 2), min_size=1, max_size=seq) if tokens
                 else st.lists(st.integers(0, seq - 1), max_size=seq))
    req = pb.ForwardRequest(input_ids=wire.to_pb(torch.tensor(ids).view(rows, seq)), topk=draw(st.integers(1, 8)),
                            positions=draw(positions), want_hidden=draw(st.booleans()), want_token_logprobs=tokens)
    return Body(req.SerializeToString())


@st.composite
def valid_generates(draw) -> Body:
    seeded = draw(st.booleans())
    req = pb.GenerateRequest(
        max_new_tokens=draw(st.integers(1, 8)), top_k=draw(st.integers(0, 40)),
        temperature=draw(st.sampled_from([0.0, 0.01, 1.0, 100.0]) | st.floats(F32_MIN, 100.0, width=32)),
        top_p=draw(st.floats(0.0, 1.0, width=32)), logprobs_topn=draw(st.integers(0, 4)),
        repetition_penalty=1.0 if seeded else draw(st.sampled_from([0.0, 1.0, 0.01, 100.0]) | st.floats(F32_MIN, 100.0, width=32)),
        stop=draw(st.lists(st.text(min_size=1, max_size=8), max_size=3)),
        sampler=pb.SAMPLER_GUMBEL_V1 if seeded else pb.SAMPLER_UNSPECIFIED)
    if seeded or draw(st.booleans()):
        req.seed = draw(st.integers(0, 2**63 - 1))
    if draw(st.booleans()):
        req.prompt_ids.extend(draw(st.lists(st.integers(0, 511), min_size=1, max_size=30)))
    else:
        req.prompt_text = draw(st.text(min_size=1, max_size=60).filter(str.strip) | st.sampled_from(["The capital of"]))
    return Body(req.SerializeToString())


@st.composite
def forward_requests(draw) -> bytes:
    req = pb.ForwardRequest(topk=draw(st.integers(0, 10) | uint32), want_hidden=draw(st.booleans()),
                            want_token_logprobs=draw(st.booleans()))
    if draw(st.integers(0, 9)):
        req.input_ids.CopyFrom(draw(tensors()))
    req.positions.extend(draw(st.lists(st.integers(0, 60) | uint32, max_size=8)))
    return Body(req.SerializeToString())


@st.composite
def generate_requests(draw) -> bytes:
    req = pb.GenerateRequest(max_new_tokens=draw(st.integers(0, 10) | uint32), top_k=draw(st.integers(0, 40) | uint32),
                             temperature=draw(floats), top_p=draw(floats), repetition_penalty=draw(floats),
                             logprobs_topn=draw(st.integers(0, 6) | uint32),
                             sampler=draw(st.sampled_from([0, 0, 1, 2]) | st.integers(-2**31, 2**31 - 1)))
    prompt = draw(st.sampled_from(["text", "ids", "ids", "both", "none", "many ids", "long text"]))
    if prompt in ("text", "both"):
        req.prompt_text = draw(texts)
    if prompt in ("ids", "both"):
        req.prompt_ids.extend(draw(st.lists(st.integers(0, 511) | st.integers(-2**63, 2**63 - 1), max_size=50)))
    if prompt == "many ids":
        req.prompt_ids.extend([7] * draw(st.sampled_from([49, 100, 70_000, 400_000])))
    if prompt == "long text":
        req.prompt_text = "ab" * draw(st.sampled_from([128, 129, 30_000]))
    if draw(st.booleans()):
        req.seed = draw(st.integers(0, 2**64 - 1))
    req.stop.extend(draw(st.lists(texts, max_size=4)) if draw(st.integers(0, 5)) else ["x"] * 100_000)
    return Body(req.SerializeToString())


def mutated(body: bytes, data) -> Body:
    """The body with random bytes flipped, cut or appended: mostly undecodable or strange messages."""
    how = data.draw(st.sampled_from(["flip", "cut", "append", "random"]))
    if how == "random" or not body:
        return Body(data.draw(st.binary(max_size=200)))
    if how == "flip":
        i = data.draw(st.integers(0, len(body) - 1))
        return Body(body[:i] + bytes([body[i] ^ data.draw(st.integers(1, 255))]) + body[i + 1:])
    if how == "cut":
        return Body(body[:data.draw(st.integers(0, len(body) - 1))])
    return Body(body + data.draw(st.binary(min_size=1, max_size=20)))


# ---- the properties ----------------------------------------------------------------------------

@FUZZ
@given(body=valid_forwards() | forward_requests(), garble=st.integers(0, 4), data=st.data())
async def test_forward_answers_ok_or_a_documented_refusal(dev, body, garble, data):
    _, channel = dev
    assert_documented(*await answer(channel, "Forward", mutated(body, data) if garble == 0 else body))


@FUZZ
@given(body=valid_generates() | generate_requests(), stream=st.booleans(), garble=st.integers(0, 4), data=st.data())
async def test_generate_answers_ok_or_a_documented_refusal(dev, body, stream, garble, data):
    _, channel = dev
    method = "GenerateStream" if stream else "Generate"
    assert_documented(*await answer(channel, method, mutated(body, data) if garble == 0 else body))


@settings(FUZZ, max_examples=100)
@given(forward=valid_forwards(), generate=valid_generates(), stream=st.booleans())
async def test_requests_within_the_limits_always_succeed(dev, forward, generate, stream):
    _, channel = dev
    assert await answer(channel, "Forward", forward) == (grpc.StatusCode.OK, "")
    assert await answer(channel, "GenerateStream" if stream else "Generate", generate) == (grpc.StatusCode.OK, "")


@settings(FUZZ, max_examples=100)
@given(body=st.binary(max_size=64) | st.sampled_from([b"", b"\x00" * 8000, b"\x0a\x05abc"]),
       method=st.sampled_from(["Info", "Forward", "Generate", "GenerateStream"]))
async def test_random_bytes_to_every_rpc_are_refused_cleanly(dev, body, method):
    _, channel = dev
    assert_documented(*await answer(channel, method, body))


async def test_the_dev_miner_still_serves_after_the_fuzzing(dev, tiny):
    axon, channel = dev
    await still_serves(channel, tiny.vocab_size)
    assert axon.engine.stats().running == 0


# Printable ASCII: other header values are refused by the gRPC client itself, before they travel.
auth_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60) | st.sampled_from(["", "0", "-1", "9" * 5000, "0x", "btauth/1", "sr25519"])


@settings(FUZZ, max_examples=100)
@given(method=st.sampled_from(["Info", "Forward", "Generate", "GenerateStream"]),
       tamper=st.dictionaries(st.sampled_from(auth.AUTH_KEYS), auth_values, max_size=4),
       signed=st.booleans(), body=valid_generates() | generate_requests())
async def test_random_auth_metadata_is_refused_cleanly(guarded, method, tamper, signed, body):
    """Signed headers with fields replaced by random values, or random headers alone, on an auth-on miner."""
    _, channel, miner, validator = guarded
    if method == "Forward":
        body = Body(pb.ForwardRequest(input_ids=wire.to_pb(torch.tensor([[1, 2, 3]])), topk=2).SerializeToString())
    headers = dict(auth.sign(validator, auth.REQUEST, AXON + method, body, miner)) if signed else {}
    headers.update(tamper)
    code, message = await answer(channel, method, body if method != "Info" else b"", tuple(headers.items()))
    assert_documented(code, message, REFUSALS | AUTH_REFUSALS)
    if not signed and tamper and method != "Info":
        assert code != grpc.StatusCode.OK


async def test_the_guarded_miner_still_serves_a_signed_request(guarded, tiny):
    axon, channel, miner, validator = guarded
    ids = torch.tensor([[1, 2, 3]])
    body = pb.ForwardRequest(input_ids=wire.to_pb(ids), topk=2).SerializeToString()
    meta = tuple(auth.sign(validator, auth.REQUEST, AXON + "Forward", body, miner))
    assert await answer(channel, "Forward", body, meta) == (grpc.StatusCode.OK, "")
    assert axon.engine.stats().running == 0
