"""Signatures, the bounded nonce store, the token bucket and the admission rules, without a server."""

import time

import pytest
from bittensor.keyfiles import Keypair

from neuron import auth
from neuron.chain.base import Metagraph, NeuronInfo
from neuron.config import AuthConfig
from neuron.errors import PermissionDenied, ResourceExhausted, Unauthenticated

METHOD = "/neuron.v1.Axon/Forward"
BODY = b"\x0a\x03abc"


@pytest.fixture(scope="module")
def keys():
    """Deterministic keypairs: a validator, a miner, a third party."""
    return {name: Keypair.create_from_uri(f"//{name}") for name in ("Alice", "Bob", "Eve")}


def check(headers, body=BODY, *, method=auth.REQUEST, path=METHOD, receiver, store=None, max_age=10.0):
    return auth.verify(dict(headers), body, method=method, path=path, self_hotkey=receiver,
                       nonce_store=store or auth.SignatureOnly(), max_age=max_age, allowed_skew=2.0)


def test_a_signed_request_verifies_and_names_its_sender(keys):
    alice, bob = keys["Alice"], keys["Bob"]
    meta = auth.sign(alice, auth.REQUEST, METHOD, BODY, bob.ss58_address)
    assert all(k == k.lower() for k, _ in meta)  # gRPC metadata keys must be lower case
    caller = check(meta, receiver=bob.ss58_address)
    assert caller.hotkey_ss58 == alice.ss58_address
    assert str(caller.nonce_ns) == dict(meta)[auth.NONCE_KEY]


@pytest.mark.parametrize("what", ["body", "path", "receiver", "sender", "signature", "stale", "future", "nothing"])
def test_every_broken_signature_is_unauthenticated(keys, what):
    alice, bob, eve = keys["Alice"], keys["Bob"], keys["Eve"]
    now = time.time_ns()
    meta = dict(auth.sign(alice, auth.REQUEST, METHOD, BODY, bob.ss58_address))
    kwargs = {"receiver": bob.ss58_address}
    if what == "body":
        kwargs["body"] = BODY + b"\x00"
    elif what == "path":
        kwargs["path"] = "/neuron.v1.Axon/Generate"
    elif what == "receiver":
        kwargs["receiver"] = eve.ss58_address
    elif what == "sender":  # Eve signs, and claims to be Alice
        meta = dict(auth.sign(eve, auth.REQUEST, METHOD, BODY, bob.ss58_address))
        meta[auth.HOTKEY_KEY] = alice.ss58_address
    elif what == "signature":  # a real signature by Alice, of another body
        other = dict(auth.sign(alice, auth.REQUEST, METHOD, b"other", bob.ss58_address))
        meta["x-bittensor-signature"] = other["x-bittensor-signature"]
    elif what in ("stale", "future"):
        shift = -60 if what == "stale" else 60
        from bittensor import http_auth

        headers = http_auth.sign(alice, method=auth.REQUEST, path=METHOD, body=BODY,
                                 receiver_ss58=bob.ss58_address, nonce_ns=now + shift * 10**9)
        meta = {k.lower(): v for k, v in headers.items()}
    elif what == "nothing":
        meta = {}
    with pytest.raises(Unauthenticated) as err:
        check(meta, **kwargs)
    assert str(err.value)


@pytest.mark.parametrize("key, value", [(auth.NONCE_KEY, "9" * 5000), (auth.NONCE_KEY, "1" * 257),
                                        ("x-bittensor-signature", "0x" + "ab" * 2000), (auth.HOTKEY_KEY, "5" * 300),
                                        (auth.NONCE_KEY, "not a number"), (auth.NONCE_KEY, "")])
def test_malformed_header_values_are_unauthenticated_and_long_ones_refused_unparsed(keys, key, value):
    alice, bob = keys["Alice"], keys["Bob"]
    meta = dict(auth.sign(alice, auth.REQUEST, METHOD, BODY, bob.ss58_address))
    meta[key] = value
    with pytest.raises(Unauthenticated, match="MalformedAuth|WrongReceiver|Stale|BadSignature") as err:
        check(meta, receiver=bob.ss58_address)
    if len(value) > auth.MAX_HEADER_CHARS:
        assert "characters" in str(err.value)


def test_a_replay_is_refused_by_a_nonce_store(keys):
    alice, bob = keys["Alice"], keys["Bob"]
    meta = auth.sign(alice, auth.REQUEST, METHOD, BODY, bob.ss58_address)
    store = auth.BoundedNonceStore(retention=60)
    check(meta, receiver=bob.ss58_address, store=store)
    with pytest.raises(Unauthenticated, match="Replayed"):
        check(meta, receiver=bob.ss58_address, store=store)
    check(meta, receiver=bob.ss58_address)  # SignatureOnly leaves replay to Admission


def test_a_response_is_bound_to_the_request_it_answers(keys):
    alice, bob = keys["Alice"], keys["Bob"]
    answer = b"the answer"
    meta = auth.sign(bob, auth.RESPONSE, auth.response_path(METHOD, 123), answer, alice.ss58_address)
    ok = dict(method=auth.RESPONSE, receiver=alice.ss58_address)
    assert check(meta, answer, path=auth.response_path(METHOD, 123), **ok).hotkey_ss58 == bob.ss58_address
    with pytest.raises(Unauthenticated):  # an old answer offered for another request
        check(meta, answer, path=auth.response_path(METHOD, 124), **ok)
    with pytest.raises(Unauthenticated):  # a changed answer
        check(meta, b"another answer", path=auth.response_path(METHOD, 123), **ok)


