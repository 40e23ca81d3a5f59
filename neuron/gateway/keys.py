"""The gateway's API keys, hashed at rest in a JSON file, and the per-key limits enforced in memory."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable

PREFIX = "nk-"  # every key starts so: a key pasted into the wrong place is recognisable, and a scanner can find it
ID_CHARS = 8  # characters after the prefix that form the public key_id (48 of the secret's 256 bits)
FORMAT = 1  # the key file's "version"
CONCURRENCY_RETRY_S = 1.0  # a slot frees when some request ends, not on a schedule: the hint given to the client


class KeyStoreError(ValueError):
    """The key file is unreadable, or an operation on it is wrong (a duplicate name, an unknown key)."""


@dataclass(frozen=True)
class KeyLimits:
    """What one key may use; 0 means unlimited."""

    requests_per_minute: int = 60  # requests started per minute
    tokens_per_minute: int = 20000  # generated (completion) tokens per minute
    max_concurrent: int = 4  # requests in flight at once, streams included

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise KeyStoreError(f"{f.name} must be a whole number >= 0 (0: unlimited), got {value!r}")


@dataclass(frozen=True)
class ApiKey:
    """One key as the gateway sees it: never the secret itself."""

    name: str  # the operator's label, unique in the store
    key_id: str  # "nk-" and the key's first characters: public, safe to log
    limits: KeyLimits
    created: float  # Unix time it was added


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _entry(record: Any) -> tuple[ApiKey, bytes]:
    """One record of the file, checked field by field (it may have been edited by hand)."""
    name, key_id, digest = record["name"], record["key_id"], bytes.fromhex(record["sha256"])
    if not isinstance(name, str) or not isinstance(key_id, str) or len(digest) != 32:
        raise ValueError(f"bad record {record.get('name')!r}")
    created = record["created"]
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        raise ValueError(f"bad created time in {name!r}")
    return ApiKey(name, key_id, KeyLimits(**record["limits"]), float(created)), digest


class KeyStore:
    """API keys in a JSON file, hashed at rest; written atomically (tmp, fsync, os.replace) with mode 0600.

    A running gateway sees `keys add` and `keys revoke` from other processes: every call re-reads the file
    when it was replaced or changed.
    """

    def __init__(self, path: str | os.PathLike, now: Callable[[], float] = time.time):
        self.path = Path(path).expanduser()
        self._now = now
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) of the file last read
        self._keys: list[tuple[ApiKey, bytes]] = []
        with self._lock:
            self._refresh()

    def add(self, name: str, limits: KeyLimits = KeyLimits()) -> str:
        """A new key named `name`; returns the key itself, which is not stored and cannot be shown again."""
        if not name or name != name.strip() or name.startswith(PREFIX):
            raise KeyStoreError(f"bad key name {name!r}: it must be non-empty, without surrounding spaces, "
                                f"and not start with {PREFIX!r} (ids do)")
        with self._lock:
            self._refresh()
            if any(k.name == name for k, _ in self._keys):
                raise KeyStoreError(f"a key named {name!r} already exists in {self.path}; "
                                    "revoke it or pick another name")
            taken = {k.key_id for k, _ in self._keys}
            while True:
                key = PREFIX + secrets.token_urlsafe(32)
                if key[:len(PREFIX) + ID_CHARS] not in taken:
                    break
            entry = ApiKey(name, key[:len(PREFIX) + ID_CHARS], limits, self._now())
            self._write([*self._keys, (entry, _digest(key))])
        return key

    def list(self) -> list[ApiKey]:
        """Every key, oldest first."""
        with self._lock:
            self._refresh()
            return [k for k, _ in self._keys]

    def revoke(self, name_or_id: str) -> ApiKey:
        """Remove the key with this name or key_id; returns it."""
        with self._lock:
            self._refresh()
            gone = [k for k, _ in self._keys if name_or_id in (k.name, k.key_id)]
            if not gone:
                raise KeyStoreError(f"no key named {name_or_id!r} or with that id in {self.path} "
                                    "(see: neuron gateway keys list)")
            self._write([(k, d) for k, d in self._keys if k is not gone[0]])
        return gone[0]

    def lookup(self, key: str) -> ApiKey | None:
        """The key's entry, or None; every stored hash is compared in constant time."""
        digest = _digest(key)
        with self._lock:
            self._refresh()
            found = None
            for entry, stored in self._keys:
                if hmac.compare_digest(stored, digest):
                    found = entry
            return found

    def _refresh(self) -> None:
        """Re-read the file if it changed since the last read (a missing file holds no keys)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._keys = None, []
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            # Read after the stat: the contents are never older than the stamp kept for them.
            self._keys, self._stamp = self._read(), stamp

    def _read(self) -> list[tuple[ApiKey, bytes]]:
        try:
            data = json.loads(self.path.read_bytes())
            if data.get("version") != FORMAT:
                raise ValueError(f"unknown version {data.get('version')!r}")
            keys = [_entry(r) for r in data["keys"]]
            for field in ("name", "key_id"):
                values = [getattr(k, field) for k, _ in keys]
                if len(set(values)) != len(values):
                    raise ValueError(f"a {field} appears twice")
            return keys
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise KeyStoreError(f"cannot read the API key file {self.path}: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyStoreError(f"the API key file {self.path} is corrupt ({type(exc).__name__}: {exc}); "
                                "restore it, or move it away and add the keys again") from None

    def _write(self, keys: list[tuple[ApiKey, bytes]]) -> None:
        records = [{"name": k.name, "key_id": k.key_id, "sha256": d.hex(), "limits": dataclasses.asdict(k.limits),
                    "created": k.created} for k, d in keys]
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": FORMAT, "keys": records}, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:  # the rename itself survives a crash only once the directory is synced
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        st = self.path.stat()
        self._keys, self._stamp = keys, (st.st_ino, st.st_mtime_ns, st.st_size)


class Limit(Enum):
    """Which limit refused a request."""

    REQUESTS = "requests/min"
    TOKENS = "tokens/min"
    CONCURRENT = "concurrent"


class RateLimited(Exception):
    """A key is over one of its limits: retry after `retry_after_s` (HTTP 429 with Retry-After)."""

    def __init__(self, key_id: str, limit: Limit, allowed: int, retry_after_s: float):
        self.key_id, self.limit, self.retry_after_s = key_id, limit, retry_after_s
        if limit is Limit.CONCURRENT:
            self.message = f"key {key_id} already has {allowed} requests in flight, its limit; retry when one ends"
        else:
            self.message = f"key {key_id} is over its limit of {allowed} {limit.value}; retry in {retry_after_s:.1f} s"
        super().__init__(self.message)


@dataclass
class _Bucket:
    """A per-minute budget refilled continuously up to the limit; it may go below zero when charged after the work."""

    level: float
    at: float

    def refill(self, per_minute: int, now: float) -> None:
        self.level = min(float(per_minute), self.level + (now - self.at) * per_minute / 60)
        self.at = now

    def wait_s(self, per_minute: int) -> float:
        """Seconds until one unit is available; 0 when it is now."""
        return 0.0 if self.level >= 1 else (1 - self.level) * 60 / per_minute


@dataclass
class _KeyState:
    requests: _Bucket
    tokens: _Bucket
    in_flight: int = 0
    total_requests: int = 0
    total_tokens: int = 0
    limited: int = 0


class Limiter:
    """Per-key limits in memory: token buckets for requests/min and tokens/min, and a count of requests in flight.

    State is kept only for keys that were looked up and acquired (a handful of numbers each).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, _KeyState] = {}

    def acquire(self, key: ApiKey) -> None:
        """Take a request and a concurrency slot, or raise RateLimited (taking nothing) before any work starts."""
        lim = key.limits
        with self._lock:
            now = self._clock()
            s = self._keys.get(key.key_id)
            if s is None:
                s = self._keys[key.key_id] = _KeyState(_Bucket(lim.requests_per_minute, now),
                                                       _Bucket(lim.tokens_per_minute, now))
            s.requests.refill(lim.requests_per_minute, now)
            s.tokens.refill(lim.tokens_per_minute, now)
            refusals = []
            if lim.max_concurrent and s.in_flight >= lim.max_concurrent:
                refusals.append((CONCURRENCY_RETRY_S, Limit.CONCURRENT, lim.max_concurrent))
            for limit, bucket, per_minute in ((Limit.REQUESTS, s.requests, lim.requests_per_minute),
                                              (Limit.TOKENS, s.tokens, lim.tokens_per_minute)):
                if per_minute and (wait := bucket.wait_s(per_minute)):
                    refusals.append((wait, limit, per_minute))
            if refusals:
                s.limited += 1
                wait, limit, allowed = max(refusals, key=lambda r: r[0])  # the client must wait for the slowest
                raise RateLimited(key.key_id, limit, allowed, wait)
            s.requests.level -= 1
            s.in_flight += 1
            s.total_requests += 1

    def release(self, key: ApiKey, tokens: int) -> None:
        """Free the slot taken by `acquire` and charge the tokens the request generated (a stream's, so far)."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        with self._lock:
            s = self._keys.get(key.key_id)
            if s is None or s.in_flight == 0:
                raise RuntimeError(f"release of key {key.key_id} without a matching acquire")
            s.tokens.refill(key.limits.tokens_per_minute, self._clock())
            s.tokens.level -= tokens
            s.in_flight -= 1
            s.total_tokens += tokens

    def usage(self) -> dict[str, dict[str, int]]:
        """key_id -> requests and tokens since start, requests in flight now, and requests refused (for metrics)."""
        with self._lock:
            return {k: {"requests": s.total_requests, "tokens": s.total_tokens, "in_flight": s.in_flight,
                        "limited": s.limited} for k, s in self._keys.items()}
