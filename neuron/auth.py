"""Signed requests and responses (the SDK's btauth/1 over gRPC metadata) and who is admitted to the model.

A request is signed over the gRPC method path and the raw request bytes, bound to the receiver's
hotkey; the miner signs its response over the response bytes, bound to the caller and to the
request's nonce, so a validator keeps evidence of what a miner said and a reply cannot be replayed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter, OrderedDict, deque
from typing import Callable, Iterable, Mapping

from bittensor import http_auth

from neuron.chain.base import Metagraph
from neuron.config import AuthConfig
from neuron.errors import PermissionDenied, ResourceExhausted, Unauthenticated

REQUEST = "POST"
RESPONSE = "RESPONSE"
AUTH_KEYS = tuple(h.lower() for h in (http_auth.HEADER_VERSION, http_auth.HEADER_HOTKEY, http_auth.HEADER_RECEIVER,
                                      http_auth.HEADER_NONCE, http_auth.HEADER_CRYPTO, http_auth.HEADER_SIGNATURE))
HOTKEY_KEY = http_auth.HEADER_HOTKEY.lower()
NONCE_KEY = http_auth.HEADER_NONCE.lower()
# The longest btauth value is the 0x-prefixed hex signature (130 characters): anything longer is refused
# before it is parsed (a nonce of thousands of digits costs quadratic time in int()).
MAX_HEADER_CHARS = 256


def sign(keypair, method: str, path: str, body: bytes, receiver: str) -> list[tuple[str, str]]:
    """gRPC metadata (lower-case keys) carrying a btauth/1 signature. Pass a Keypair, not a Wallet."""
    headers = http_auth.sign(keypair, method=method, path=path, body=body, receiver_ss58=receiver)
    return [(k.lower(), v) for k, v in headers.items()]


def auth_headers(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """The btauth headers from gRPC metadata; other keys are ignored."""
    return {k: v for k, v in metadata if k in AUTH_KEYS and isinstance(v, str)}


def response_path(method: str, request_nonce: int | str) -> str:
    """A response is signed for this path: the method, bound to the nonce of the request it answers."""
    return f"{method}#{request_nonce}"


def stream_digest(chunks: Iterable[bytes]) -> bytes:
    """What a stream's signature covers: SHA-256 over each chunk's length and bytes, in order."""
    digest = hashlib.sha256()
    for c in chunks:
        digest.update(len(c).to_bytes(8, "little"))
        digest.update(c)
    return digest.digest()


class BoundedNonceStore:
    """Seen (hotkey, nonce) pairs, expired after `retention` seconds, bounded per hotkey and in hotkeys."""

    def __init__(self, retention: float, max_per_hotkey: int = 4096, max_hotkeys: int = 4096):
        self.retention = retention
        self.max_per_hotkey = max_per_hotkey
        self.max_hotkeys = max_hotkeys
        self._seen: OrderedDict[str, tuple[set[int], deque[tuple[float, int]]]] = OrderedDict()
        self._lock = threading.Lock()

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        now = time.monotonic()
        with self._lock:
            seen, order = self._seen.setdefault(hotkey_ss58, (set(), deque()))
            self._seen.move_to_end(hotkey_ss58)
            while order and order[0][0] <= now:
                seen.discard(order.popleft()[1])
            if nonce_ns in seen:
                return False
            if len(seen) >= self.max_per_hotkey:
                raise ResourceExhausted("too many requests from this hotkey inside the freshness window")
            seen.add(nonce_ns)
            order.append((now + self.retention, nonce_ns))
            while len(self._seen) > self.max_hotkeys:
                # Dropping the least recent hotkey is safe only if its nonces are all stale by now;
                # max_hotkeys is sized well above the registered uids, which alone pass admission.
                self._seen.popitem(last=False)
            return True


class SignatureOnly:
    """A nonce store that remembers nothing: verify() then checks shape, receiver, freshness and signature.

    The axon checks replays after admission instead, so only admitted hotkeys reach its bounded store:
    unregistered keys, which cost nothing to make, could otherwise evict a validator's recent nonces.
    """

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        return True


def verify(headers: Mapping[str, str], body: bytes, *, method: str, path: str, self_hotkey: str,
           nonce_store, max_age: float, allowed_skew: float) -> http_auth.Caller:
    """Check a signature; UNAUTHENTICATED (with the SDK's reason) when it does not hold."""
    if not headers:
        raise Unauthenticated("the request is not signed: sign it with a hotkey (btauth/1 in the gRPC metadata)")
    for key, value in headers.items():
        if len(value) > MAX_HEADER_CHARS:
            raise Unauthenticated(f"MalformedAuth: {key} has {len(value)} characters (at most {MAX_HEADER_CHARS})")
    try:
        return http_auth.verify(headers, body, method=method, path=path, self_hotkey_ss58=self_hotkey,
                                max_age=max_age, allowed_skew=allowed_skew, nonce_store=nonce_store)
    except http_auth.AuthError as exc:
        raise Unauthenticated(f"{type(exc).__name__}: {exc}") from None


class TokenBucket:
    """Per-key token buckets: `rate` per second, up to `burst`; bounded in keys."""

    def __init__(self, rate: float, burst: int, max_keys: int = 65536):
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            ok = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return ok


class Admission:
    """Who may use the model: run after the signature holds and before any model work.

    Order: deny list and chain checks, then replay (so the nonce store holds admitted hotkeys only),
    then the rate limit (so a replayed request cannot spend its victim's tokens).
    """

    def __init__(self, config: AuthConfig, metagraph: Callable[[], Metagraph | None]):
        self.config = config
        self._metagraph = metagraph
        self._buckets = TokenBucket(config.rate_per_s, config.burst)
        self.nonces = BoundedNonceStore(retention=config.max_age_s + config.allowed_skew_s + 1.0)
        self.refused = 0  # requests refused here (a test counts them against model work)
        self._in_flight: Counter[str] = Counter()  # admitted calls not yet answered, per hotkey

    def enter(self, hotkey: str) -> None:
        """Count an admitted call in flight; ResourceExhausted when the hotkey already has its share."""
        cap = self.config.max_in_flight
        if cap and self._in_flight[hotkey] >= cap:
            self.refused += 1
            raise ResourceExhausted(f"this hotkey already has {cap} calls in flight (the miner's share per caller: "
                                    "--auth.max_in_flight); read or cancel them first")
        self._in_flight[hotkey] += 1

    def leave(self, hotkey: str) -> None:
        self._in_flight[hotkey] -= 1
        if self._in_flight[hotkey] <= 0:
            del self._in_flight[hotkey]

    def admit(self, hotkey: str, nonce_ns: int) -> float:
        """The caller's stake (its priority), or PermissionDenied / Unauthenticated / ResourceExhausted."""
        try:
            stake = self._check(hotkey)
            if not self.nonces.check_and_store(hotkey, nonce_ns):
                raise Unauthenticated("ReplayedRequest: this nonce was already accepted from this hotkey")
            if not self._buckets.take(hotkey):
                c = self.config
                raise ResourceExhausted(f"rate limit: at most {c.rate_per_s:g} requests/s (burst {c.burst}) per hotkey")
        except (PermissionDenied, Unauthenticated, ResourceExhausted):
            self.refused += 1
            raise
        return stake

    def _check(self, hotkey: str) -> float:
        c = self.config
        if hotkey in c.deny_hotkeys:
            raise PermissionDenied("this hotkey is on the miner's deny list")
        if hotkey in c.allow_hotkeys:
            return 0.0
        mg = self._metagraph()
        neuron = mg.by_hotkey(hotkey) if mg is not None else None
        if neuron is None:
            raise PermissionDenied("this hotkey is not registered on the subnet")
        if neuron.stake < c.min_stake:
            raise PermissionDenied(f"stake {neuron.stake:g} is below the minimum of {c.min_stake:g}")
        if c.require_validator_permit and not neuron.validator_permit:
            raise PermissionDenied("this hotkey has no validator permit; miners answer validators only")
        return neuron.stake
