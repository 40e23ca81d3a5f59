"""The wire codec, both directions: requests checked against the limits into engine jobs, answers encoded;
and, on the client side, answers decoded into typed values. The only module besides the axon and the
dendrite that touches generated protobuf classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from neuron import wire
from neuron.config import LimitsConfig
from neuron.engine.types import (
    EngineInfo,
    FinishReason,
    ForwardJob,
    ForwardResult,
    GenerateJob,
    Sampler,
    SamplingParams,
    TokenStep,
)
from neuron.errors import BadResponse, InvalidArgument, check
from neuron.pb.neuron.v1 import axon_pb2 as pb

PROTOCOL_VERSION = 2
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # hidden states can be large: refuse a request whose answer would exceed this
# Below these, dividing logits by the value overflows float32 on some engines: refused, not clamped.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0
MAX_SEED = (1 << 63) - 1
# The wire carries these as float32: compare against the float32 nearest each bound, or a client's 0.01
# (0.0099999998 once decoded) would be refused.
_F32 = {x: float(np.float32(x)) for x in (MIN_TEMPERATURE, MAX_TEMPERATURE, MIN_PENALTY, MAX_PENALTY)}
# Room for the fields' tags and lengths, and for fields a newer client may add.
REQUEST_SLACK_BYTES = 4096
FINISH = {FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.EOS: pb.FINISH_REASON_EOS,
          FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE}
FINISH_OF = {v: k for k, v in FINISH.items()}
SAMPLERS = {pb.SAMPLER_UNSPECIFIED: Sampler.ANY, pb.SAMPLER_GUMBEL_V1: Sampler.GUMBEL_V1}
SAMPLER_PB = {v: k for k, v in SAMPLERS.items()}


# ---- the server side ---------------------------------------------------------------------------

def max_seq_len(info: EngineInfo, limits: LimitsConfig) -> int:
    return min(limits.max_seq_len, info.max_seq_len)


def max_request_bytes(limits: LimitsConfig) -> dict[str, int]:
    """The largest body a valid request of each RPC can have under `limits`, by RPC name.

    The axon refuses a larger body before hashing or parsing it: a 4 MiB message of ids costs
    nothing to send and far more to decode. Repeated numbers are counted at their unpacked worst case
    (tag plus a 10-byte varint), text at 4 UTF-8 bytes per character.
    """
    seq = limits.max_seq_len
    forward = limits.max_batch * seq * 8 + seq * 11
    generate = 4 * limits.max_prompt_chars + seq * 11 + limits.max_stop_sequences * (4 * limits.max_stop_chars + 8)
    return {"Info": REQUEST_SLACK_BYTES, "Forward": forward + REQUEST_SLACK_BYTES,
            "Generate": generate + REQUEST_SLACK_BYTES, "GenerateStream": generate + REQUEST_SLACK_BYTES}


def info(e: EngineInfo, limits: LimitsConfig, hotkey: str) -> pb.InfoResponse:
    return pb.InfoResponse(
        model_id=e.model_id, weights_fingerprint=e.weights_fingerprint, tokenizer_fingerprint=e.tokenizer_fingerprint,
        vocab_size=e.vocab_size, dtype=e.dtype, device=e.device, protocol_version=PROTOCOL_VERSION, hotkey=hotkey,
        eos_token_id=-1 if e.eos_token_id is None else e.eos_token_id, quantization=e.quantization,
        limits=pb.Limits(max_batch=limits.max_batch, max_seq_len=max_seq_len(e, limits), max_topk=limits.max_topk,
                         max_new_tokens=limits.max_new_tokens, max_logprobs_topn=limits.max_logprobs_topn,
                         max_message_bytes=limits.max_message_bytes),
    )


def forward_job(req: pb.ForwardRequest, limits: LimitsConfig, e: EngineInfo) -> ForwardJob:
    """A checked ForwardJob, or InvalidArgument saying what is wrong. Sizes before contents."""
    check(req.HasField("input_ids"), "input_ids is missing")
    check(len(req.input_ids.shape) == 2, f"input_ids must be 2-D [batch, seq], got {len(req.input_ids.shape)} dimensions")
    batch, seq = req.input_ids.shape
    seq_limit = max_seq_len(e, limits)
    check(1 <= batch <= limits.max_batch, f"batch {batch} is outside 1..{limits.max_batch}")
    check(1 <= seq <= seq_limit, f"sequence length {seq} is outside 1..{seq_limit}")
    check(1 <= req.topk <= min(limits.max_topk, e.vocab_size), f"topk {req.topk} is outside 1..{limits.max_topk}")
    check(len(req.positions) <= seq, f"{len(req.positions)} positions for a sequence of {seq}")
    ids = wire.from_pb(req.input_ids, name="input_ids", dtype="int64", max_elements=limits.max_batch * seq_limit)
    bad = (ids < 0) | (ids >= e.vocab_size)
    if bool(bad.any()):
        b, s = (int(x) for x in bad.nonzero()[0])
        raise InvalidArgument(f"input_ids[{b}][{s}] = {int(ids[b, s])} is outside the vocabulary [0, {e.vocab_size})")
    positions = tuple(req.positions) or None
    if positions is not None:
        worst = max(positions)
        check(worst < seq, f"position {worst} is outside the sequence of length {seq}")
    n_pos = seq if positions is None else len(positions)
    if req.want_hidden:
        check(e.supports_hidden, f"this miner's engine ({e.backend}) cannot return hidden states")
        size = batch * n_pos * e.hidden_size * 4
        check(size <= MAX_RESPONSE_BYTES, f"hidden states would take {size} bytes (limit {MAX_RESPONSE_BYTES}); ask fewer positions")
    job = ForwardJob(ids, positions, int(req.topk), bool(req.want_hidden), bool(req.want_token_logprobs))
    if problem := job.token_logprobs_problem():
        raise InvalidArgument(problem)
    return job


def forward_response(job: ForwardJob, out: ForwardResult) -> pb.ForwardResponse:
    positions = job.positions if job.positions is not None else range(job.seq_len)
    resp = pb.ForwardResponse(positions=positions, topk_ids=wire.to_pb(out.topk_ids),
                              topk_logprobs=wire.to_pb(out.topk_logprobs.float()), rest_mass=wire.to_pb(out.rest_mass.float()))
    if out.hidden is not None:
        resp.hidden.CopyFrom(wire.to_pb(out.hidden.float()))
    if job.want_token_logprobs:
        resp.token_logprobs.CopyFrom(wire.to_pb(out.token_logprobs.float()))
    return resp


def _prompt_ids(req: pb.GenerateRequest, limits: LimitsConfig, e: EngineInfo, tokenizer, seq_limit: int) -> list[int]:
    has_text, n_ids = bool(req.prompt_text), len(req.prompt_ids)
    check(has_text != (n_ids > 0), "set exactly one of prompt_text and prompt_ids")
    if has_text:
        check(len(req.prompt_text) <= limits.max_prompt_chars,
              f"prompt_text has {len(req.prompt_text)} characters (limit {limits.max_prompt_chars})")
        ids = tokenizer(req.prompt_text).input_ids
        check(len(ids) > 0, "the prompt is empty")
        return ids
    # The count first: a repeated field's length is known before any per-id work is done.
    check(n_ids < seq_limit, f"prompt_ids has {n_ids} tokens; prompt plus max_new_tokens must fit {seq_limit}")
    ids = np.fromiter(req.prompt_ids, dtype=np.int64, count=n_ids)
    bad = (ids < 0) | (ids >= e.vocab_size)
    if bad.any():
        raise InvalidArgument(f"prompt_ids contains {int(ids[bad.argmax()])}, outside the vocabulary [0, {e.vocab_size})")
    return ids.tolist()


def generate_job(req: pb.GenerateRequest, limits: LimitsConfig, e: EngineInfo, tokenizer) -> tuple[GenerateJob, tuple[str, ...]]:
    """The checked GenerateJob and stop strings, or InvalidArgument saying what is wrong."""
    seq_limit = max_seq_len(e, limits)
    n = req.max_new_tokens
    check(1 <= n <= limits.max_new_tokens, f"max_new_tokens {n} is outside 1..{limits.max_new_tokens}")
    check(len(req.stop) <= limits.max_stop_sequences, f"{len(req.stop)} stop strings (limit {limits.max_stop_sequences})")
    for s in req.stop:
        check(0 < len(s) <= limits.max_stop_chars, f"a stop string must have 1..{limits.max_stop_chars} characters")
    check(req.logprobs_topn <= limits.max_logprobs_topn,
          f"logprobs_topn {req.logprobs_topn} is above {limits.max_logprobs_topn}")
    sampler = SAMPLERS.get(req.sampler)
    check(sampler is not None, f"unknown sampler {req.sampler}: expected one of "
                               + ", ".join(f"{pb.Sampler.Name(v)} ({v})" for v in SAMPLERS))
    t, p, rp = req.temperature, req.top_p, req.repetition_penalty
    for name, value in (("temperature", t), ("top_p", p), ("repetition_penalty", rp)):
        check(math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0, got {value}")
    check(t == 0 or _F32[MIN_TEMPERATURE] <= t <= _F32[MAX_TEMPERATURE],
          f"temperature {t} is outside 0 (greedy) or [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
    check(p <= 1, f"top_p {p} is above 1")
    check(rp in (0, 1) or _F32[MIN_PENALTY] <= rp <= _F32[MAX_PENALTY],
          f"repetition_penalty {rp} is outside 0 or 1 (off) or [{MIN_PENALTY}, {MAX_PENALTY}]")
    check(req.top_k <= e.vocab_size, f"top_k {req.top_k} exceeds the vocabulary size {e.vocab_size}")
    seed = int(req.seed) if req.HasField("seed") else None
    check(seed is None or seed <= MAX_SEED, f"seed {seed} is outside [0, {MAX_SEED}]")
    penalty = float(rp) if rp > 0 else 1.0
    if sampler is Sampler.GUMBEL_V1:
        check(seed is not None, "SAMPLER_GUMBEL_V1 needs a seed")
        check(penalty == 1.0, "SAMPLER_GUMBEL_V1 takes no repetition_penalty (the validator could not recompute it)")
    ids = _prompt_ids(req, limits, e, tokenizer, seq_limit)
    check(len(ids) + n <= seq_limit, f"prompt ({len(ids)} tokens) plus max_new_tokens ({n}) exceeds {seq_limit}")
    sampling = SamplingParams(temperature=float(t), top_k=int(req.top_k), top_p=float(p) if 0 < p < 1 else 1.0,
                              seed=seed, repetition_penalty=penalty, sampler=sampler)
    return GenerateJob(tuple(ids), n, sampling, int(req.logprobs_topn)), tuple(req.stop)


def chunk(step: TokenStep, text: str, finish: FinishReason | None) -> pb.GenerateChunk:
    return pb.GenerateChunk(token_id=step.token_id, text=text, logprob=step.logprob,
                            top=pb.TopTokens(ids=step.top_ids, logprobs=step.top_logprobs),
                            finish_reason=FINISH.get(finish, pb.FINISH_REASON_UNSPECIFIED))


def timings(prompt_tokens: int, queue_ms: float, compute_ms: float) -> pb.Timings:
    return pb.Timings(prompt_tokens=prompt_tokens, queue_ms=queue_ms, compute_ms=compute_ms)


def response(chunks: list[pb.GenerateChunk]) -> pb.GenerateResponse:
    """The unary answer: the stream's chunks collected."""
    resp = pb.GenerateResponse(token_ids=[c.token_id for c in chunks], text="".join(c.text for c in chunks),
                               logprobs=[c.logprob for c in chunks])
    if any(c.top.ids for c in chunks):
        resp.top.extend(c.top for c in chunks)
    if chunks:
        resp.finish_reason = chunks[-1].finish_reason
        resp.timings.CopyFrom(chunks[-1].timings)
    return resp


