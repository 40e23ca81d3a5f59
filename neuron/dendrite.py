"""The gRPC client: signs requests, fans out to many axons with deadlines, verifies signed answers.

One bad peer never raises: every call returns a PeerResult with the response or the status.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Iterable

import grpc
from bittensor import http_auth

from neuron import auth
from neuron.errors import BadResponse
from neuron.pb.neuron.v1 import axon_pb2 as pb

SERVICE = "/neuron.v1.Axon/"
RESPONSES = {"Info": pb.InfoResponse, "Forward": pb.ForwardResponse, "Generate": pb.GenerateResponse,
             "GenerateStream": pb.GenerateChunk}


@dataclass(frozen=True)
class Target:
    """An axon to query: its address and the hotkey it must answer as ("" to skip the check)."""

    address: str  # host:port
    hotkey: str = ""


@dataclass
class PeerResult:
    """One peer's answer: `response` when code is OK, otherwise the status and its message."""

    target: Target
    code: grpc.StatusCode
    message: str = ""
    response: Any = None  # the parsed message, or a list of chunks for GenerateStream
    latency_s: float = 0.0
    signed: bool = False  # the answer carried a valid signature from target.hotkey

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


class Dendrite:
    """Holds one channel per address; `keypair` signs requests (None sends them unsigned)."""

    def __init__(self, keypair=None, max_message_bytes: int = 80 * 1024 * 1024):
        self.keypair = keypair
        self.hotkey = keypair.ss58_address if keypair is not None else ""
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes)]
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Responses carry fresh nonces too: a replayed answer is refused like a replayed request.
        self._nonces = http_auth.InMemoryNonceStore(retention=120.0)

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
        return self._channels[address]

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)

    def _metadata(self, method: str, body: bytes, target: Target) -> tuple[list[tuple[str, str]], str]:
        if self.keypair is None:
            return [], "0"
        meta = auth.sign(self.keypair, auth.REQUEST, method, body, target.hotkey)
        return meta, dict(meta)[auth.NONCE_KEY]

    def _check_signature(self, method: str, nonce: str, body: bytes, trailing, target: Target) -> bool:
        """True when the answer is signed by target.hotkey for us and this request; BadResponse if forged."""
        if not target.hotkey or self.keypair is None:
            return False
        headers = auth.auth_headers(trailing or ())
        if not headers:
            raise BadResponse("the answer is not signed")
        caller = auth.verify(headers, body, method=auth.RESPONSE, path=auth.response_path(method, nonce),
                             self_hotkey=self.hotkey, nonce_store=self._nonces, max_age=60.0, allowed_skew=5.0)
        if caller.hotkey_ss58 != target.hotkey:
            raise BadResponse(f"the answer is signed by {caller.hotkey_ss58[:8]}, not by the queried hotkey")
        return True

    async def call(self, target: Target, name: str, request, timeout: float) -> PeerResult:
        """One unary call (Info, Forward, Generate)."""
        method = SERVICE + name
        body = request.SerializeToString()
        meta, nonce = self._metadata(method, body, target)
        stub = self.channel(target.address).unary_unary(method)
        start = time.monotonic()
        try:
            call = stub(body, timeout=timeout, metadata=meta)
            raw = await call
            trailing = await call.trailing_metadata()
            signed = self._check_signature(method, nonce, raw, trailing, target)
            response = RESPONSES[name].FromString(raw)
            return PeerResult(target, grpc.StatusCode.OK, "", response, time.monotonic() - start, signed)
        except grpc.aio.AioRpcError as exc:
            return PeerResult(target, exc.code(), exc.details() or "", None, time.monotonic() - start)
        except (BadResponse, auth.Unauthenticated) as exc:
            return PeerResult(target, BadResponse.code, f"bad answer: {exc}", None, time.monotonic() - start)
        except Exception as exc:  # a malformed answer must not take the validator down
            return PeerResult(target, BadResponse.code, f"bad answer: {type(exc).__name__}: {exc}", None,
                              time.monotonic() - start)

    async def stream(self, target: Target, request: pb.GenerateRequest, timeout: float):
        """GenerateStream: yields chunks as they come; the signature is checked at the end (BadResponse).

        Closing the generator early cancels the call on the miner.
        """
        method = SERVICE + "GenerateStream"
        body = request.SerializeToString()
        meta, nonce = self._metadata(method, body, target)
        call = self.channel(target.address).unary_stream(method)(body, timeout=timeout, metadata=meta)
        chunks = []
        try:
            async for raw in call:
                chunks.append(raw)
                yield pb.GenerateChunk.FromString(raw)
            self._check_signature(method, nonce, auth.stream_digest(chunks), await call.trailing_metadata(), target)
        finally:
            call.cancel()

    async def stream_all(self, target: Target, request: pb.GenerateRequest, timeout: float) -> PeerResult:
        """A whole stream as one PeerResult (response: the list of chunks)."""
        start = time.monotonic()
        chunks: list[pb.GenerateChunk] = []
        try:
            async for c in self.stream(target, request, timeout):
                chunks.append(c)
            # stream() checked the signature whenever there was one to check (see _check_signature).
            signed = bool(target.hotkey) and self.keypair is not None
            return PeerResult(target, grpc.StatusCode.OK, "", chunks, time.monotonic() - start, signed)
        except grpc.aio.AioRpcError as exc:
            return PeerResult(target, exc.code(), exc.details() or "", chunks, time.monotonic() - start)
        except Exception as exc:
            return PeerResult(target, BadResponse.code, f"bad answer: {exc}", chunks, time.monotonic() - start)

    async def query(self, targets: Iterable[Target], name: str, request, timeout: float) -> list[PeerResult]:
        """The same request to many axons at once; one result per target, in order."""
        return list(await asyncio.gather(*(self.call(t, name, request, timeout) for t in targets)))
