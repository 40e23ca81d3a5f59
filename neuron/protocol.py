"""The wire protocol's requests checked against the limits, and answers encoded: the axon's only pb code."""

from __future__ import annotations

import math

import torch

from neuron import wire
from neuron.config import LimitsConfig
from neuron.errors import InvalidArgument, check
from neuron.generation import EOS, LENGTH, STOP_SEQUENCE, GenParams, Step
from neuron.model import ForwardJob, ForwardOutput, LoadedModel
from neuron.pb.neuron.v1 import axon_pb2 as pb

PROTOCOL_VERSION = 1
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # hidden states can be large: refuse a request whose answer would exceed this
FINISH = {LENGTH: pb.FINISH_REASON_LENGTH, EOS: pb.FINISH_REASON_EOS, STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE}
FINISH_NAMES = {v: k for k, v in FINISH.items()}


def info(lm: LoadedModel, limits: LimitsConfig, hotkey: str) -> pb.InfoResponse:
    return pb.InfoResponse(
        model_id=lm.name, weights_fingerprint=lm.weights_fingerprint, tokenizer_fingerprint=lm.tokenizer_fingerprint,
        vocab_size=lm.vocab_size, dtype=str(lm.dtype).removeprefix("torch."), device=str(lm.device),
        protocol_version=PROTOCOL_VERSION, hotkey=hotkey, eos_token_id=-1 if lm.eos_token_id is None else lm.eos_token_id,
        limits=pb.Limits(max_batch=limits.max_batch, max_seq_len=max_seq_len(lm, limits), max_topk=limits.max_topk,
                         max_new_tokens=limits.max_new_tokens, max_logprobs_topn=limits.max_logprobs_topn,
                         max_message_bytes=limits.max_message_bytes),
    )


def max_seq_len(lm: LoadedModel, limits: LimitsConfig) -> int:
    return min(limits.max_seq_len, lm.max_positions)


def forward_job(req: pb.ForwardRequest, limits: LimitsConfig, lm: LoadedModel) -> ForwardJob:
    """A checked ForwardJob, or InvalidArgument saying what is wrong."""
    check(req.HasField("input_ids"), "input_ids is missing")
    shape = list(req.input_ids.shape)
    check(len(shape) == 2, f"input_ids must be 2-D [batch, seq], got shape {shape}")
    batch, seq = shape
    seq_limit = max_seq_len(lm, limits)
    check(1 <= batch <= limits.max_batch, f"batch {batch} is outside 1..{limits.max_batch}")
    check(1 <= seq <= seq_limit, f"sequence length {seq} is outside 1..{seq_limit}")
    ids = wire.from_pb(req.input_ids, name="input_ids", dtype="int64", max_elements=limits.max_batch * seq_limit)
    bad = (ids < 0) | (ids >= lm.vocab_size)
    if bool(bad.any()):
        b, s = (int(x) for x in bad.nonzero()[0])
        raise InvalidArgument(f"input_ids[{b}][{s}] = {int(ids[b, s])} is outside the vocabulary [0, {lm.vocab_size})")
    check(1 <= req.topk <= min(limits.max_topk, lm.vocab_size), f"topk {req.topk} is outside 1..{limits.max_topk}")
    positions = list(req.positions) or None
    if positions is not None:
        check(len(positions) <= seq, f"{len(positions)} positions for a sequence of {seq}")
        worst = max(positions)
        check(worst < seq, f"position {worst} is outside the sequence of length {seq}")
    n_pos = seq if positions is None else len(positions)
    if req.want_hidden:
        size = batch * n_pos * lm.model.config.hidden_size * 4
        check(size <= MAX_RESPONSE_BYTES, f"hidden states would take {size} bytes (limit {MAX_RESPONSE_BYTES}); ask fewer positions")
    return ForwardJob(ids, positions, int(req.topk), bool(req.want_hidden))


def forward_response(job: ForwardJob, out: ForwardOutput) -> pb.ForwardResponse:
    positions = job.positions if job.positions is not None else list(range(job.seq_len))
    resp = pb.ForwardResponse(positions=positions, topk_ids=wire.to_pb(out.topk_ids),
                              topk_logprobs=wire.to_pb(out.topk_logprobs.float()), rest_mass=wire.to_pb(out.rest_mass.float()))
    if out.hidden is not None:
        resp.hidden.CopyFrom(wire.to_pb(out.hidden.float()))
    return resp


