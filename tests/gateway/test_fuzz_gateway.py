"""Property-based tests of the gateway's HTTP face: hostile bodies and headers, a real uvicorn server.

Every answer to /v1/completions and /v1/chat/completions is a 4xx in OpenAI's error shape, or 503
"no_miner" for a body that is valid (the chain has no miner, so none is standing); never a 500, never a
hang. The server runs on its own event loop in a thread (hypothesis drives a plain synchronous test);
examples are derandomised so CI runs the same ones every time.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading

import httpx
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, given, settings

from conftest import make_wallet
from neuron.chain.local import LocalChain
from neuron.config import ValidatorConfig, with_overrides
from neuron.gateway.app import Gateway, serve_gateway
from neuron.gateway.keys import KeyLimits, KeyStore
from neuron.validator.loop import Validator

ROUTES = ("/v1/completions", "/v1/chat/completions")
# NEURON_FUZZ_EXAMPLES=2000 NEURON_FUZZ_RANDOM=1 for a longer hunt with fresh examples.
EXAMPLES = int(os.environ.get("NEURON_FUZZ_EXAMPLES", 60))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("NEURON_FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_BODY = 64 * 1024


class GatewayThread(threading.Thread):
    """A gateway (auth on, one key) over a local chain with no miner, served on its own loop."""

    def __init__(self, tmp_path, lm):
        super().__init__(daemon=True)
        self.tmp_path, self.lm = tmp_path, lm
        self.ready = threading.Event()
        self.port, self.key, self.error = 0, "", None

    def run(self):
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by the fixture
            self.error = exc
            self.ready.set()

    async def _main(self):
        tmp = self.tmp_path
        chain = LocalChain(tmp / "chain.sqlite", block_time=0.05)
        chain.create_subnet(1, weights_rate_limit=1, min_validator_stake=1.0, max_validators=2)
        wallet = make_wallet(tmp / "w", "validator")
        chain.register(1, wallet)
        keys = tmp / "keys.json"
        config = with_overrides(ValidatorConfig(), **{
            "model.name": "tiny", "subtensor.netuid": 1, "state_path": str(tmp / "state.json"),
            "max_new_tokens": 8, "gateway.keys_path": str(keys), "gateway.max_body_bytes": MAX_BODY})
        v = Validator(config, chain, wallet, self.lm)
        gw = Gateway(config.gateway, v.pool, self.lm, "tiny", v.verify_users, deadline_s=10.0, mix=v.mix)
        self.key = KeyStore(keys).add("fuzz", KeyLimits(requests_per_minute=0, tokens_per_minute=0, max_concurrent=0))
        server, task, self.port = await serve_gateway(gw, "127.0.0.1", 0)
        self.stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.ready.set()
        await self.stop.wait()
        server.should_exit = True
        await task
        await gw.stop()
        await v.close()

    def close(self):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.join(timeout=10)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny):
    t = GatewayThread(tmp_path_factory.mktemp("fuzzgw"), tiny)
    t.start()
    assert t.ready.wait(60), "the gateway did not start"
    if t.error:
        raise t.error
    client = httpx.Client(base_url=f"http://127.0.0.1:{t.port}", timeout=10.0)
    yield t, client
    client.close()
    t.close()


def _ok(r: httpx.Response, valid: bool = False) -> None:
    """A refusal in OpenAI's shape: 4xx, or 503 no_miner for a valid body; never 500."""
    assert r.status_code != 500, r.text
    event(f"status {r.status_code}")
    if r.status_code == 503:
        assert r.json()["error"]["code"] == "no_miner", r.text
        return
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert not valid, (r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]


# ---- bodies --------------------------------------------------------------------------------------

NUMBERS = st.one_of(st.integers(), st.integers(min_value=-(10 ** 40), max_value=10 ** 40),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, -1, 1, 2 ** 63, 2 ** 64, 1e-300,
                                                                                      -0.0, 1e308]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=40),
                    st.text(max_size=2).map(lambda s: s * 3000))  # long strings
JSON = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=5),
                                                 st.dictionaries(st.text(max_size=12), c, max_size=5)), max_leaves=20)
HOSTILE = st.one_of(JSON, st.lists(st.integers(min_value=-5, max_value=10 ** 20), max_size=30),
                    st.lists(st.text(max_size=30), max_size=4))

