"""`neuron bench --bench.only gateway`: what the OpenAI gateway costs over going to the miners directly.

Real miners (`neuron miner` processes serving --model.name, tiny unless named: one thread each, on loopback,
signed) on a local chain, verified by
one validator round; a gateway (auth off) in front of them. The same requests go through the gateway
(HTTP + SSE) and straight to a miner with the validator's dendrite, in alternation: one stream's
tokens/s, many concurrent users' tokens/s, the time to first token added, and the validator's judging cost
per verified user token against a miner's cost per generated token. The miners run apart, as in a
deployment; the validator, its gateway and the users' HTTP clients (one each) share this process and its
event loop, so the clients' parsing is counted against the gateway (a conservative figure). On tiny a token
costs a miner about as much CPU as the gateway spends relaying it (the worst case for the ratios); on a real
model the gateway's share shrinks with the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from neuron import protocol
from neuron.harness.bench.figure import NETUID, Figure, alternate, percentile
from neuron.harness.mocknet import dev_wallet
from neuron.config import ValidatorConfig, with_overrides
from neuron.model import LoadedModel


@dataclass(frozen=True)
class GatewaySizes:
    miners: int = 4
    users: int = 32  # concurrent users in the concurrency figure
    prompt_len: int = 16
    new_tokens: int = 48
    reps: int = 3  # alternations of each throughput figure
    ttft_pairs: int = 30  # alternations of single short requests for the first-token figure
    judge_batch: int = 32  # user answers judged in one verify_users call


QUICK_GATEWAY = GatewaySizes(miners=2, users=4, new_tokens=8, reps=1, ttft_pairs=4, judge_batch=4)
STARTUP_TIMEOUT_S = 120.0  # how long the miner processes may take to load and serve
# The bench is the flood it means to measure: no rate limit; as large a Forward batch as the in-process axons had.
MINER_FLAGS = ("--auth.rate_per_s", "1e9", "--auth.burst", str(10**9), "--auth.max_in_flight", "0",
               "--limits.max_batch", "64")


class _Net:
    """A local chain, `n` miner processes, a validator that ran one round, and a gateway on port 0."""

    def __init__(self) -> None:
        self.nodes: list = []  # neuron.harness.mocknet.Node, one per miner process
        self.clients: list[httpx.AsyncClient] = []  # one per concurrent user
        self.server = self.task = self.gw = self.validator = None

    async def start(self, lm: LoadedModel, sizes: GatewaySizes, workdir: Path, model: str) -> "_Net":
        from neuron.chain.local import LocalChain
        from neuron.gateway.app import Gateway, serve_gateway
        from neuron.harness.mocknet import Node, start_miner, wait_serving
        from neuron.validator.loop import Validator

        self.lm, self.sizes, self.model = lm, sizes, model
        wallets, logs = workdir / "gw-wallets", workdir / "gw-logs"
        logs.mkdir(parents=True, exist_ok=True)
        chain = LocalChain(workdir / "gateway-chain.sqlite", block_time=0.05)
        chain.create_subnet(NETUID, weights_rate_limit=1, min_validator_stake=1.0, max_validators=2)
        vwallet = dev_wallet(wallets, "validator")
        chain.register(NETUID, vwallet)
        chain.add_stake(NETUID, vwallet.hotkey.ss58_address, 100.0)
        for i in range(sizes.miners):
            node = Node(f"miner{i}", "honest", dev_wallet(wallets, f"miner{i}"))
            node.uid, _ = chain.register(NETUID, node.wallet)
            self.nodes.append(node)
        device_flags = ("--model.device", str(lm.device), "--model.dtype", str(lm.dtype).removeprefix("torch."))
        for node in self.nodes:  # appended first, started after: close() stops whatever did start
            start_miner(node, chain.path, NETUID, wallets, logs, model, extra=MINER_FLAGS + device_flags)
        await asyncio.to_thread(wait_serving, chain, NETUID, self.nodes, STARTUP_TIMEOUT_S)
        config = with_overrides(ValidatorConfig(), **{
            "model.name": model, "subtensor.netuid": NETUID, "timeout_s": 60.0, "epoch_rounds": 1,
            "state_path": str(workdir / "gw-state.json"), "max_new_tokens": 8, "gateway.auth": False,
            "gateway.verify_fraction": 0.0, "gateway.min_streak": 1})  # judging is measured apart, not inside the throughput figures
        self.validator = v = Validator(config, chain, vwallet, lm)
        await v.run_round()
        if len(v.pool.standing) != sizes.miners:
            raise RuntimeError(f"the round verified {len(v.pool.standing)} of {sizes.miners} miners")
        self.miners = [m for u, m in sorted(v.pool.serving(await v.pool.metagraph()).items()) if u in v.pool.standing]
        self.gw = Gateway(config.gateway, v.pool, lm, model, v.verify_users, deadline_s=config.timeout_s, mix=None)
        self.server, self.task, port = await serve_gateway(self.gw, "127.0.0.1", 0)
        # One client (one connection) per user, as users are: a single pool shared by every user costs its
        # owner a scan of all its connections per event (httpcore), which is the client's cost, not the gateway's.
        self.clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120,
                                          limits=httpx.Limits(max_connections=1)) for _ in range(sizes.users)]
        return self

    async def close(self) -> None:
        """Whatever `start` got to, stopped; the miner processes always (SIGTERM, then SIGKILL)."""
        from neuron.harness.mocknet import stop

        try:
            for client in self.clients:
                with contextlib.suppress(Exception):
                    await client.aclose()
            if self.server is not None:
                self.server.should_exit = True
                with contextlib.suppress(Exception):
                    await self.task
            if self.gw is not None:
                await self.gw.stop()
            if self.validator is not None:
                await self.validator.close()
        finally:
            await asyncio.to_thread(stop, self.nodes)

    def body(self, seed: int, max_tokens: int) -> dict:
        prompt = [(seed * 7919 + i * 104729) % (self.lm.vocab_size - 3) + 3 for i in range(self.sizes.prompt_len)]
        return {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.95,
                "seed": seed, "stream": True}

    async def via_gateway(self, body: dict, user: int = 0) -> tuple[int, float]:
        """(tokens, seconds to the first token) of one streamed request through the gateway, from `user`'s client."""
        started, first, tokens = time.perf_counter(), 0.0, 0
        async with self.clients[user].stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"the gateway answered {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"finish_reason":null' in line:
                    tokens += 1
                    first = first or time.perf_counter() - started
        return tokens, first

    async def direct(self, body: dict, miner) -> tuple[int, float]:
        """The same request as the gateway would send it, straight to `miner` with the validator's dendrite."""
        from neuron.gateway import openai_api as oa

        request = self.gw.completion_ask(oa.CompletionRequest.model_validate(body)).request
        started, first, tokens = time.perf_counter(), 0.0, 0
        async for _ in self.gw.dendrite.stream(miner.target, request, 120):
            tokens += 1
            first = first or time.perf_counter() - started
        return tokens, first


