"""The engine contract: jobs in, token steps and results out, free of protobuf and of any backend.

The axon decodes requests into these types, hands them to an `Engine`, and encodes what comes back;
text, stop strings and detokenising stay on the axon's side (neuron/detokenize.py), so every backend
streams the same text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import AsyncIterator, ClassVar, Protocol

import torch


class FinishReason(str, enum.Enum):
    """Why a generation ended (the axon adds STOP_SEQUENCE when a stop string appears in the text)."""

    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos"  # the model's end-of-sequence token was chosen (and is the last token)
    STOP_SEQUENCE = "stop_sequence"  # a stop string appeared in the text


class Sampler(str, enum.Enum):
    """Which sampler a generation asks for."""

    ANY = "any"  # the backend's own sampler: statistically right, not reproducible elsewhere
    GUMBEL_V1 = "gumbel-v1"  # the seeded, recomputable sampler of docs/sampling.md


@dataclass(frozen=True)
class EngineStats:
    """What every engine's stats() reports (the miner's metrics export these fields, the same series for every
    backend): gauges, the state now, and counters since start. A backend adds its own fields in a subclass."""

    GAUGES: ClassVar[tuple[str, ...]] = ("queued", "running", "capacity")  # the other fields are counters

    queued: int  # requests admitted and waiting for the model
    running: int  # sequences decoding now
    capacity: int  # sequences that can decode at once
    forward_batches: int  # Forward batches run
    forward_rows: int  # rows in those batches
    generations: int  # generations started
    generated_tokens: int  # tokens generated
    cancelled: int  # work whose caller went away
    rejected: int  # requests refused as the queue was full
    deadline_exceeded: int  # work dropped at its deadline

@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen (already validated by the codec)."""

    temperature: float = 0.0  # 0: greedy (argmax of the raw logits)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: random (only with Sampler.ANY)
    repetition_penalty: float = 1.0  # 1: off (refused with GUMBEL_V1)
    sampler: Sampler = Sampler.ANY

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerateJob:
    """One generation: prompt token ids, how many new tokens at most, sampling, alternatives wanted."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logprobs_topn: int = 0  # alternatives per token


@dataclass(frozen=True)
class TokenStep:
    """One generated token, as an engine yields it."""

    token_id: int
    logprob: float  # under the unmodified model distribution (raw log_softmax)
    top_ids: tuple[int, ...] = ()  # the most likely alternatives, most likely first
    top_logprobs: tuple[float, ...] = ()
    finish_reason: FinishReason | None = None  # set on the last step only


@dataclass(frozen=True)
class ForwardJob:
    """One Forward request: rows of equal length, positions (None: all), top-k, hidden states or not."""

    input_ids: torch.Tensor  # int64 [B, S], on the CPU
    positions: tuple[int, ...] | None
    topk: int
    want_hidden: bool = False
    # Also the log-probability of input_ids[b, p + 1] at each position p; every position must then be
    # < S - 1 (engines refuse the job otherwise), so positions cannot be None.
    want_token_logprobs: bool = False

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def token_logprobs_problem(self) -> str | None:
        """Why this job cannot have token log-probabilities, or None when it can (or does not ask)."""
        if not self.want_token_logprobs:
            return None
        last = self.seq_len - 1
        if last == 0:
            return "want_token_logprobs needs at least two tokens: the only one has no next token"
        if self.positions is None or last in self.positions:
            return (f"want_token_logprobs needs every position below {last}: the last position has no next token "
                    f"(list positions 0..{last - 1}; none listed means all, the last included)")
        return None


@dataclass
class ForwardResult:
    """Top-k next-token distributions at the requested positions of every row (CPU tensors)."""

    topk_ids: torch.Tensor  # int64 [B, P, k]
    topk_logprobs: torch.Tensor  # float32 [B, P, k]
    rest_mass: torch.Tensor  # float32 [B, P]: probability outside the top-k
    hidden: torch.Tensor | None  # float32 [B, P, H]
    token_logprobs: torch.Tensor | None = None  # float32 [B, P]: of input_ids[b, p + 1]; None unless asked


@dataclass(frozen=True)
class EngineInfo:
    """What a peer needs to know about the model an engine serves."""

    model_id: str
    backend: str  # "hf" or "vllm"
    vocab_size: int  # length of a logits row
    max_seq_len: int  # longest prompt + generation the engine takes
    eos_token_id: int | None
    dtype: str  # e.g. "float16"
    device: str  # e.g. "cuda:0"
    weights_fingerprint: str
    tokenizer_fingerprint: str
    hidden_size: int
    supports_hidden: bool  # Forward can return hidden states
    quantization: str = ""  # what the checkpoint declares: "", "bnb-4bit-nf4", "bnb-8bit" (neuron/fingerprint.py)


class Engine(Protocol):
    """What the axon, the bench and the harnesses call. Errors are neuron.errors types only."""

    tokenizer: object  # a Hugging Face tokenizer: the axon tokenizes prompts and detokenises steps

    def info(self) -> EngineInfo: ...

    def stats(self) -> EngineStats:
        """An EngineStats, or the backend's subclass of it with what else it keeps (benches and tests read those)."""
        ...

    def dead_reason(self) -> str | None:
        """None while the engine can serve; else why it cannot (its worker died, or a step hung past
        `batching.stall_timeout_s`). Death is final: work in hand and new work get Unavailable, and the
        miner exits so that its supervisor restarts it. Cheap: the miner polls it on the event loop."""
        ...

    async def start(self) -> None: ...

    async def stop(self, timeout: float = 5.0) -> None:
        """Finish the work in hand (within timeout), fail what is queued with Unavailable."""
        ...

    async def forward(self, job: ForwardJob, priority: float = 0.0, deadline: float | None = None) -> ForwardResult:
        """Lower priority runs first (the axon passes -stake); deadline is a time.monotonic() value."""
        ...

    def generate(self, job: GenerateJob, priority: float = 0.0,
                 deadline: float | None = None) -> AsyncIterator[TokenStep]:
        """Token steps until one carries a finish_reason; closing the iterator (aclose) aborts the generation."""
        ...
