"""API keys on real files, the per-key limiter on a fake clock, and `neuron gateway keys` end to end."""

import hashlib
import json
import os
import stat
import typing

import pytest

from neuron import cli
from neuron.config import GatewayKeysConfig, flag_names
from neuron.gateway.keys import ApiKey, KeyLimits, KeyStore, KeyStoreError, Limit, Limiter, RateLimited
from neuron.help import field_comments


class Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def key(rpm=0, tpm=0, concurrent=0, key_id="nk-test0001") -> ApiKey:
    return ApiKey("test", key_id, KeyLimits(rpm, tpm, concurrent), 0.0)


def refused(limiter: Limiter, k: ApiKey) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        limiter.acquire(k)
    return info.value


# The store


def test_add_lookup_revoke(tmp_path):
    store = KeyStore(tmp_path / "keys.json", now=lambda: 1234.5)
    assert store.list() == [] and not (tmp_path / "keys.json").exists()  # a missing file holds no keys
    limits = KeyLimits(requests_per_minute=5, tokens_per_minute=100, max_concurrent=1)
    alice, bob = store.add("alice", limits), store.add("bob")
    assert alice.startswith("nk-") and len(alice) == 3 + 43 and alice != bob
    found = store.lookup(alice)
    assert found == ApiKey("alice", alice[:11], limits, 1234.5)
    assert store.lookup(bob).limits == KeyLimits() and store.lookup(bob).key_id == bob[:11]
    assert store.lookup(alice[:-1] + ("A" if alice[-1] != "A" else "B")) is None
    assert store.lookup("") is None and store.lookup(found.key_id) is None
    assert [k.name for k in store.list()] == ["alice", "bob"]

    assert store.revoke("alice") == found
    assert store.lookup(alice) is None and store.lookup(bob) is not None
    assert store.revoke(bob[:11]).name == "bob"  # by id too
    assert store.list() == [] and KeyStore(tmp_path / "keys.json").list() == []
    with pytest.raises(KeyStoreError, match="no key named 'alice'"):
        store.revoke("alice")


