"""Simulated users for the mock network: a few clients of the gateway, each with the official `openai` client."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import openai
from loguru import logger

from neuron.dataset import PromptSource
from neuron.validator.judge import Outcome


@dataclass(frozen=True)
class Sent:
    """One user request as its client saw it."""

    started: float  # time.monotonic() when it was sent
    status: str  # "ok", the HTTP status of a refusal, "stream" (an error event mid-answer) or "connection"
    uid: int = -1  # the miner that served it (the gateway's x-neuron-miner-uid header); -1 when none did
    tokens: int = 0  # completion tokens received
    first_s: float = 0.0  # to the first streamed token, or to the whole answer when not streaming
    retry_after_s: float = 0.0  # the gateway's Retry-After on a refusal


# What applications send: greedy, nucleus sampling, top-k sampling (an extra field, as vLLM's clients send it).
SAMPLING = ({"temperature": 0.0}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 0.8, "extra_body": {"top_k": 40}})


class Users:
    """`n` users, each sending completions one after another until `stop`: half of them streamed, prompts from
    the corpus, `max_tokens(rng)` tokens, greedy or sampled (SAMPLING), some with a seed."""

    def __init__(self, base_url: str, model: str, n: int, max_tokens: Callable[[random.Random], int],
                 source: PromptSource | None = None, timeout_s: float = 60.0, api_key: str = "mocknet",
                 think_s: float = 0.5):
        self.base_url, self.model, self.n, self.max_tokens = base_url, model, n, max_tokens
        self.source = source or PromptSource.default()
        self.timeout_s, self.api_key = timeout_s, api_key  # any key passes a gateway without auth
        self.think_s = think_s  # mean pause between one user's requests
        self.sent: list[Sent] = []
        self.started = self.stopped = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Send until `stop` is set; the requests in flight then finish."""
        self.started = time.monotonic()
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0, timeout=self.timeout_s)
        try:
            await asyncio.gather(*(self._user(i, client, stop) for i in range(self.n)))
        finally:
            self.stopped = time.monotonic()
            await client.close()

    async def _user(self, i: int, client: openai.AsyncOpenAI, stop: asyncio.Event) -> None:
        rng = random.Random()
        stream = bool(i % 2)
        while not stop.is_set():
            sent = await self._one(client, rng, stream)
            self.sent.append(sent)
            stream = not stream
            # A person reads the answer before the next request; a client told to wait (429, 503) waits.
            pause = min(sent.retry_after_s, 5.0) if sent.retry_after_s else rng.uniform(0.0, 2 * self.think_s)
            try:
                await asyncio.wait_for(stop.wait(), pause)
            except asyncio.TimeoutError:
                pass

    async def _one(self, client: openai.AsyncOpenAI, rng: random.Random, stream: bool) -> Sent:
        args = {"model": self.model, "prompt": self.source.sample_span(rng, 40, 240), "max_tokens": self.max_tokens(rng),
                **rng.choice(SAMPLING),
                **({"seed": rng.getrandbits(31)} if rng.random() < 0.3 else {})}
        started = time.monotonic()
        try:
            if not stream:
                raw = await client.completions.with_raw_response.create(**args)
                c = raw.parse()
                return Sent(started, "ok", int(raw.headers["x-neuron-miner-uid"]), c.usage.completion_tokens,
                            time.monotonic() - started)
            raw = await client.completions.with_raw_response.create(**args, stream=True,
                                                                    stream_options={"include_usage": True})
            uid, first, tokens = int(raw.headers["x-neuron-miner-uid"]), 0.0, 0
            async for chunk in raw.parse():
                if chunk.choices and not first:
                    first = time.monotonic() - started
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return Sent(started, "ok", uid, tokens, first)
        except openai.APIStatusError as exc:
            retry = exc.response.headers.get("retry-after", "")
            return Sent(started, str(exc.status_code), retry_after_s=float(retry) if retry.isdigit() else 0.0)
        except openai.APIConnectionError:
            return Sent(started, "connection")
        except openai.APIError:  # the gateway's error event after some tokens: the miner failed mid-answer
            return Sent(started, "stream")

    def tokens_since(self, uid: int, since: float) -> int:
        """Tokens `uid` delivered in requests sent after `since` (a time.monotonic())."""
        return sum(s.tokens for s in self.sent if s.uid == uid and s.started > since)

    def summary(self) -> dict:
        """Requests, answered share, errors by status, time to first token, tokens per second."""
        ok = [s for s in self.sent if s.status == "ok"]
        first = sorted(s.first_s for s in ok)
        tokens = sum(s.tokens for s in ok)
        elapsed = max(1e-9, (self.stopped or time.monotonic()) - self.started)
        return {"users": self.n, "requests": len(self.sent), "ok": len(ok),
                "answered": len(ok) / len(self.sent) if self.sent else 0.0,
                "errors": dict(Counter(s.status for s in self.sent if s.status != "ok")),
                "ttft_p50_ms": 1000 * percentile(first, 0.5), "ttft_p99_ms": 1000 * percentile(first, 0.99),
                "tokens": tokens, "tokens_per_s": tokens / elapsed if self.sent else 0.0, "seconds": elapsed}