def generate_params(req: pb.GenerateRequest, limits: LimitsConfig, lm: LoadedModel) -> tuple[list[int], GenParams]:
    """The prompt ids and checked GenParams, or InvalidArgument saying what is wrong."""
    has_text, has_ids = bool(req.prompt_text), len(req.prompt_ids) > 0
    check(has_text != has_ids, "set exactly one of prompt_text and prompt_ids")
    if has_text:
        check(len(req.prompt_text) <= limits.max_prompt_chars,
              f"prompt_text has {len(req.prompt_text)} characters (limit {limits.max_prompt_chars})")
        ids = lm.tokenizer(req.prompt_text).input_ids
    else:
        ids = list(req.prompt_ids)
        bad = [i for i in ids if not 0 <= i < lm.vocab_size]
        check(not bad, f"prompt_ids contains {bad[0] if bad else 0}, outside the vocabulary [0, {lm.vocab_size})")
    check(len(ids) > 0, "the prompt is empty")
    n = req.max_new_tokens
    check(1 <= n <= limits.max_new_tokens, f"max_new_tokens {n} is outside 1..{limits.max_new_tokens}")
    seq_limit = max_seq_len(lm, limits)
    check(len(ids) + n <= seq_limit, f"prompt ({len(ids)} tokens) plus max_new_tokens ({n}) exceeds {seq_limit}")
    for name, value in (("temperature", req.temperature), ("top_p", req.top_p), ("repetition_penalty", req.repetition_penalty)):
        check(math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0, got {value}")
    check(req.temperature <= 100, f"temperature {req.temperature} is above 100")
    check(req.top_p <= 1, f"top_p {req.top_p} is above 1")
    check(req.repetition_penalty <= 100, f"repetition_penalty {req.repetition_penalty} is above 100")
    check(req.top_k <= lm.vocab_size, f"top_k {req.top_k} exceeds the vocabulary size {lm.vocab_size}")
    check(req.logprobs_topn <= limits.max_logprobs_topn,
          f"logprobs_topn {req.logprobs_topn} is above {limits.max_logprobs_topn}")
    check(len(req.stop) <= limits.max_stop_sequences, f"{len(req.stop)} stop strings (limit {limits.max_stop_sequences})")
    for s in req.stop:
        check(0 < len(s) <= limits.max_stop_chars, f"a stop string must have 1..{limits.max_stop_chars} characters")
    params = GenParams(
        max_new_tokens=n, temperature=float(req.temperature), top_k=int(req.top_k),
        top_p=float(req.top_p) if 0 < req.top_p < 1 else 1.0,
        seed=int(req.seed) if req.HasField("seed") else None,
        repetition_penalty=float(req.repetition_penalty) if req.repetition_penalty > 0 else 1.0,
        stop=tuple(req.stop), logprobs_topn=int(req.logprobs_topn),
    )
    return ids, params


def chunk(step: Step) -> pb.GenerateChunk:
    return pb.GenerateChunk(token_id=step.token_id, text=step.text, logprob=step.logprob,
                            top=pb.TopTokens(ids=step.top_ids, logprobs=step.top_logprobs),
                            finish_reason=FINISH.get(step.finish_reason, pb.FINISH_REASON_UNSPECIFIED))


def timings(prompt_tokens: int, queue_ms: float, compute_ms: float) -> pb.Timings:
    return pb.Timings(prompt_tokens=prompt_tokens, queue_ms=queue_ms, compute_ms=compute_ms)


def response(steps: list[Step], timing: pb.Timings) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        token_ids=[s.token_id for s in steps], text="".join(s.text for s in steps),
        logprobs=[s.logprob for s in steps],
        top=[pb.TopTokens(ids=s.top_ids, logprobs=s.top_logprobs) for s in steps] if any(s.top_ids for s in steps) else [],
        finish_reason=FINISH.get(steps[-1].finish_reason, pb.FINISH_REASON_UNSPECIFIED) if steps else pb.FINISH_REASON_UNSPECIFIED,
        timings=timing,
    )


def tensor_from(resp_field: pb.Tensor, name: str, dtype: str, shape: list[int]) -> torch.Tensor:
    """Client side: decode a response tensor and insist on its shape."""
    t = wire.from_pb(resp_field, name=name, dtype=dtype, max_elements=max(1, math.prod(shape)))
    check(list(t.shape) == shape, f"{name}: expected shape {shape}, got {list(t.shape)}")
    return t
