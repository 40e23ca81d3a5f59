"""One way for a long-running command to stop: SIGTERM or SIGINT set an event that the command awaits."""

from __future__ import annotations

import asyncio
import contextlib
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def until_signalled(stop: asyncio.Event):
    """SIGTERM and SIGINT set `stop` while the block runs (installed first thing, so a signal during a slow
    start-up still ends in a clean shutdown); the previous handlers come back afterwards."""
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
