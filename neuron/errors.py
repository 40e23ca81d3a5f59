"""The error hierarchy, and its single mapping to gRPC status codes."""

from __future__ import annotations

import grpc


class NeuronError(Exception):
    """Base of the errors a peer may see; the message is safe to send to it."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(NeuronError):
    """Bad shapes, ids outside the vocabulary, limits exceeded, empty input."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(NeuronError):
    """Missing, bad, stale, replayed or mis-addressed signature."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(NeuronError):
    """Blacklisted: unregistered, too little stake, no validator permit, denied hotkey."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(NeuronError):
    """Queue full or rate limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(NeuronError):
    """The caller's deadline passed before the work could start."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(NeuronError):
    """The server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class BadResponse(NeuronError):
    """A peer's response is malformed or its signature does not verify (client side)."""

    code = grpc.StatusCode.DATA_LOSS


def check(condition: bool, message: str) -> None:
    """Raise InvalidArgument(message) unless condition: the explicit check for untrusted input."""
    if not condition:
        raise InvalidArgument(message)
