"""The gateway: OpenAI's /v1/completions and /v1/chat/completions over the validator's verified miners.

Every user request goes to one miner as a seeded gumbel-v1 Generate signed like a challenge (the user's
seed, or a fresh one), so any honest miner gives the same text for the same seed. A miner is drawn from the
pool's verified, unflagged miners by score and free capacity; one that fails before its first token is
replaced (at most `max_retries` times); a failure after it ends the stream with an error event. Once an
answer is delivered, a share of answers drawn after the fact is judged off the request path by the
challenges' own checks (the validator's `verify_users`), so a miner cannot know which answers are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import time
from dataclasses import dataclass, field

import grpc
import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from loguru import logger

from neuron import protocol
from neuron.config import GatewayConfig, LimitsConfig
from neuron.dendrite import Dendrite
from neuron.engine.types import Sampler, SamplingParams
from neuron.errors import BadResponse
from neuron.gateway import openai_api as oa
from neuron.gateway.keys import ApiKey, KeyLimits, KeyStore, KeyStoreError, Limiter, RateLimited
from neuron.gateway.openai_api import OpenAIError
from neuron.logs import clip
from neuron.model import LoadedModel
from neuron.pb.neuron.v1 import axon_pb2 as pb
from neuron.scoring import GenSpec
from neuron.validator.challenge import FwdCheck, GenCheck
from neuron.validator.mix import FORWARD_TOPK, ForwardShape, Shape, TrafficMix, bucket
from neuron.validator.pool import Miner, MinerPool

DEV_KEY = ApiKey(name="development", key_id="dev", limits=KeyLimits(0, 0, 0), created=0.0)
# gRPC statuses of a miner that failed before its first token, as the user sees them once no miner is left.
STATUS_OF = {grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.INVALID_ARGUMENT: 400,
             grpc.StatusCode.RESOURCE_EXHAUSTED: 503}


@dataclass(frozen=True)
class Asked:
    """One user generation as it goes to a miner, and what the judge needs to check the answer."""

    request: pb.GenerateRequest
    check: GenCheck
    logprobs_topn: int


@dataclass
class Session:
    """A miner's stream after its first token: the chunks so far, and what to release at the end."""

    miner: Miner
    stream: object  # the dendrite's async generator
    chunks: list[pb.GenerateChunk]
    started: float
    first_token_s: float
    lease: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    async def rest(self):
        """The chunks after the first."""
        async for c in self.stream:
            self.chunks.append(c)
            yield c

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.aclose()
        self.lease.close()