async def run_gateway(lm: LoadedModel, sizes: GatewaySizes, workdir: Path,
                      model: str = "tiny") -> tuple[list[Figure], list[str]]:
    """The gateway's figures over miner processes serving `model` (`lm` is the validator's copy of it)."""
    net = _Net()
    try:
        await net.start(lm, sizes, workdir, model)
        return await _figures(net, sizes)
    finally:
        await net.close()


async def _figures(net: _Net, sizes: GatewaySizes) -> tuple[list[Figure], list[str]]:
    one = net.miners[0]
    net.gw.pool.set_standing({one.uid: 1.0})  # the single-stream figures: the same miner both ways

    def single(fn):
        async def measure():
            started = time.perf_counter()
            tokens, _ = await (net.via_gateway(net.body(1, sizes.new_tokens)) if fn == "gw"
                               else net.direct(net.body(1, sizes.new_tokens), one))
            return tokens / (time.perf_counter() - started)
        return measure

    await single("gw")(), await single("direct")()  # warm both paths
    gw1, d1 = await alternate(sizes.reps, single("gw"), single("direct"))

    ttft_gw, ttft_d = [], []
    for i in range(sizes.ttft_pairs):
        ttft_gw.append((await net.via_gateway(net.body(100 + i, 1)))[1])
        ttft_d.append((await net.direct(net.body(100 + i, 1), one))[1])
    added = [g - d for g, d in zip(ttft_gw, ttft_d)]

    net.gw.pool.set_standing({m.uid: 1.0 for m in net.miners})

    cpu: dict[str, list[float]] = {"gw": [], "direct": []}  # this process's CPU seconds per token, each crowd run

    def crowd(fn):
        async def measure():
            started, cpu_started = time.perf_counter(), time.process_time()
            if fn == "gw":
                runs = [net.via_gateway(net.body(1000 + i, sizes.new_tokens), i) for i in range(sizes.users)]
            else:
                runs = [net.direct(net.body(1000 + i, sizes.new_tokens), net.miners[i % len(net.miners)])
                        for i in range(sizes.users)]
            done = await asyncio.gather(*runs)
            tokens = sum(t for t, _ in done)
            cpu[fn].append((time.process_time() - cpu_started) / max(1, tokens))
            return tokens / (time.perf_counter() - started)
        return measure

    gwn, dn = await alternate(sizes.reps, crowd("gw"), crowd("direct"))

    judge_s, gen_s = await _judging(net, sizes)
    ms = 1000.0
    figures = [
        Figure.paired("gateway_1_stream_vs_direct", "1 stream tokens/s: gateway / dendrite direct (same miner)",
                      gw1, d1, "tok/s", ">= 0.95"),
        Figure.paired(f"gateway_{sizes.users}_users_vs_direct",
                      f"{sizes.users} concurrent users over {len(net.miners)} miners, tokens/s: gateway / direct",
                      gwn, dn, "tok/s", ">= 0.9"),
        Figure.paired("gateway_cpu_per_token", f"CPU of this process per token, {sizes.users} users: gateway (server "
                      "and HTTP clients) / direct (dendrite)", [x * ms for x in cpu["gw"]],
                      [x * ms for x in cpu["direct"]], "ms"),
        Figure("gateway_ttft_added_p50", "time to first token, p50: gateway / direct",
               percentile(ttft_gw, 0.5) * ms, percentile(ttft_d, 0.5) * ms,
               statistics.median(g / d for g, d in zip(ttft_gw, ttft_d)), "ms"),
        Figure("gateway_judge_vs_generate_per_token",
               f"validator judging s/token ({sizes.judge_batch} answers a batch) / a miner's generation s/token",
               judge_s * ms, gen_s * ms, judge_s / gen_s, "ms"),
    ]
    notes = [f"gateway: added time to first token (gateway - direct, {len(added)} pairs): "
             f"p50 {percentile(added, 0.5) * ms:.2f} ms, p99 {percentile(added, 0.99) * ms:.2f} ms; "
             f"judging {judge_s * ms:.3f} ms per verified user token; miners in their own processes (one thread each), "
             "one HTTP client per user in the gateway's process"]
    return figures, notes


