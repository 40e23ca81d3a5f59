"""The gRPC server: a thin servicer, and one guard that authenticates, admits, signs, logs and maps errors."""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from google.protobuf.message import DecodeError
from loguru import logger

from neuron import auth, protocol
from neuron.chain.base import Metagraph
from neuron.config import MinerConfig
from neuron.detokenize import Detokenizer
from neuron.engine.types import Engine, FinishReason
from neuron.errors import InvalidArgument, NeuronError
from neuron.pb.neuron.v1 import axon_pb2 as pb
from neuron.pb.neuron.v1 import axon_pb2_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Axon"].full_name


@dataclass(frozen=True)
class Peer:
    """The admitted caller of the current request."""

    hotkey: str
    stake: float


_PEER: contextvars.ContextVar[Peer] = contextvars.ContextVar("peer", default=Peer("", 0.0))


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class AxonServicer(axon_pb2_grpc.AxonServicer):
    """Decode, check, hand to the engine, encode. Text and stop strings are added here, for every backend."""

    def __init__(self, engine: Engine, config: MinerConfig, hotkey: str):
        self.engine, self.limits, self.hotkey = engine, config.limits, hotkey
        self.info = engine.info()
        self.tokenizer = engine.tokenizer

    async def Info(self, request, context):
        return protocol.info(self.info, self.limits, self.hotkey)

    async def Forward(self, request, context):
        job = protocol.forward_job(request, self.limits, self.info)
        out = await self.engine.forward(job, priority=-_PEER.get().stake, deadline=_deadline(context))
        return protocol.forward_response(job, out)

    async def Generate(self, request, context):
        job, stop = protocol.generate_job(request, self.limits, self.info, self.tokenizer)
        return protocol.response([c async for c in self._chunks(job, stop, context)])

    async def GenerateStream(self, request, context):
        job, stop = protocol.generate_job(request, self.limits, self.info, self.tokenizer)
        async for c in self._chunks(job, stop, context):
            yield c

    async def _chunks(self, job, stop: tuple[str, ...], context):
        """The engine's steps as chunks with text; a stop string ends the generation (and aborts it)."""
        steps = self.engine.generate(job, priority=-_PEER.get().stake, deadline=_deadline(context))
        detok, start = Detokenizer(self.tokenizer, stop), time.monotonic()
        try:
            async for step in steps:
                text = detok.add(step.token_id, last=step.finish_reason is not None)
                finish = FinishReason.STOP_SEQUENCE if detok.stopped else step.finish_reason
                msg = protocol.chunk(step, text, finish)
                if finish is not None:
                    queue_ms = getattr(steps, "queue_ms", 0.0)
                    compute = (time.monotonic() - start) * 1000 - queue_ms
                    msg.timings.CopyFrom(protocol.timings(len(job.prompt_ids), queue_ms, compute))
                yield msg
                if finish is not None:
                    return
        finally:
            await steps.aclose()  # a no-op when finished; stops the decoding when the caller went away