def forward_request(ids: list[int] | list[list[int]] | torch.Tensor, topk: int, positions: list[int] | None = None,
                    want_token_logprobs: bool = False, want_hidden: bool = False) -> pb.ForwardRequest:
    """Client side: the request for a Forward over `ids` (one row, or rows of equal length).

    `positions` None asks every position; with `want_token_logprobs` it asks every position but the last
    (which has no next token), as the miner requires. ValueError for a single token with want_token_logprobs.
    """
    t = torch.as_tensor(ids, dtype=torch.int64)
    t = t[None] if t.dim() == 1 else t
    if positions is None and want_token_logprobs:
        if t.shape[1] < 2:
            raise ValueError("want_token_logprobs needs at least two tokens: the only one has no next token")
        positions = list(range(t.shape[1] - 1))
    return pb.ForwardRequest(input_ids=wire.to_pb(t), positions=positions or [], topk=topk, want_hidden=want_hidden,
                             want_token_logprobs=want_token_logprobs)


def generate_request(prompt_ids: list[int] | None = None, prompt_text: str = "", *, max_new_tokens: int,
                     sampling: SamplingParams = SamplingParams(), stop: tuple[str, ...] = (),
                     logprobs_topn: int = 0) -> pb.GenerateRequest:
    """Client side: the request for a generation."""
    req = pb.GenerateRequest(prompt_ids=prompt_ids or [], prompt_text=prompt_text, max_new_tokens=max_new_tokens,
                             temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                             repetition_penalty=sampling.repetition_penalty, stop=stop, logprobs_topn=logprobs_topn,
                             sampler=SAMPLER_PB[sampling.sampler])
    if sampling.seed is not None:
        req.seed = sampling.seed
    return req


