"""Prometheus metrics of the miner and the validator, each on its own registry, served at --metrics.port,
with the miner's readiness beside them at /health (200 while it serves, 503 otherwise, as TGI and vLLM)."""

from __future__ import annotations

import collections
import dataclasses
import platform
import re
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from neuron.engine.types import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUND_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

RATE_WINDOW_S = 60.0  # the tokens/s gauge's window


def registry(role: str) -> CollectorRegistry:
    """A registry of our own (tests make many), with the process's CPU, memory and file descriptors
    (`process_*`), the Python build (`python_info`) and `neuron_build_info` (version, role, torch)."""
    r = CollectorRegistry()
    r.register(PROCESS_COLLECTOR)
    r.register(PLATFORM_COLLECTOR)
    Info("neuron_build", "the running neuron", registry=r).info(
        {"version": _version(), "role": role, "python": platform.python_version(), "torch": _version("torch")})
    return r


def _version(dist: str = "neuron") -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"




def reason_kind(text: str) -> str:
    """A failure message as a label with few values: "forward: top-k overlap", "generate: deadline_exceeded"."""
    call = re.match(r"^(\w+): ([a-z_]+): ", text)
    if call and call.group(2).upper() in grpc.StatusCode.__members__:  # a failed call: its status, not its message
        return f"{call.group(1)}: {call.group(2)}"
    return re.split(r"\s-?\d", text)[0][:80].strip()


def refusal_reason(status: str, message: str) -> str:
    """Why admission refused a call, as a short label."""
    m = message.lower()
    for needle, label in (("not registered", "unregistered"), ("validator permit", "no_validator_permit"),
                          ("deny list", "denied"), ("below the minimum", "low_stake"), ("rate limit", "rate_limit"),
                          ("queue is full", "queue_full"), ("replayed", "replayed"), ("stale", "stale_nonce"),
                          ("not signed", "unsigned"), ("signature", "bad_signature")):
        if needle in m:
            return label
    return status.lower()


class EngineCollector:
    """Exports `stats()` (engine state: queue depth, running rows, batches, tokens) at scrape time.

    Every field of EngineStats becomes `neuron_miner_engine_<field>` (a gauge, or a counter with `_total`):
    one set of series whichever engine serves; a backend's own extras stay out of the metrics. Generated
    tokens also yield tokens per second over the last RATE_WINDOW_S (measured from the scrapes in the
    window and the last one before it, or from start-up: never 0 just because nobody scraped in between;
    Prometheus users can take `rate(neuron_miner_engine_generated_tokens_total[1m])` instead).
    """

    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats
        self._seen = collections.deque([(time.monotonic(), 0)])  # (time, generated_tokens) at scrapes
        self._lock = threading.Lock()

    def collect(self):
        s = self.stats()
        for f in dataclasses.fields(EngineStats):
            value = float(getattr(s, f.name))
            if f.name in EngineStats.GAUGES:
                yield GaugeMetricFamily(f"neuron_miner_engine_{f.name}", f"engine: {f.name} now", value=value)
            else:
                yield CounterMetricFamily(f"neuron_miner_engine_{f.name}", f"engine: {f.name} since start", value=value)
        mean = s.forward_rows / s.forward_batches if s.forward_batches else 0.0
        yield GaugeMetricFamily("neuron_miner_engine_forward_batch_rows_mean",
                                "mean rows per forward batch since start", value=mean)
        now, tokens = time.monotonic(), s.generated_tokens
        with self._lock:
            while len(self._seen) > 1 and self._seen[1][0] <= now - RATE_WINDOW_S:
                self._seen.popleft()  # keep one sample at or before the window's start
            then, before = self._seen[0]
            self._seen.append((now, tokens))
        rate = (tokens - before) / (now - then) if now > then else 0.0
        yield GaugeMetricFamily("neuron_miner_engine_tokens_per_second",
                                f"generated tokens per second over the last {RATE_WINDOW_S:.0f} s", value=rate)