def test_the_file_holds_hashes_only_with_mode_0600_and_no_leftovers(tmp_path):
    path = tmp_path / "deeper" / "keys.json"
    store = KeyStore(path)
    secret = store.add("alice")
    text = path.read_text()
    assert secret not in text and secret[3:] not in text and secret[11:] not in text
    assert json.loads(text)["keys"][0]["sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)  # loosened by hand: the next write tightens it again
    store.add("bob")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys.json"]  # no temporary file left behind


def test_a_revoke_or_add_in_another_process_is_seen_without_a_restart(tmp_path):
    path = tmp_path / "keys.json"
    gateway = KeyStore(path)
    secret = gateway.add("alice")
    assert gateway.lookup(secret).name == "alice"
    cli_store = KeyStore(path)  # `neuron gateway keys ...` in another process
    cli_store.revoke("alice")
    assert gateway.lookup(secret) is None
    newer = cli_store.add("bob")
    assert gateway.lookup(newer).name == "bob"
    # The gateway's own stale view is not written back over the other's changes.
    gateway.add("carol")
    assert [k.name for k in KeyStore(path).list()] == ["bob", "carol"]
    path.unlink()
    assert gateway.lookup(newer) is None


def test_a_corrupt_file_is_an_error_naming_it_and_a_running_store_fails_closed(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    with pytest.raises(KeyStoreError, match=f"the API key file {path} is corrupt"):
        KeyStore(path)
    path.write_text(json.dumps({"version": 1, "keys": [{"name": "x", "key_id": "nk-1", "sha256": "zz",
                                                        "limits": {}, "created": 0}]}))
    with pytest.raises(KeyStoreError, match="is corrupt"):
        KeyStore(path)
    record = {"name": "x", "key_id": "nk-1", "sha256": "00" * 32, "limits": {}, "created": 0}
    path.write_text(json.dumps({"version": 1, "keys": [record, {**record, "key_id": "nk-2"}]}))
    with pytest.raises(KeyStoreError, match="a name appears twice"):
        KeyStore(path)
    path.write_text(json.dumps({"version": 2, "keys": []}))
    with pytest.raises(KeyStoreError, match="unknown version 2"):
        KeyStore(path)

    path.unlink()
    store = KeyStore(path)
    secret = store.add("alice")
    # Edited in place (same inode) within the clock's tick perhaps: the size still tells the change.
    path.write_text(path.read_text().replace('"requests_per_minute": 60', '"requests_per_minute": -100'))
    with pytest.raises(KeyStoreError, match="is corrupt"):  # never the last good keys: a revoke may be among them
        store.lookup(secret)


def test_names_are_unique_and_limits_are_checked(tmp_path):
    path = tmp_path / "keys.json"
    store = KeyStore(path)
    store.add("alice")
    before = path.read_bytes()
    with pytest.raises(KeyStoreError, match="a key named 'alice' already exists"):
        KeyStore(path).add("alice")
    for bad in ("", " alice", "nk-alice"):
        with pytest.raises(KeyStoreError, match="bad key name"):
            store.add(bad)
    assert path.read_bytes() == before
    for bad in (-1, 1.5, True):
        with pytest.raises(KeyStoreError, match="requests_per_minute must be a whole number"):
            KeyLimits(requests_per_minute=bad)


# The limiter


def test_requests_per_minute_refill_with_an_exact_retry_after():
    clock = Clock()
    limiter, k = Limiter(clock), key(rpm=60)  # one a second, 60 at once
    for _ in range(60):
        limiter.acquire(k)
        limiter.release(k, 0)
    err = refused(limiter, k)
    assert err.limit is Limit.REQUESTS and err.retry_after_s == 1.0
    assert "over its limit of 60 requests/min" in err.message and k.key_id in err.message
    clock.now = 0.25
    assert refused(limiter, k).retry_after_s == 0.75
    clock.now = 1.0
    limiter.acquire(k)
    assert refused(limiter, k).retry_after_s == 1.0
    clock.now = 1000.0  # a long pause refills to the limit, not beyond it
    for _ in range(60):
        limiter.acquire(k)
    assert refused(limiter, k).limit is Limit.REQUESTS

    slow = key(rpm=2, key_id="nk-slow0001")
    limiter.acquire(slow)
    limiter.acquire(slow)
    assert refused(limiter, slow).retry_after_s == 30.0


def test_tokens_per_minute_are_charged_on_release_and_checked_on_acquire():
    clock = Clock()
    limiter, k = Limiter(clock), key(tpm=60)
    limiter.acquire(k)
    limiter.acquire(k)  # both start: the budget is checked before the work, charged after it
    limiter.release(k, 60)
    err = refused(limiter, k)
    assert err.limit is Limit.TOKENS and err.retry_after_s == 1.0 and "60 tokens/min" in err.message
    limiter.release(k, 60)  # the second request takes the key 60 tokens into debt: it waits that off
    assert refused(limiter, k).retry_after_s == 61.0
    clock.now = 61.0
    limiter.acquire(k)
    limiter.release(k, 0)


def test_concurrency_is_freed_on_release_and_a_refusal_takes_nothing():
    clock = Clock()
    limiter, k = Limiter(clock), key(concurrent=2)
    limiter.acquire(k)
    limiter.acquire(k)
    err = refused(limiter, k)
    assert err.limit is Limit.CONCURRENT and err.retry_after_s == 1.0 and "2 requests in flight" in err.message
    assert limiter.usage() == {k.key_id: {"requests": 2, "tokens": 0, "in_flight": 2, "limited": 1}}
    limiter.release(k, 7)
    limiter.acquire(k)
    limiter.release(k, 3)
    limiter.release(k, 0)
    assert limiter.usage() == {k.key_id: {"requests": 3, "tokens": 10, "in_flight": 0, "limited": 1}}
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        limiter.release(k, 0)
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        limiter.release(k, -1)


def test_the_longest_wait_is_reported_keys_are_independent_and_zero_is_unlimited():
    clock = Clock()
    limiter = Limiter(clock)
    both = key(rpm=60, tpm=60)
    for _ in range(60):
        limiter.acquire(both)
    limiter.release(both, 120)  # requests free in 1 s, tokens in 61 s: the client must wait 61
    err = refused(limiter, both)
    assert err.limit is Limit.TOKENS and err.retry_after_s == 61.0
    other = key(rpm=1, key_id="nk-other001")
    limiter.acquire(other)  # another key's budget is its own
    free = key(key_id="nk-free0001")
    for _ in range(1000):
        limiter.acquire(free)
    assert limiter.usage()[free.key_id]["in_flight"] == 1000
    assert sorted(limiter.usage()) == sorted([both.key_id, other.key_id, free.key_id])


# The command line


def test_gateway_keys_add_list_revoke_end_to_end(tmp_path, capsys):
    path = tmp_path / "keys.json"
    flags = ["--gateway.keys_path", str(path)]
    assert cli.main(["gateway", "keys", "list", *flags]) == 0
    assert "no API keys in" in capsys.readouterr().out

    assert cli.main(["gateway", "keys", "add", "--name", "alice", "--requests-per-minute", "5",
                     "--tokens_per_minute", "0", "--max_concurrent", "2", *flags]) == 0
    out = capsys.readouterr().out
    assert "shown once" in out and "cannot be shown again" in out
    [secret] = [w for w in out.split() if w.startswith("nk-") and len(w) > 20]
    entry = KeyStore(path).lookup(secret)
    assert entry.name == "alice" and entry.limits == KeyLimits(5, 0, 2)
    assert f"added key alice ({entry.key_id})" in out and "5 requests/min, unlimited tokens/min, 2 concurrent" in out
    assert cli.main(["gateway", "keys", "add", "--name", "bob", *flags]) == 0
    capsys.readouterr()

    assert cli.main(["gateway", "keys", "list", *flags]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and entry.key_id in listed and "bob" in listed and secret[11:] not in listed
    assert cli.main(["gateway", "keys", "list", "--json", *flags]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["limits"]) for r in rows] == [
        ("alice", {"requests_per_minute": 5, "tokens_per_minute": 0, "max_concurrent": 2}),
        ("bob", {"requests_per_minute": 60, "tokens_per_minute": 20000, "max_concurrent": 4})]
    assert rows[0]["key_id"] == entry.key_id and "sha256" not in rows[0]

    assert cli.main(["gateway", "keys", "add", "--name", "alice", *flags]) == 1
    assert "a key named 'alice' already exists" in capsys.readouterr().err
    assert cli.main(["gateway", "keys", "revoke", "--name", entry.key_id, *flags]) == 0
    assert f"revoked key alice ({entry.key_id})" in capsys.readouterr().out
    assert KeyStore(path).lookup(secret) is None
    for argv, error in ((["revoke", "--name", "alice"], "no key named 'alice'"),
                        (["add"], "needs --name NAME"), (["remove"], "unknown action; did you mean revoke?"),
                        ([], "needs one of: add, list, revoke")):
        assert cli.main(["gateway", "keys", *argv, *flags]) == 1
        assert error in capsys.readouterr().err, argv
    path.write_text("[]")
    assert cli.main(["gateway", "keys", "list", *flags]) == 1
    err = capsys.readouterr().err
    assert f"the API key file {path} is corrupt" in err and "Traceback" not in err


def test_gateway_help_and_defaults_match_the_store(capsys):
    assert cli.main(["gateway", "keys", "--help"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: neuron gateway keys add|list|revoke [options]")
    assert "--gateway.keys_path TEXT" in shown and "--requests_per_minute INT" in shown
    c = GatewayKeysConfig()
    assert KeyLimits(c.requests_per_minute, c.tokens_per_minute, c.max_concurrent) == KeyLimits()
    assert c.gateway.keys_path == "~/.neuron/gateway_keys.json"
    for name in flag_names(GatewayKeysConfig):
        *section, leaf = name.split(".")
        owner = typing.get_type_hints(GatewayKeysConfig)[section[0]] if section else GatewayKeysConfig
        assert field_comments(owner).get(leaf) and f"--{name} " in shown, name