# ---- the client side: answers decoded into typed values -----------------------------------------

@dataclass(frozen=True)
class ForwardAnswer:
    """A miner's Forward answer, decoded and shape-checked."""

    positions: tuple[int, ...]
    topk_ids: torch.Tensor  # int64 [B, P, k]
    topk_logprobs: torch.Tensor  # float32 [B, P, k]
    rest_mass: torch.Tensor  # float32 [B, P]
    token_logprobs: torch.Tensor | None = None  # float32 [B, P]: of the next input token; None unless asked


@dataclass(frozen=True)
class GenerateAnswer:
    """A miner's generation, decoded and length-checked."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    finish_reason: FinishReason | None  # None: the miner sent none (a malformed answer)
    top_ids: tuple[tuple[int, ...], ...] = ()
    top_logprobs: tuple[tuple[float, ...], ...] = ()


def tensor_from(resp_field: pb.Tensor, name: str, dtype: str, shape: list[int]) -> torch.Tensor:
    """Client side: decode a response tensor and insist on its shape."""
    t = wire.from_pb(resp_field, name=name, dtype=dtype, max_elements=max(1, math.prod(shape)))
    check(list(t.shape) == shape, f"{name}: expected shape {shape}, got {list(t.shape)}")
    return t


def decode_forward(resp: pb.ForwardResponse, batch: int, positions: list[int], topk: int, *,
                   want_token_logprobs: bool = False) -> ForwardAnswer:
    """The answer to a Forward of `batch` rows asked at `positions` with `topk` (and token log-probabilities
    when `want_token_logprobs`); BadResponse if malformed, or if asked token log-probabilities are missing."""
    P = len(positions)
    try:
        if len(resp.positions) != P or list(resp.positions) != list(positions):
            raise InvalidArgument("answered other positions than asked")
        token_logprobs = None
        if want_token_logprobs:
            # A miner that predates the field ignores the flag: an empty answer, not a malformed one, but unusable.
            check(resp.HasField("token_logprobs"), "token_logprobs missing (the miner may predate the field)")
            token_logprobs = tensor_from(resp.token_logprobs, "token_logprobs", "float32", [batch, P])
        return ForwardAnswer(
            positions=tuple(positions),
            topk_ids=tensor_from(resp.topk_ids, "topk_ids", "int64", [batch, P, topk]),
            topk_logprobs=tensor_from(resp.topk_logprobs, "topk_logprobs", "float32", [batch, P, topk]),
            rest_mass=tensor_from(resp.rest_mass, "rest_mass", "float32", [batch, P]),
            token_logprobs=token_logprobs,
        )
    except InvalidArgument as exc:
        raise BadResponse(str(exc)) from None


def decode_generate(resp: pb.GenerateResponse, max_new_tokens: int) -> GenerateAnswer:
    """A unary generation's answer; BadResponse when it has more tokens than asked or mismatched lists."""
    T = len(resp.token_ids)
    if T > max_new_tokens:
        raise BadResponse(f"{T} tokens for max_new_tokens {max_new_tokens}")
    if len(resp.logprobs) != T:
        raise BadResponse(f"{len(resp.logprobs)} logprobs for {T} tokens")
    if len(resp.top) not in (0, T):
        raise BadResponse(f"{len(resp.top)} top-n entries for {T} tokens")
    return GenerateAnswer(
        token_ids=tuple(resp.token_ids), text=resp.text, logprobs=tuple(resp.logprobs),
        finish_reason=FINISH_OF.get(resp.finish_reason),
        top_ids=tuple(tuple(t.ids) for t in resp.top), top_logprobs=tuple(tuple(t.logprobs) for t in resp.top),
    )


def decode_stream(chunks: list[pb.GenerateChunk], max_new_tokens: int) -> GenerateAnswer:
    """A streamed generation's chunks as one answer."""
    if len(chunks) > max_new_tokens:
        raise BadResponse(f"{len(chunks)} chunks for max_new_tokens {max_new_tokens}")
    return decode_generate(response(chunks), max_new_tokens)
