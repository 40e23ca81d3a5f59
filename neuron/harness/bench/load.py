"""`neuron bench --bench.only load`: a real miner process under ten times its capacity.

Capacity is `batching.max_generate_batch` streams decoding plus `batching.queue_size` requests waiting.
Ten times that many streams and forwards arrive at once: the figure is the share shed at once with
RESOURCE_EXHAUSTED, the latency of the admitted ones against the same calls alone, and the miner's
resident memory before, at its peak, and after (it must come back within 10% of before). Then another
caller's streams, timed on the idle miner, beside 100 streams one caller opens and never reads, and beside
100 it reads: a caller's share (--auth.max_in_flight, half the decode batch) keeps the others served.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from neuron import wire
from neuron.harness.bench.figure import Figure, percentile, status_kb
from neuron.pb.neuron.v1 import axon_pb2 as pb


@dataclass(frozen=True)
class LoadSizes:
    """The miner's capacity under test and the shape of each call."""

    max_generate_batch: int = 8  # streams decoding together
    queue_size: int = 32  # requests waiting for the model
    factor: int = 10  # offered load, in multiples of the capacity
    seq_len: int = 64  # tokens per Forward (one row, every position)
    topk: int = 8
    prompt_len: int = 16
    new_tokens: int = 32
    solo_calls: int = 5  # calls of each kind alone, before the load, for the baseline latency
    unread: int = 100  # streams opened and never read past their first chunk
    probes: int = 20  # another caller's streams, one after another, timed alone and beside the unread ones


QUICK_LOAD = LoadSizes(max_generate_batch=2, queue_size=4, seq_len=16, prompt_len=8, new_tokens=8, solo_calls=2,
                       unread=20, probes=5)


@dataclass
class Outcome:
    kind: str  # "stream" or "forward"
    code: grpc.StatusCode
    seconds: float