class Guard(grpc.aio.ServerInterceptor):
    """Wraps every Axon method: bound the body, verify the signature on the raw bytes, admit, parse, run,
    sign the answer, and log one line per finished call.

    Handlers are rebuilt to take and return raw bytes, so the signature covers exactly what
    travelled. NeuronErrors become their status codes here, and nowhere else. Info passes through
    here too (its errors are mapped the same way) but needs no signature: it does no model work.
    """

    def __init__(self, config: MinerConfig, keypair, metagraph: Callable[[], Metagraph | None]):
        self.config = config
        self.keypair = keypair
        self.hotkey = keypair.ss58_address if keypair is not None else ""
        self.admission = auth.Admission(config.auth, metagraph)
        self.max_bytes = protocol.max_request_bytes(config.limits)
        self.metrics = None  # a neuron.metrics.MinerMetrics, set by the miner when --metrics.port is on

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE}/"):
            return handler  # health and reflection are public: they do no model work
        method = details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary, handler.request_deserializer, handler.response_serializer))
        return grpc.unary_stream_rpc_method_handler(
            self._stream(method, handler.unary_stream, handler.request_deserializer, handler.response_serializer))

    def _admit(self, method: str, raw: bytes, context) -> tuple[Peer, str]:
        """The admitted peer and the request's nonce; raises Unauthenticated / PermissionDenied / ResourceExhausted."""
        headers = auth.auth_headers(context.invocation_metadata() or ())
        if not self.config.auth.required:
            return Peer(headers.get(auth.HOTKEY_KEY, "")[:64], 0.0), headers.get(auth.NONCE_KEY, "0")[:32]
        if method.endswith("/Info"):
            return Peer("", 0.0), "0"  # public: answered unsigned to anyone
        a = self.config.auth
        caller = auth.verify(headers, raw, method=auth.REQUEST, path=method, self_hotkey=self.hotkey,
                             nonce_store=auth.SignatureOnly(), max_age=a.max_age_s, allowed_skew=a.allowed_skew_s)
        stake = self.admission.admit(caller.hotkey_ss58, caller.nonce_ns)
        return Peer(caller.hotkey_ss58, stake), str(caller.nonce_ns)

    def _open(self, call: "_Call", raw: bytes, context, deserialize):
        """The admitted, parsed request and its nonce. The body's size is checked first: a body larger than
        any valid request of this RPC is refused before it is hashed, parsed or looked at."""
        limit = self.max_bytes[_short(call.method)]
        if len(raw) > limit:
            raise InvalidArgument(f"the request has {len(raw)} bytes; no valid {_short(call.method)} request "
                                  f"has more than {limit} under this miner's limits")
        call.peer, nonce = self._admit(call.method, raw, context)
        if call.peer.hotkey and not call.method.endswith("/Info"):  # its share (auth off: the hotkey it claims)
            self.admission.enter(call.peer.hotkey)
            call.held = True
        _PEER.set(call.peer)
        try:
            return deserialize(raw), nonce
        except DecodeError:
            raise InvalidArgument("the request is not a valid protobuf message") from None

    def _leave(self, call: "_Call") -> None:
        if call.held:
            self.admission.leave(call.peer.hotkey)
            call.held = False

    def _sign(self, method: str, nonce: str, body: bytes, peer: Peer) -> list[tuple[str, str]]:
        if self.keypair is None or not peer.hotkey or method.endswith("/Info"):
            return []
        return auth.sign(self.keypair, auth.RESPONSE, auth.response_path(method, nonce), body, peer.hotkey)

    def _unary(self, method, inner, deserialize, serialize):
        async def behavior(raw: bytes, context):
            call = _Call(method)
            try:
                request, nonce = self._open(call, raw, context, deserialize)
                del raw  # the parsed request is all that is needed from here on
                answer = await inner(request, context)
                body = serialize(answer)
                context.set_trailing_metadata(self._sign(method, nonce, body, call.peer))
                call.outcome, call.tokens = "OK", len(getattr(answer, "token_ids", ()))
                return body
            except BaseException as exc:
                call.failed(exc, context)
                if call.status is None:
                    raise  # cancelled: there is nobody to answer
            finally:
                self._leave(call)
                call.log(context, self.metrics)
            call.answer(context)
            return None  # with a status set, gRPC sends it and no message
        return behavior

    def _stream(self, method, inner, deserialize, serialize):
        # A coroutine writing with context.write rather than an async generator: a client's cancel then
        # arrives here, at once, as CancelledError, so the servicer's generator is closed (and the engine
        # told) now, not whenever the garbage collector finalises an abandoned generator.
        async def behavior(raw: bytes, context):
            call, sent = _Call(method), []
            try:
                request, nonce = self._open(call, raw, context, deserialize)
                del raw
                chunks = inner(request, context)
                try:
                    async for msg in chunks:
                        body = serialize(msg)
                        sent.append(body)
                        await context.write(body)
                finally:
                    await chunks.aclose()
                context.set_trailing_metadata(self._sign(method, nonce, auth.stream_digest(sent), call.peer))
                call.outcome, call.tokens = "OK", len(sent)
            except BaseException as exc:
                call.failed(exc, context)
                if call.status is None:
                    raise
            finally:
                self._leave(call)
                call.detail = call.detail or f"{len(sent)} chunks"
                call.log(context, self.metrics)
            call.answer(context)
        return behavior