async def _judging(net: _Net, sizes: GatewaySizes) -> tuple[float, float]:
    """The validator's `verify_users` seconds per token over a batch of honest answers, and a miner's own
    seconds per generated token for the same batch (all of it in flight at once, over the miners)."""
    from neuron.gateway import openai_api as oa

    asked = [net.gw.completion_ask(oa.CompletionRequest.model_validate(net.body(5000 + i, sizes.new_tokens)))
             for i in range(sizes.judge_batch)]

    async def answer(i: int):
        miner = net.miners[i % len(net.miners)]
        started = time.perf_counter()
        chunks = [c async for c in net.gw.dendrite.stream(miner.target, asked[i].request, 120)]
        seconds = time.perf_counter() - started
        decoded = protocol.decode_stream(chunks, asked[i].check.spec.max_new_tokens)
        return miner.uid, miner.hotkey, asked[i].check, decoded, seconds

    started = time.perf_counter()
    items = await asyncio.gather(*(answer(i) for i in range(sizes.judge_batch)))
    gen_wall = time.perf_counter() - started
    tokens = sum(len(a.token_ids) for _, _, _, a, _ in items)
    started = time.perf_counter()
    verdicts = await net.validator.verify_users(list(items))
    judge_wall = time.perf_counter() - started
    if len(verdicts) != len(items) or not all(v.verified for v in verdicts):
        raise RuntimeError(f"honest answers were not all verified: {[v.reason for v in verdicts if not v.verified]}")
    return judge_wall / max(1, tokens), gen_wall / max(1, tokens)