class MinerMetrics:
    """Requests by RPC and status, latency, admission refusals, generated tokens, and engine state."""

    def __init__(self, stats: Callable[[], EngineStats] | None = None):
        self.registry = registry("miner")
        r = self.registry
        self.requests = Counter("neuron_miner_requests_total", "calls by RPC and gRPC status", ["rpc", "status"],
                                registry=r)
        self.latency = Histogram("neuron_miner_request_seconds", "time from admission to the answer, by RPC",
                                 ["rpc"], buckets=LATENCY_BUCKETS, registry=r)
        self.refusals = Counter("neuron_miner_admission_refusals_total", "calls refused before any model work",
                                ["reason"], registry=r)
        self.tokens = Counter("neuron_miner_generated_tokens_total", "tokens sent back by Generate and GenerateStream",
                              registry=r)
        self.engine = None
        if stats is not None:
            self.engine = EngineCollector(stats)
            r.register(self.engine)

    def observe_request(self, rpc: str, status: str, seconds: float, message: str = "") -> None:
        self.requests.labels(rpc, status).inc()
        if status == "OK":
            self.latency.labels(rpc).observe(seconds)
        elif status in ("UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"):
            self.refusals.labels(refusal_reason(status, message)).inc()

    def observe_tokens(self, n: int) -> None:
        self.tokens.inc(n)


class ValidatorMetrics:
    """Rounds, verifications by result and reason per uid, weights set."""

    def __init__(self):
        self.registry = registry("validator")
        r = self.registry
        self.rounds = Counter("neuron_validator_rounds_total", "rounds run by this process", registry=r)
        self.round_seconds = Histogram("neuron_validator_round_seconds", "time of one round",
                                       buckets=ROUND_BUCKETS, registry=r)
        self.verifications = Counter("neuron_validator_verifications_total",
                                     "answers judged, by uid, result (verified/failed) and reason",
                                     ["uid", "result", "reason"], registry=r)
        self.weight_sets = Counter("neuron_validator_weight_sets_total", "weight-setting attempts by result",
                                   ["result"], registry=r)
        self.weight = Gauge("neuron_validator_weight", "the weight last set on each uid", ["uid"], registry=r)
        self.score = Gauge("neuron_validator_score", "moving-average score of each uid", ["uid"], registry=r)

    def observe_judgement(self, uid: int, verified: bool, reason: str) -> None:
        self.verifications.labels(str(uid), "verified" if verified else "failed",
                                  "" if verified else reason_kind(reason)).inc()


class GatewayMetrics:
    """The gateway's user traffic, in the validator's registry."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.requests = Counter("neuron_gateway_requests_total", "HTTP requests by path and status",
                                ["path", "status"], registry=r)
        self.first_token = Histogram("neuron_gateway_time_to_first_token_seconds",
                                     "from choosing a miner to its first token", registry=r)
        self.tokens = Counter("neuron_gateway_tokens_total", "completion tokens delivered to users", registry=r)
        self.key_tokens = Counter("neuron_gateway_key_tokens_total", "completion tokens delivered per API key id",
                                  ["key"], registry=r)
        self.verifications = Counter("neuron_gateway_verifications_total",
                                     "user answers judged after delivery, by result (verified/failed/skipped)",
                                     ["result"], registry=r)
        self.queue = Gauge("neuron_gateway_judging_queue", "user answers waiting to be judged", registry=r)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):
        """Scrapes and probes are not worth a log line each."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def serve(registry: CollectorRegistry, ip: str, port: int, not_ready: Callable[[], str | None] | None = None):
    """Serve `registry` at http://ip:port/metrics in a daemon thread; returns the server (its port: .server_port).

    With `not_ready` (None while serving, else why not), /health answers 200 "ok" or 503 and the reason.
    A busy port is an OSError naming it and the flag to change.
    """
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        if not_ready is None or environ.get("PATH_INFO") != "/health":
            return metrics_app(environ, start_response)
        why = not_ready()
        start_response("200 OK" if why is None else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8")])
        return [b"ok\n" if why is None else f"{why}\n".encode()]

    try:
        server = make_server(ip, port, app, _Server6 if ":" in ip else _Server, handler_class=_Quiet)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {ip}:{port}: {exc.strerror or exc}; pick another with "
                      f"--metrics.port") from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