COMPLETION_FIELDS = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logprobs", "echo",
                     "n", "stream", "stream_options", "presence_penalty", "frequency_penalty", "model")
CHAT_FIELDS = ("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
               "logprobs", "top_logprobs", "n", "stream", "model")
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot", ""])},
                                          optional={"content": HOSTILE}), max_size=4)


def _dumps(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()  # NaN and Infinity as bare words: not JSON, sent anyway


@st.composite
def openai_bodies(draw, chat: bool):
    """A body of the right shape with a few fields set to hostile values."""
    body = ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]} if chat
            else {"model": "tiny", "prompt": "The river", "max_tokens": 4})
    for name in draw(st.lists(st.sampled_from(CHAT_FIELDS if chat else COMPLETION_FIELDS), max_size=4, unique=True)):
        body[name] = draw(MESSAGES if name == "messages" else HOSTILE)
    return body


# Values at and just past each field's bounds, most of which pass validation: they reach the gateway's own checks.
FLOATS = st.one_of(st.floats(min_value=0, max_value=2), st.sampled_from([0.0, 5e-324, 1e-9, 0.009, 0.01, 1.0, 2.0]))
TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["\ud800", "\x00", "\n\n", "\ufeff", "\U0010ffff", " "]),
                 st.text(max_size=2).map(lambda s: s * 5000))
EDGES = {
    "prompt": st.one_of(TEXT, st.lists(TEXT, max_size=2), st.lists(st.integers(-1, 600), max_size=40),
                        st.lists(st.integers(0, 511), min_size=500, max_size=3000)),
    "max_tokens": st.one_of(st.none(), st.integers(-1, 70), st.sampled_from([2 ** 31, 2 ** 63, 10 ** 30])),
    "temperature": st.one_of(st.none(), FLOATS), "top_p": st.one_of(st.none(), FLOATS),
    "top_k": st.one_of(st.none(), st.integers(-2, 600), st.just(2 ** 63)),
    "seed": st.one_of(st.none(), st.integers(0, 2 ** 64)), "stop": st.one_of(st.none(), TEXT, st.lists(TEXT, max_size=6)),
    "logprobs": st.one_of(st.none(), st.booleans(), st.integers(-1, 30)), "top_logprobs": st.one_of(st.none(), st.integers(-1, 30)),
    "presence_penalty": st.sampled_from([0, 0.0, -0.0, 1e-300]), "frequency_penalty": st.sampled_from([0, 0.5]),
    "echo": st.booleans(), "n": st.integers(0, 2), "stream": st.booleans(),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": JSON})),
    "max_completion_tokens": st.one_of(st.none(), st.integers(-1, 70)),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool"]),
                                                "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
                                                    {"type": st.sampled_from(["text", "image_url"]), "text": JSON}),
                                                    max_size=3))}), max_size=3),
    "model": st.sampled_from(["tiny", "", "gpt-4", "tiny\x00", "x" * 300]),
}


@st.composite
def edge_bodies(draw, chat: bool):
    """A body of the right shape with fields at their edges: hostile, yet mostly valid."""
    body = ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]} if chat
            else {"model": "tiny", "prompt": "The river", "max_tokens": 4})
    for name in draw(st.lists(st.sampled_from(CHAT_FIELDS if chat else COMPLETION_FIELDS), max_size=6, unique=True)):
        body[name] = draw(EDGES[name])
    return body


@SETTINGS
@given(data=st.data())
def test_openai_shaped_bodies_at_the_edges(gateway, data):
    t, client = gateway
    chat = data.draw(st.booleans())
    body = data.draw(edge_bodies(chat))
    _ok(client.post(ROUTES[chat], content=_dumps(body), headers={"Authorization": f"Bearer {t.key}"}))


@SETTINGS
@given(route=st.sampled_from(ROUTES), body=JSON)
def test_any_json_value_is_refused_cleanly(gateway, route, body):
    t, client = gateway
    _ok(client.post(route, content=_dumps(body), headers={"Authorization": f"Bearer {t.key}"}))


@SETTINGS
@given(data=st.data())
def test_openai_shaped_bodies_with_hostile_fields(gateway, data):
    t, client = gateway
    chat = data.draw(st.booleans())
    body = data.draw(openai_bodies(chat))
    _ok(client.post(ROUTES[chat], content=_dumps(body), headers={"Authorization": f"Bearer {t.key}"}))