class Gateway:
    """Routes, checks and verifies user requests; `create_app` puts HTTP in front of it."""

    def __init__(self, config: GatewayConfig, pool: MinerPool, lm: LoadedModel, model_name: str, verify,
                 deadline_s: float, mix: TrafficMix | None = None, limits: LimitsConfig = LimitsConfig(),
                 metrics=None, rng: random.Random | None = None):
        self.config, self.pool, self.lm, self.model_name = config, pool, lm, model_name
        self.deadline_s = deadline_s  # the gRPC deadline of every call: the same as the challenges' (no tell)
        self.verify = verify  # async (list of (uid, hotkey, GenCheck, GenerateAnswer, seconds)) -> verdicts
        self.mix, self.limits, self.metrics = mix, limits, metrics
        self.rng = rng or random.Random(secrets.randbits(64))
        self.keys = KeyStore(config.keys_path) if config.auth else None
        self.limiter = Limiter()
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=config.verify_queue)
        self.verified = {"verified": 0, "failed": 0, "skipped": 0}  # user answers by verification result
        self.served: dict[int, int] = {}  # uid -> completion tokens delivered to users
        self._worker: asyncio.Task | None = None

    @property
    def dendrite(self) -> Dendrite:
        return self.pool.dendrite

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._verify_loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    # ---- admission -----------------------------------------------------------------------------

    def authenticate(self, request: Request) -> ApiKey:
        if self.keys is None:
            return DEV_KEY
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, "no API key: send 'Authorization: Bearer <key>' (neuron gateway keys add)",
                              code="invalid_api_key")
        try:
            key = self.keys.lookup(token.strip())
        except KeyStoreError as exc:  # a corrupt key file admits no one, loudly
            logger.error(f"gateway: {exc}")
            raise OpenAIError(503, "the gateway's key file is unreadable; the operator must fix it") from None
        if key is None:
            raise OpenAIError(401, "unknown or revoked API key", code="invalid_api_key")
        return key

    def admit(self, key: ApiKey) -> None:
        try:
            self.limiter.acquire(key)
        except RateLimited as exc:
            raise OpenAIError(429, str(exc), code="rate_limit_exceeded",
                              headers={"Retry-After": str(max(1, round(exc.retry_after_s + 0.499)))}) from None

    # ---- requests --------------------------------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise OpenAIError(404, f"model {name!r} is not served here; GET /v1/models lists {self.model_name!r}",
                              "model", "model_not_found")

    def _sampling(self, body: oa._Request, logprobs_topn: int, max_tokens: int) -> tuple[SamplingParams, tuple]:
        lim = self.limits
        stops = body.stops()
        if len(stops) > lim.max_stop_sequences:
            raise OpenAIError(400, f"{len(stops)} stop strings (limit {lim.max_stop_sequences})", "stop")
        if any(not 0 < len(s) <= lim.max_stop_chars for s in stops):
            raise OpenAIError(400, f"a stop string must have 1..{lim.max_stop_chars} characters", "stop")
        if logprobs_topn > lim.max_logprobs_topn:
            raise OpenAIError(400, f"logprobs {logprobs_topn} is above {lim.max_logprobs_topn}", "logprobs")
        if max_tokens > min(lim.max_new_tokens, self.config.max_tokens):
            raise OpenAIError(400, f"max_tokens {max_tokens} is above {min(lim.max_new_tokens, self.config.max_tokens)}",
                              "max_tokens")
        temperature = 1.0 if body.temperature is None else body.temperature
        if 0 < temperature < protocol.MIN_TEMPERATURE:
            raise OpenAIError(400, f"temperature must be 0 (greedy) or at least {protocol.MIN_TEMPERATURE}",
                              "temperature")
        top_k = max(0, body.top_k or 0)
        if top_k > self.lm.vocab_size:
            raise OpenAIError(400, f"top_k {top_k} exceeds the vocabulary size {self.lm.vocab_size}", "top_k")
        top_p = 1.0 if body.top_p is None else body.top_p
        seed = body.seed if body.seed is not None else self.rng.getrandbits(63)
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              sampler=Sampler.GUMBEL_V1), stops

    def _ask(self, prompt_ids: list[int], prompt_text: str, max_tokens: int, sampling: SamplingParams,
             stops: tuple[str, ...], logprobs_topn: int) -> Asked:
        seq_limit = min(self.limits.max_seq_len, self.lm.max_positions)
        if not prompt_ids:
            raise OpenAIError(400, "the prompt is empty", "prompt")
        if len(prompt_ids) + max_tokens > seq_limit:
            raise OpenAIError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                              f"the context of {seq_limit} tokens", "max_tokens", "context_length_exceeded")
        request = protocol.generate_request(None if prompt_text else prompt_ids, prompt_text,
                                            max_new_tokens=max_tokens, sampling=sampling, stop=stops,
                                            logprobs_topn=logprobs_topn)
        spec = GenSpec(max_tokens, sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed)
        if self.mix is not None:  # the shape only, never the prompt: challenges are drawn from these counts
            self.mix.record(Shape(bool(prompt_text), bucket(len(prompt_ids)), max_tokens, sampling.temperature,
                                  sampling.top_k, sampling.top_p, len(stops), logprobs_topn))
        return Asked(request, GenCheck(tuple(prompt_ids), spec, stops), logprobs_topn)

    def completion_ask(self, body: oa.CompletionRequest) -> Asked:
        self._check_model(body.model)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise OpenAIError(400, "max_tokens 0 asks nothing: use it with echo (the prompt's logprobs)", "max_tokens")
        if body.echo and max_tokens > 0 and body.logprobs is not None:
            raise OpenAIError(400, "echo with logprobs is served with max_tokens 0 (the prompt's logprobs); ask the "
                              "completion's logprobs in a second request", "echo")
        topn = body.logprobs or 0
        sampling, stops = self._sampling(body, topn, max(max_tokens, 1))
        prompt = self._one_prompt(body)
        if isinstance(prompt, str):
            return self._ask(self.lm.tokenizer(prompt).input_ids if prompt else [], prompt, max_tokens, sampling,
                             stops, topn)
        return self._ask(list(prompt), "", max_tokens, sampling, stops, topn)

    def _one_prompt(self, body: oa.CompletionRequest) -> str | list[int]:
        """The request's one prompt, text or token ids, within the limits."""
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise OpenAIError(400, "one prompt per request (n = 1)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if len(prompt) > self.limits.max_prompt_chars:
                raise OpenAIError(400, f"the prompt has {len(prompt)} characters (limit "
                                  f"{self.limits.max_prompt_chars})", "prompt")
            return prompt
        if len(prompt) >= self.limits.max_seq_len:
            raise OpenAIError(400, f"the prompt has {len(prompt)} tokens (limit {self.limits.max_seq_len})", "prompt")
        bad = [t for t in prompt if not 0 <= t < self.lm.vocab_size]
        if bad:
            raise OpenAIError(400, f"prompt token {bad[0]} is outside the vocabulary [0, {self.lm.vocab_size})",
                              "prompt")
        return list(prompt)

    def echo_ask(self, body: oa.CompletionRequest) -> tuple[pb.ForwardRequest, list[int], str, int]:
        """A prompt-logprobs request (echo, max_tokens 0) as the miners' Forward: (request, ids, text, top-n)."""
        self._check_model(body.model)
        prompt = self._one_prompt(body)
        ids = self.lm.tokenizer(prompt).input_ids if isinstance(prompt, str) else prompt
        topn = body.logprobs or 0
        if not 2 <= len(ids) <= min(self.limits.max_seq_len, self.lm.max_positions):
            raise OpenAIError(400, f"prompt logprobs need 2..{self.limits.max_seq_len} prompt tokens, got {len(ids)}",
                              "prompt")
        if topn > min(self.limits.max_topk, self.limits.max_logprobs_topn):
            raise OpenAIError(400, f"logprobs {topn} is above {min(self.limits.max_topk, self.limits.max_logprobs_topn)}",
                              "logprobs")
        # The miner is asked at least the calibrated top-k whatever the user asked (the top-k checks' thresholds
        # were measured at 16: at k = 1 one float16 near-tie would fail an honest miner), and the user gets topn.
        k = max(FORWARD_TOPK, topn)
        if self.mix is not None:
            self.mix.record_forward(ForwardShape(bucket(len(ids)), k))
        text = prompt if isinstance(prompt, str) else self.lm.tokenizer.decode(ids, skip_special_tokens=True)
        return protocol.forward_request(ids, k, want_token_logprobs=True), list(ids), text, topn

    async def forward(self, request: pb.ForwardRequest, ids: list[int], k: int) -> tuple[Miner, protocol.ForwardAnswer]:
        """One miner's Forward answer, failing over to another (at most max_retries) when one fails; queued
        for judging like a generation."""
        last: tuple[int, str] | None = None
        async for miner in self._candidates():
            with self.pool.lease(miner):
                r = await self.dendrite.call(miner.target, "Forward", request, self.deadline_s)
            if r.ok and r.signed:
                positions = list(range(len(ids) - 1))
                try:
                    answer = protocol.decode_forward(r.response, 1, positions, k, want_token_logprobs=True)
                except BadResponse as exc:
                    last = self._failed_before_first(miner, exc)
                    continue
                self.maybe_verify(miner, FwdCheck(tuple(ids), tuple(positions), k), answer, r.latency_s)
                return miner, answer
            last = self._failed_before_first(miner, _RpcFailure(r.code, r.message or "unsigned answer"))
        raise _no_answer(last)

    async def _candidates(self):
        """Up to 1 + max_retries different miners, drawn by the pool one after another, while any is left."""
        tried: set[int] = set()
        for _ in range(1 + self.config.max_retries):
            miner = await self.pool.choose(tried)
            if miner is None:
                return
            tried.add(miner.uid)
            yield miner

    def chat_ask(self, body: oa.ChatRequest) -> Asked:
        self._check_model(body.model)
        tok = self.lm.tokenizer
        if not getattr(tok, "chat_template", None):
            raise OpenAIError(400, f"model {self.model_name} has no chat template: use /v1/completions with a "
                              "prompt formed as its model card says", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if sum(len(m["content"]) for m in messages) > self.limits.max_prompt_chars:
            raise OpenAIError(400, f"the messages have more than {self.limits.max_prompt_chars} characters", "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or min(self.config.max_tokens, 256)
        topn = (body.top_logprobs or 0) if body.logprobs else 0
        sampling, stops = self._sampling(body, topn, max_tokens)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # a BatchEncoding in transformers 5
            ids = ids["input_ids"]
        return self._ask(list(ids), "", max_tokens, sampling, stops, topn)

    # ---- routing ---------------------------------------------------------------------------------

    async def open(self, asked: Asked) -> Session:
        """A miner's stream with its first token, failing over before that token; OpenAIError when none."""
        last: tuple[int, str] | None = None
        async for miner in self._candidates():
            lease = contextlib.ExitStack()
            lease.enter_context(self.pool.lease(miner))
            started = time.monotonic()
            stream = self.dendrite.stream(miner.target, asked.request, self.deadline_s)
            try:
                first = await asyncio.wait_for(anext(stream), self.config.first_token_timeout_s)
            except (asyncio.TimeoutError, grpc.aio.AioRpcError, BadResponse, StopAsyncIteration) as exc:
                await _close(stream)
                lease.close()
                last = self._failed_before_first(miner, exc)
                continue
            except BaseException:
                await _close(stream)
                lease.close()
                raise
            return Session(miner, stream, [first], started, time.monotonic() - started, lease)
        raise _no_answer(last)

    def _failed_before_first(self, miner: Miner, exc: BaseException) -> tuple[int, str]:
        if isinstance(exc, (grpc.aio.AioRpcError, _RpcFailure)):
            code, what = exc.code(), f"{exc.code().name.lower()}: {clip(exc.details() or '', 200)}"
        elif isinstance(exc, asyncio.TimeoutError):
            code, what = grpc.StatusCode.DEADLINE_EXCEEDED, f"no first token within {self.config.first_token_timeout_s} s"
        else:
            code, what = grpc.StatusCode.UNKNOWN, f"bad answer: {exc}" if str(exc) else "no token"
        logger.info(f"gateway: uid {miner.uid} failed before its first token ({what}); trying another miner")
        # Out of user traffic until its next challenge passes; a busy miner or a request it finds invalid is not.
        if code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
            self.pool.revoke(miner.uid)
        return STATUS_OF.get(code, 502), f"the miner failed: {what}"

    def finished(self, session: Session, asked: Asked, key: ApiKey, whole: bool) -> None:
        """A stream ended: count the tokens the user got and, for a whole answer and a share drawn only now,
        queue it for judging."""
        tokens = len(session.chunks)
        self.limiter.release(key, tokens)
        self.served[session.miner.uid] = self.served.get(session.miner.uid, 0) + tokens
        if self.metrics is not None:
            self.metrics.tokens.inc(tokens)
            self.metrics.key_tokens.labels(key.key_id).inc(tokens)
        if not whole:
            return
        try:
            answer = protocol.decode_stream(session.chunks, asked.check.spec.max_new_tokens)
        except BadResponse as exc:  # more tokens than asked: out of user traffic, like any wrong answer
            logger.info(f"gateway: uid {session.miner.uid} sent a malformed answer: {exc}")
            self.pool.revoke(session.miner.uid)
            return
        self.maybe_verify(session.miner, asked.check, answer, time.monotonic() - session.started)

    def maybe_verify(self, miner: Miner, check: GenCheck | FwdCheck, answer, seconds: float) -> None:
        """Queue a delivered answer for judging with probability verify_fraction, drawn only now."""
        if self.rng.random() >= self.config.verify_fraction:
            return
        try:
            self.queue.put_nowait((miner.uid, miner.hotkey, check, answer, seconds))
        except asyncio.QueueFull:
            self.verified["skipped"] += 1
            if self.metrics is not None:
                self.metrics.verifications.labels("skipped").inc()

    async def _verify_loop(self) -> None:
        """Judges queued user answers in batches, off the request path."""
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < 32:
                batch.append(self.queue.get_nowait())
            if self.metrics is not None:
                self.metrics.queue.set(self.queue.qsize())
            try:
                verdicts = await self.verify(batch)
            except Exception as exc:  # a judging bug must not stop user traffic; it is loud in the log
                logger.exception(f"gateway: judging {len(batch)} user answers failed: {exc}")
                continue
            for v in verdicts:
                result = "verified" if v.verified else "failed"
                self.verified[result] += 1
                if self.metrics is not None:
                    self.metrics.verifications.labels(result).inc()


class _RpcFailure(Exception):
    """A unary call's failure (the dendrite returns it as a status, not an exception)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _no_answer(last: tuple[int, str] | None) -> OpenAIError:
    """The error once no miner answered: 503 when none was there to ask, else the last miner's failure."""
    if last is None:
        return OpenAIError(503, "no verified miner is available; try again shortly", code="no_miner",
                           headers={"Retry-After": "5"})
    return OpenAIError(last[0], last[1], code="miner_failed")


async def _close(stream) -> None:
    with contextlib.suppress(Exception):
        await stream.aclose()


# ---- answers -------------------------------------------------------------------------------------

def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer, chunks: list[pb.GenerateChunk], offset: int) -> dict:
    tokens, offsets, pos = [], [], offset
    for c in chunks:
        tokens.append(_token_text(tokenizer, c.token_id))
        offsets.append(pos)
        pos += len(c.text)
    return {"tokens": tokens, "token_logprobs": [c.logprob for c in chunks],
            "top_logprobs": [{_token_text(tokenizer, i): lp for i, lp in zip(c.top.ids, c.top.logprobs)}
                             for c in chunks],
            "text_offset": offsets}


def chat_logprobs(tokenizer, chunks: list[pb.GenerateChunk]) -> dict:
    def entry(i: int, lp: float) -> dict:
        t = _token_text(tokenizer, i)
        return {"token": t, "logprob": lp, "bytes": list(t.encode())}

    return {"content": [{**entry(c.token_id, c.logprob),
                         "top_logprobs": [entry(i, lp) for i, lp in zip(c.top.ids, c.top.logprobs)]} for c in chunks]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Observe:
    """Counts each request by path and status and logs it with its time (a plain ASGI middleware: Starlette's
    BaseHTTPMiddleware relays every streamed chunk through a memory stream, a cost on each token)."""

    def __init__(self, app, gw: Gateway):
        self.app, self.gw = app, gw

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if self.gw.metrics is not None:
                self.gw.metrics.requests.labels(scope["path"][:40], str(status[0])).inc()
            logger.debug(f"gateway {scope['method']} {scope['path'][:80]} {status[0]} "
                         f"{(time.monotonic() - started) * 1000:.1f} ms")


def create_app(gw: Gateway) -> FastAPI:
    """The HTTP face of `gw`: OpenAI routes, OpenAI error shapes, no 500 for bad input."""
    app = FastAPI(title="neuron gateway", docs_url=None, redoc_url=None)

    @app.exception_handler(OpenAIError)
    async def openai_error(_request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception):  # a bug: logged with its traceback, never hidden
        logger.opt(exception=exc).error(f"gateway: unexpected error: {exc}")
        return JSONResponse(OpenAIError(500, "internal error").body(), status_code=500)

    app.add_middleware(Observe, gw=gw)

    async def body_of(request: Request, model: type[pydantic.BaseModel]):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > gw.config.max_body_bytes:
            raise OpenAIError(413, f"the body has {declared} bytes (limit {gw.config.max_body_bytes})")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > gw.config.max_body_bytes:
                raise OpenAIError(413, f"the body is over {gw.config.max_body_bytes} bytes")
        try:
            return model.model_validate_json(bytes(raw))
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ())) or None
            raise OpenAIError(400, f"{where + ': ' if where else ''}{err.get('msg', 'invalid')}"[:500], where) from None

    @app.get("/health")
    async def health():
        n = gw.pool.available()
        body = {"status": "ok" if n else "no verified miner", "verified_miners": n}
        return JSONResponse(body, status_code=200 if n else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        gw.authenticate(request)
        return {"object": "list", "data": [{"id": gw.model_name, "object": "model", "created": 0,
                                            "owned_by": "neuron"}]}

    async def serve(key: ApiKey, body, asked: Asked, chat: bool):
        gw.admit(key)
        try:
            session = await gw.open(asked)
        except BaseException:
            gw.limiter.release(key, 0)
            raise
        if gw.metrics is not None:
            gw.metrics.first_token.observe(session.first_token_s)
        rid, created = oa.new_id("chatcmpl" if chat else "cmpl"), oa.now()
        headers = {"x-neuron-miner-uid": str(session.miner.uid), "x-neuron-seed": str(asked.check.spec.seed)}
        tok = gw.lm.tokenizer
        prompt_tokens = len(asked.check.prompt_ids)

        if not body.stream:
            whole = False
            try:
                async for _ in session.rest():
                    pass
                whole = True
            except (grpc.aio.AioRpcError, BadResponse) as exc:
                gw.pool.revoke(session.miner.uid)
                raise OpenAIError(502, f"the miner failed mid-answer: {exc}", code="miner_failed") from None
            finally:
                await session.close()
                gw.finished(session, asked, key, whole)
            chunks = session.chunks
            text = "".join(c.text for c in chunks)
            finish = oa.finish_reason(protocol.FINISH_OF.get(chunks[-1].finish_reason))
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                          "logprobs": chat_logprobs(tok, chunks) if body.logprobs else None}
            else:
                text = (gw.lm.tokenizer.decode(list(asked.check.prompt_ids), skip_special_tokens=True) + text
                        if getattr(body, "echo", False) else text)
                choice = {"index": 0, "text": text, "finish_reason": finish,
                          "logprobs": completion_logprobs(tok, chunks, 0) if body.logprobs is not None else None}
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": gw.model_name, "choices": [choice],
                                 "usage": oa.usage(prompt_tokens, len(chunks))}, headers=headers)

        async def events():
            obj = "chat.completion.chunk" if chat else "text_completion"
            offset, ok = 0, False

            def event(c: pb.GenerateChunk | None, finish: str | None) -> str:
                nonlocal offset
                if chat:
                    delta = {"content": c.text} if c is not None else {}
                    lp = chat_logprobs(tok, [c]) if c is not None and body.logprobs else None
                    choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
                else:
                    lp = completion_logprobs(tok, [c], offset) if c is not None and body.logprobs is not None else None
                    choice = {"index": 0, "text": c.text if c is not None else "", "logprobs": lp,
                              "finish_reason": finish}
                if c is not None:
                    offset += len(c.text)
                return _sse({"id": rid, "object": obj, "created": created, "model": gw.model_name,
                             "choices": [choice]})

            try:
                if chat:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": gw.model_name,
                                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
                elif body.echo:  # the prompt first, as OpenAI's echo
                    yield _sse({"id": rid, "object": obj, "created": created, "model": gw.model_name,
                                "choices": [{"index": 0, "text": tok.decode(list(asked.check.prompt_ids),
                                                                               skip_special_tokens=True),
                                             "logprobs": None, "finish_reason": None}]})
                yield event(session.chunks[0], None)
                try:
                    async for c in session.rest():
                        yield event(c, None)
                except (grpc.aio.AioRpcError, BadResponse) as exc:
                    gw.pool.revoke(session.miner.uid)
                    what = exc.code().name.lower() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                    logger.info(f"gateway: uid {session.miner.uid} failed mid-stream: {what}")
                    yield _sse(OpenAIError(502, f"the miner failed mid-answer ({what}); the text above is "
                                           "incomplete", code="miner_failed").body())
                    yield "data: [DONE]\n\n"
                    return
                finish = oa.finish_reason(protocol.FINISH_OF.get(session.chunks[-1].finish_reason))
                yield event(None, finish)
                if body.include_usage():
                    yield _sse({"id": rid, "object": obj, "created": created, "model": gw.model_name, "choices": [],
                                "usage": oa.usage(prompt_tokens, len(session.chunks))})
                yield "data: [DONE]\n\n"
                ok = True
            finally:  # also when the client went away: the miner's stream is cancelled here
                await session.close()
                gw.finished(session, asked, key, ok)

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        key = gw.authenticate(request)  # before the body: an unknown caller learns nothing about its request
        body = await body_of(request, oa.CompletionRequest)
        if body.echo and body.max_tokens == 0:
            return await prompt_logprobs(key, body)
        return await serve(key, body, gw.completion_ask(body), chat=False)

    async def prompt_logprobs(key: ApiKey, body: oa.CompletionRequest):
        if body.stream:
            raise OpenAIError(400, "prompt logprobs (echo, max_tokens 0) are not streamed", "stream")
        forward, ids, text, topn = gw.echo_ask(body)
        gw.admit(key)
        try:
            miner, a = await gw.forward(forward, ids, max(FORWARD_TOPK, topn))
        finally:
            gw.limiter.release(key, 0)
        tok = gw.lm.tokenizer
        tokens = [_token_text(tok, t) for t in ids]
        offsets = [0]
        for t in tokens[:-1]:
            offsets.append(offsets[-1] + len(t))
        logprobs = None
        if body.logprobs is not None:
            top = [{_token_text(tok, int(i)): float(lp) for i, lp in zip(a.topk_ids[0, p, :topn], a.topk_logprobs[0, p, :topn])}
                   for p in range(len(ids) - 1)]
            logprobs = {"tokens": tokens, "token_logprobs": [None] + [float(x) for x in a.token_logprobs[0]],
                        "top_logprobs": [None] + top, "text_offset": offsets}
        choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": logprobs}
        return JSONResponse({"id": oa.new_id("cmpl"), "object": "text_completion", "created": oa.now(),
                             "model": gw.model_name, "choices": [choice], "usage": oa.usage(len(ids), 0)},
                            headers={"x-neuron-miner-uid": str(miner.uid)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        key = gw.authenticate(request)
        body = await body_of(request, oa.ChatRequest)
        return await serve(key, body, gw.chat_ask(body), chat=True)

    return app


async def serve_gateway(gw: Gateway, ip: str, port: int):
    """Start the gateway's HTTP server on this event loop; returns (uvicorn server, task, bound port)."""
    import uvicorn

    config = uvicorn.Config(create_app(gw), host=ip, port=port, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=5, timeout_keep_alive=gw.config.keep_alive_s)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # the validator owns SIGTERM and SIGINT
    await gw.start()
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await gw.stop()
            exc = task.exception()
            raise OSError(f"the gateway could not serve on {ip}:{port} ({exc or 'port in use?'}); pick another with "
                          "--gateway.port") from exc
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return server, task, bound