class _Call:
    """One call's outcome as the guard records it: the status to answer with, and its log line."""

    def __init__(self, method: str):
        self.method, self.start, self.peer = method, time.monotonic(), Peer("", 0.0)
        self.outcome, self.detail = "", ""
        self.status: grpc.StatusCode | None = None
        self.message = ""
        self.tokens = 0  # generated tokens answered
        self.held = False  # counted in its hotkey's calls in flight

    def failed(self, exc: BaseException, context) -> None:
        """Record what `exc` means for the caller; status stays None when nobody is left to answer."""
        if isinstance(exc, NeuronError):
            self.status, self.message = exc.code, str(exc) or exc.code.name
            self.outcome, self.detail = exc.code.name, self.message
        elif isinstance(exc, asyncio.CancelledError):
            remaining = context.time_remaining()
            self.outcome = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
        elif isinstance(exc, Exception):
            logger.opt(exception=exc).error(f"{_short(self.method)} from {self.peer.hotkey[:8] or '-'}: internal error")
            self.status, self.message = grpc.StatusCode.INTERNAL, "internal error (logged on the miner)"
            self.outcome = "INTERNAL"
        else:
            self.outcome = type(exc).__name__

    def answer(self, context) -> None:
        """Set the recorded status, outside any except block and without raising: `context.abort` would
        raise an error whose traceback holds the handler's frame (and the request in it), and gRPC keeps
        that error in a reference cycle, so every refused request lived until the next GC pass."""
        if self.status is not None:
            context.set_code(self.status)
            context.set_details(self.message)

    def log(self, context, metrics=None) -> None:
        """The call's one log line (naming the hotkey a refused caller claimed), and its metrics."""
        outcome, detail, peer = self.outcome or "CANCELLED", self.detail, self.peer
        if outcome in ("PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"):
            claimed = peer.hotkey or auth.auth_headers(context.invocation_metadata() or ()).get(auth.HOTKEY_KEY, "")
            peer, detail = Peer(claimed[:64], 0.0), f"{detail} (hotkey {claimed[:64] or '-'})"
        _log(self.method, peer, outcome, self.start, detail)
        if metrics is not None:
            metrics.observe_request(_short(self.method), outcome, time.monotonic() - self.start, detail)
            if self.tokens:
                metrics.observe_tokens(self.tokens)


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def _log(method: str, peer: Peer, outcome: str, start: float, detail: str = "") -> None:
    ms = (time.monotonic() - start) * 1000
    line = f"{_short(method)} from {peer.hotkey[:8] or '-'} {outcome} {ms:.1f} ms" + (f": {detail}" if detail else "")
    (logger.info if outcome in ("OK", "CANCELLED") else logger.warning)(line)


class Axon:
    """The server, created apart from running: `await Axon(...).start()` binds and returns the port.

    It only serves: whoever opened the engine starts it before the axon and stops it after (the miner).
    """

    def __init__(self, engine: Engine, config: MinerConfig, keypair=None,
                 metagraph: Callable[[], Metagraph | None] = lambda: None, servicer_factory=AxonServicer):
        self.config = config
        self.engine = engine  # served, not owned
        self.guard = Guard(config, keypair, metagraph)
        self.health = health.aio.HealthServicer()
        options = [("grpc.max_receive_message_length", config.limits.max_message_bytes),
                   ("grpc.max_send_message_length", protocol.MAX_RESPONSE_BYTES + 1024 * 1024),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(interceptors=[self.guard], options=options)
        axon_pb2_grpc.add_AxonServicer_to_server(servicer_factory(engine, config, self.guard.hotkey), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port: int | None = None
        self.down: str | None = "starting"  # why the axon does not serve (the readiness probe's answer); None: serving

    async def start(self) -> int:
        self.port = self.server.add_insecure_port(f"{self.config.axon.ip}:{self.config.axon.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.axon.ip}:{self.config.axon.port} (in use?)")
        await self.server.start()
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.down = None
        logger.info(f"axon serving {SERVICE} on {self.config.axon.ip}:{self.port}")
        return self.port

    async def stop(self, grace: float | None = None, why: str = "shutting down") -> None:
        """Health NOT_SERVING (watchers told at once), refuse new calls, let in-flight ones finish for `grace`
        seconds. The engine is left running: its owner stops it next."""
        self.down = why
        await self.health.enter_graceful_shutdown()
        grace = self.config.axon.grace_s if grace is None else grace
        await self.server.stop(grace)
        logger.info("axon stopped")