class Traffic:
    """`n` simulated users beside a validator `v` and its gateway `gw`, started once a round verified a miner,
    and what they got round by round: tokens per uid, and tokens from each cheat after it was flagged."""

    def __init__(self, gw, v, model: str, n: int, base_url: str):
        self.gw, self.v = gw, v
        # max_tokens drawn as challenges draw theirs (the validator's mix): no length tells one from the other.
        self.users = Users(base_url, model, n, lambda rng: v.mix.sample(rng).max_new_tokens) if n else None
        self.stop, self.task = asyncio.Event(), None
        self.served_by_round: list[dict[str, int]] = []
        self.flagged: dict[int, tuple[int, float]] = {}  # cheat uid -> (round, time.monotonic()) it first got score 0

    def after_round(self, round_: int, cheats: set[int]) -> None:
        """Snapshot the tokens served; note the cheats that failed this round with score 0; start the users."""
        self.served_by_round.append({str(u): n for u, n in sorted(self.gw.served.items())})
        scores = self.v.state.scores
        for uid, j in self.v.last_round.items():  # caught: a wrong answer (not a timeout under load)
            if uid in cheats and uid not in self.flagged and j.outcome is Outcome.WRONG and scores[uid] == 0:
                self.flagged[uid] = (round_, time.monotonic())
        if self.users is not None and self.task is None and self.v.pool.available():
            self.task = asyncio.create_task(self.users.run(self.stop))

    async def finish(self) -> dict:
        """Stop the users (their requests in flight finish) and let the judge catch up; the report's `organic`."""
        if self.task is None:
            return {}
        self.stop.set()
        done, _ = await asyncio.wait({self.task}, timeout=60.0)
        if not done:
            logger.warning("simulated users did not finish their last requests within 60 s")
            self.task.cancel()
        elif not self.task.cancelled():  # a Ctrl-C cancels every task, the judge's too: nothing to wait for
            self.task.result()  # a bug in the users is loud
            for _ in range(100):
                if self.gw.queue.empty():
                    break
                await asyncio.sleep(0.1)
        after = {str(u): self.users.tokens_since(u, t) for u, (_, t) in sorted(self.flagged.items())}
        return {**self.users.summary(), "tokens_by_uid": {str(u): n for u, n in sorted(self.gw.served.items())},
                "verification": dict(self.gw.verified), "tokens_by_uid_by_round": self.served_by_round,
                "flagged_round": {str(u): r for u, (r, _) in sorted(self.flagged.items())},
                "cheat_tokens_after_flagged": after}


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank q-quantile of an ascending list; 0 for an empty one."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