class _Miner:
    """A `neuron miner` subprocess (auth off) with the capacity under test."""

    def __init__(self, model: str, device: str, dtype: str, sizes: LoadSizes, workdir: Path):
        self.log = workdir / "load-miner.log"
        args = [sys.executable, "-m", "neuron.cli", "miner", "--model.name", model, "--model.device", device,
                "--model.dtype", dtype, "--subtensor.network", "none", "--auth.required", "false",
                "--axon.ip", "127.0.0.1", "--axon.port", "0", "--axon.grace_s", "1",
                "--batching.max_generate_batch", str(sizes.max_generate_batch),
                "--batching.queue_size", str(sizes.queue_size),
                # the default share of a caller: half the decode batch (8 of 16)
                "--auth.max_in_flight", str(max(1, sizes.max_generate_batch // 2))]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "HF_HUB_OFFLINE": "1"})

    async def port(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the miner did not start:\n{self.log.read_text()[-2000:]}")
            m = re.search(r"axon serving \S+ on [\d.]+:(\d+)", self.log.read_text())
            if m:
                return int(m.group(1))
            await asyncio.sleep(0.2)

    def rss_mib(self, field: str = "VmRSS") -> float:
        return status_kb(self.proc.pid, field) / 1024

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _timed(kind: str, call) -> Outcome:
    start = time.perf_counter()
    try:
        if kind == "stream":
            async for _ in call:
                pass
        else:
            await call
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
    return Outcome(kind, code, time.perf_counter() - start)


def _as(who: str) -> list[tuple[str, str]]:
    """The hotkey a caller claims (auth is off here; the miner's per-hotkey share still tells callers apart)."""
    from neuron.auth import HOTKEY_KEY

    return [(HOTKEY_KEY, who)]


async def _probe_ms(stream, body: bytes, n: int) -> list[float]:
    """Another caller's streams, one after another: the latency of each answered one, in ms."""
    out = [await _timed("stream", stream(body, timeout=600, metadata=_as("probe"))) for _ in range(n)]
    return [o.seconds * 1000 for o in out if o.code == grpc.StatusCode.OK]


async def _beside_crowd(stream, body: bytes, sizes: LoadSizes, read: bool) -> tuple[list[float], dict[str, int]]:
    """The probes while `sizes.unread` streams arrive at once and are read to the end, or read for one chunk
    and then left unread (held open until the probes are done); and how the crowd's calls were answered."""
    calls = [stream(body, timeout=600, metadata=_as("crowd")) for _ in range(sizes.unread)]
    codes: dict[str, int] = {}

    async def one(call) -> None:
        try:
            if read:
                async for _ in call:
                    pass
            else:
                await call.read()  # the first chunk; the rest is never asked for
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        codes[code] = codes.get(code, 0) + 1

    crowd = asyncio.gather(*(one(c) for c in calls))
    probes = await _probe_ms(stream, body, sizes.probes)
    await crowd
    for c in calls:
        c.cancel()
    return probes, codes


async def run_load(model: str, device: str, dtype: str, vocab_size: int, sizes: LoadSizes,
                   workdir: Path) -> tuple[list[Figure], list[str]]:
    """The load figures and a note with the raw numbers."""
    miner = _Miner(model, device, dtype, sizes, workdir)
    try:
        port = await miner.port()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        gen = torch.Generator().manual_seed(11)
        ids = torch.randint(3, vocab_size, (1, sizes.seq_len), generator=gen)
        forward_body = pb.ForwardRequest(input_ids=wire.to_pb(ids), topk=sizes.topk).SerializeToString()
        stream_body = pb.GenerateRequest(prompt_ids=ids[0, :sizes.prompt_len].tolist(),
                                         max_new_tokens=sizes.new_tokens).SerializeToString()
        forward = channel.unary_unary("/neuron.v1.Axon/Forward")
        stream = channel.unary_stream("/neuron.v1.Axon/GenerateStream")

        def calls(kind: str, n: int):  # each from a caller of its own: the load is many callers at once
            return [_timed(kind, stream(stream_body, timeout=600, metadata=_as(f"{kind}{i}")) if kind == "stream"
                           else forward(forward_body, timeout=600, metadata=_as(f"{kind}{i}"))) for i in range(n)]

        solo = [await c for _ in range(sizes.solo_calls) for c in calls("forward", 1) + calls("stream", 1)]
        if any(o.code != grpc.StatusCode.OK for o in solo):
            raise RuntimeError(f"the miner failed a call alone; see {miner.log}")
        before, peak_before = miner.rss_mib(), miner.rss_mib("VmHWM")
        n_streams = sizes.factor * sizes.max_generate_batch
        n_forwards = sizes.factor * sizes.queue_size
        started = time.perf_counter()
        load = await asyncio.gather(*calls("stream", n_streams), *calls("forward", n_forwards))
        wall = time.perf_counter() - started
        peak = miner.rss_mib("VmHWM")
        await asyncio.sleep(1.0)  # let the miner finish its bookkeeping before reading its memory
        after = miner.rss_mib()
        idle = await _probe_ms(stream, stream_body, sizes.probes)
        unread, unread_codes = await _beside_crowd(stream, stream_body, sizes, read=False)
        read, read_codes = await _beside_crowd(stream, stream_body, sizes, read=True)
        await channel.close()
    finally:
        miner.stop()

    codes: dict[str, int] = {}
    for o in load:
        codes[o.code.name] = codes.get(o.code.name, 0) + 1
    unexpected = {c: n for c, n in codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")}
    if unexpected:
        raise RuntimeError(f"under load the miner answered {unexpected}; see {miner.log}")
    shed = codes.get("RESOURCE_EXHAUSTED", 0)
    figures = [Figure("load_shed_share", f"shed at once (RESOURCE_EXHAUSTED) of {n_streams} streams + {n_forwards} "
                      f"forwards (10x capacity)", shed, len(load), shed / len(load), "calls")]
    note = [f"load: capacity {sizes.max_generate_batch} streams + queue {sizes.queue_size}; offered {n_streams} "
            f"streams of {sizes.new_tokens} tokens and {n_forwards} forwards of {sizes.seq_len} tokens at once; "
            f"answers {codes}; {wall:.1f} s in all"]
    for kind in ("stream", "forward"):
        ok = [o.seconds * 1000 for o in load if o.kind == kind and o.code == grpc.StatusCode.OK]
        refused = [o.seconds * 1000 for o in load if o.kind == kind and o.code != grpc.StatusCode.OK]
        alone = statistics.median(o.seconds * 1000 for o in solo if o.kind == kind)
        for q in (0.5, 0.99):
            figures.append(Figure(f"load_{kind}_p{round(q * 100)}_vs_alone",
                                  f"admitted {kind}s' p{round(q * 100)} latency under 10x load / alone",
                                  percentile(ok, q), alone, percentile(ok, q) / alone, "ms"))
        note.append(f"load {kind}s: {len(ok)} admitted (p50 {percentile(ok, 0.5):.0f} ms, p99 {percentile(ok, 0.99):.0f} "
                    f"ms; alone {alone:.0f} ms), {len(refused)} shed (p50 {percentile(refused, 0.5):.1f} ms, "
                    f"p99 {percentile(refused, 0.99):.1f} ms)")
    figures += [Figure("load_peak_rss_vs_before", "miner peak RSS during the load / RSS before it", peak, before,
                       peak / before, "MiB"),
                Figure("load_rss_after_vs_before", "miner RSS after the load / before it", after, before, after / before,
                       "MiB", "<= 1.10")]
    note.append(f"load memory: RSS {before:.0f} MiB before (peak so far {peak_before:.0f}), peak {peak:.0f} MiB, "
                f"{after:.0f} MiB after")
    figures += [Figure("unread_probe_p99_vs_idle", f"another caller's stream p99 beside {sizes.unread} unread streams "
                       "/ on an idle miner", percentile(unread, 0.99), percentile(idle, 0.99),
                       percentile(unread, 0.99) / percentile(idle, 0.99), "ms", "<= 2"),
                Figure("unread_probe_p99_vs_read", f"another caller's stream p99 beside {sizes.unread} unread streams "
                       f"/ beside {sizes.unread} streams read to the end", percentile(unread, 0.99),
                       percentile(read, 0.99), percentile(unread, 0.99) / percentile(read, 0.99), "ms")]
    for label, xs, codes in (("idle", idle, {}), ("unread", unread, unread_codes), ("read", read, read_codes)):
        note.append(f"probes {label}: {len(xs)} of {sizes.probes} answered, p50 {percentile(xs, 0.5):.0f} ms, "
                    f"p99 {percentile(xs, 0.99):.0f} ms" + (f"; the {sizes.unread} crowd streams: {codes}" if codes else ""))
    return figures, note