@SETTINGS
@given(route=st.sampled_from(ROUTES), raw=st.one_of(st.binary(max_size=200), st.just(b""),
                                                    st.just(b"\xff\xfe{\"model\": \"tiny\"}"),
                                                    st.just(b'{"model": "tiny", "prompt": "\xc3\x28"}'),
                                                    st.just(b'{"model": "tiny", "prompt": "\\ud800"}'),
                                                    st.just(b'{"model": "tiny", "prompt": "a\\u0000b"}'),
                                                    st.just(b"[" * 5000 + b"]" * 5000),
                                                    st.just(b'{"model": "tiny", "prompt": "' + b"x" * (MAX_BODY + 10) + b'"}')))
def test_raw_bytes_are_refused_cleanly(gateway, route, raw):
    t, client = gateway
    _ok(client.post(route, content=raw, headers={"Authorization": f"Bearer {t.key}"}))


# ---- headers -------------------------------------------------------------------------------------

AUTH = st.one_of(st.none(), st.sampled_from(["", "Bearer", "Bearer ", "Bearer  ", "bearer nk-x", "Basic Zm9vOmJhcg==",
                                             "Bearer \t", "Token abc", "Bearer nk-" + "a" * 5000]),
                 st.binary(max_size=40).map(lambda b: b"Bearer " + b.replace(b"\r", b"").replace(b"\n", b"")),
                 st.text(max_size=40).map(lambda s: "Bearer " + s))
CONTENT_TYPES = st.one_of(st.none(), st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                                      "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                                      "\x00"]))


@SETTINGS
@given(route=st.sampled_from(ROUTES), auth=AUTH, ctype=CONTENT_TYPES, good_key=st.booleans())
def test_authorization_and_content_type_variants(gateway, route, auth, ctype, good_key):
    t, client = gateway
    headers = {}
    if good_key:
        auth = f"Bearer {t.key}"
    if auth is not None:
        headers["Authorization"] = auth
    if ctype is not None:
        headers["Content-Type"] = ctype
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
    try:
        r = client.post(route, content=json.dumps(body).encode(), headers=headers)
    except (httpx.LocalProtocolError, UnicodeEncodeError):  # a header the client itself will not send
        return
    if any(_not_a_field_value(v) for v in headers.values()):
        # Not HTTP (RFC 9110 field values: visible characters, obs-text, spaces and tabs): uvicorn's parser
        # (httptools) refuses the request before the gateway sees it, with a plain 400.
        assert r.status_code == 400, (r.status_code, r.text)
        return
    _ok(r, valid=good_key and route == ROUTES[0])
    if not good_key:
        assert r.status_code == 401


def _not_a_field_value(value: str | bytes) -> bool:
    raw = value.encode("latin-1") if isinstance(value, str) else value
    return any(b < 0x20 and b != 0x09 or b == 0x7F for b in raw)


def _raw_http(port: int, head: bytes, body: bytes, half_close: bool) -> bytes:
    """One request over a bare socket (content-length lies need one); what came back before close or 10 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and not half_close:
                    break
        except socket.timeout:
            if not half_close:
                raise
        return out


@settings(max_examples=25, deadline=None, derandomize=True)
@given(route=st.sampled_from(ROUTES), declared=st.one_of(st.integers(min_value=0, max_value=200),
                                                         st.sampled_from(["-1", "abc", "1e3", "99999999999999999999",
                                                                          str(MAX_BODY + 1), " 5", "5, 6"])))
def test_content_length_lies(gateway, route, declared):
    t, _ = gateway
    body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 2}).encode()
    head = (f"POST {route} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\nConnection: close\r\n\r\n").encode()
    # A declared length beyond the body leaves the server waiting: the client gives up its side (half-close),
    # and the server must not answer 500 (nothing, or a 4xx).
    longer = not str(declared).isdigit() or int(declared) > len(body)
    out = _raw_http(t.port, head, body, half_close=longer)
    if not out:
        event("closed without an answer")
        return
    status = int(out.split(b" ", 2)[1])
    event(f"status {status}")
    assert status != 500 and (400 <= status < 500 or status == 503), out[:300]


def test_the_gateway_still_answers_after_the_fuzz(gateway):
    t, client = gateway
    r = client.post(ROUTES[0], json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
                    headers={"Authorization": f"Bearer {t.key}"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_miner"