def test_stream_digest_depends_on_chunk_boundaries_and_order():
    assert auth.stream_digest([b"ab", b"c"]) != auth.stream_digest([b"a", b"bc"])
    assert auth.stream_digest([b"a", b"b"]) != auth.stream_digest([b"b", b"a"])
    assert auth.stream_digest([b"a", b"b"]) == auth.stream_digest(iter([b"a", b"b"]))


def test_auth_headers_ignore_other_and_binary_metadata():
    meta = [("x-bittensor-hotkey", "5abc"), ("user-agent", "grpc"), ("x-bittensor-nonce", b"1")]
    assert auth.auth_headers(meta) == {"x-bittensor-hotkey": "5abc"}


def test_nonce_store_bounds_nonces_per_hotkey():
    store = auth.BoundedNonceStore(retention=60, max_per_hotkey=3)
    assert all(store.check_and_store("a", n) for n in range(3))
    assert not store.check_and_store("a", 1)
    with pytest.raises(ResourceExhausted):
        store.check_and_store("a", 99)
    assert store.check_and_store("b", 99)  # other hotkeys are not affected


def test_nonce_store_bounds_hotkeys_dropping_the_least_recent():
    store = auth.BoundedNonceStore(retention=60, max_hotkeys=2)
    assert store.check_and_store("a", 1) and store.check_and_store("b", 1)
    assert not store.check_and_store("a", 1)  # touches "a": "b" is now the least recent
    assert store.check_and_store("c", 1)
    assert len(store._seen) == 2
    assert store.check_and_store("b", 1)  # "b" was dropped
    assert not store.check_and_store("c", 1)


def test_nonce_store_forgets_after_retention():
    store = auth.BoundedNonceStore(retention=0.0)
    assert store.check_and_store("a", 1)
    assert store.check_and_store("a", 1)  # expired at once: past retention a stale nonce is refused by age


def test_token_bucket_allows_a_burst_then_refuses_per_key():
    bucket = auth.TokenBucket(rate=0.0, burst=3)
    assert [bucket.take("a") for _ in range(4)] == [True, True, True, False]
    assert bucket.take("b")
    fast = auth.TokenBucket(rate=1e12, burst=1)
    assert all(fast.take("a") for _ in range(10))  # refilled between takes


def test_token_bucket_is_bounded_in_keys():
    bucket = auth.TokenBucket(rate=0.0, burst=1, max_keys=1)
    assert bucket.take("a") and not bucket.take("a")
    assert bucket.take("b")  # evicts "a"
    assert bucket.take("a")  # a fresh bucket
    assert len(bucket._buckets) == 1


def neuron(uid, hotkey, stake, permit):
    return NeuronInfo(uid=uid, hotkey=hotkey, coldkey="c", stake=stake, validator_permit=permit, axon=None,
                      last_update=0)


GRAPH = Metagraph(netuid=1, block=0, neurons=(neuron(0, "rich", 100.0, True), neuron(1, "poor", 2.0, True),
                                              neuron(2, "miner", 50.0, False)))


@pytest.mark.parametrize("hotkey, overrides, error, message", [
    ("stranger", {}, PermissionDenied, "not registered"),
    ("miner", {}, PermissionDenied, "validator permit"),
    ("poor", {"min_stake": 5.0}, PermissionDenied, "below the minimum"),
    ("rich", {"deny_hotkeys": ("rich",)}, PermissionDenied, "deny list"),
    ("rich", {"burst": 0}, ResourceExhausted, "rate limit"),
])
def test_admission_refuses_and_counts(hotkey, overrides, error, message):
    adm = auth.Admission(AuthConfig(**overrides), lambda: GRAPH)
    with pytest.raises(error, match=message):
        adm.admit(hotkey, 1)
    assert adm.refused == 1


def test_admission_returns_stake_and_refuses_a_replay_without_spending_the_bucket():
    adm = auth.Admission(AuthConfig(rate_per_s=0.0, burst=2), lambda: GRAPH)
    assert adm.admit("rich", 1) == 100.0
    for _ in range(3):
        with pytest.raises(Unauthenticated, match="Replayed"):
            adm.admit("rich", 1)
    assert adm.admit("rich", 2) == 100.0  # the replays spent none of the two tokens
    assert adm.refused == 3


def test_admission_without_a_metagraph_refuses_all_but_the_allow_list():
    adm = auth.Admission(AuthConfig(allow_hotkeys=("friend",)), lambda: None)
    with pytest.raises(PermissionDenied):
        adm.admit("rich", 1)
    assert adm.admit("friend", 1) == 0.0
    miner = auth.Admission(AuthConfig(require_validator_permit=False), lambda: GRAPH)
    assert miner.admit("miner", 1) == 50.0


def test_unregistered_hotkeys_never_reach_the_nonce_store():
    adm = auth.Admission(AuthConfig(), lambda: GRAPH)
    adm.nonces.max_hotkeys = 1  # one new hotkey in the store would evict the validator's nonces
    adm.admit("rich", 1)
    for i in range(5):  # fresh keys cost nothing to make; each signs validly and is refused
        with pytest.raises(PermissionDenied):
            adm.admit(f"stranger{i}", 1)
    with pytest.raises(Unauthenticated, match="Replayed"):
        adm.admit("rich", 1)
