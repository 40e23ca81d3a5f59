"""Load a causal LM (a Hugging Face id, a local directory, or an embedded tiny one) and run forward passes."""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from neuron.engine.types import ForwardJob, ForwardResult
from neuron.errors import InvalidArgument
from neuron.fingerprint import checkpoint_dir, checkpoint_fingerprint, quantization_of

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_PATH = ASSETS / "tiny"
# The tiny random checkpoints that ship in the package (scripts/make_tiny_model.py), by the names --model.name takes:
# an OPT, a GPT-Neo whose local window is shorter than the test prompts, and that GPT-Neo in bitsandbytes 4-bit.
TINY_MODELS = {"tiny": TINY_PATH, "tiny-gpt-neo": ASSETS / "tiny-gpt-neo", "tiny-gpt-neo-4bit": ASSETS / "tiny-gpt-neo-4bit"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFound(RuntimeError):
    """The model could not be found locally and could not be downloaded."""


@dataclass
class LoadedModel:
    """A model, its tokenizer, and what a peer needs to know about them."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    vocab_size: int  # length of a logits row
    max_positions: int  # longest sequence the model can take
    eos_token_id: int | None
    weights_fingerprint: str
    tokenizer_fingerprint: str
    quantization: str = ""  # what the checkpoint declares (neuron/fingerprint.py quantization_of); "" for none


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# Architectures whose honest float16 answers calibration found outside verification's tolerances (generated-token
# logprob errors up to 0.146 against 0.1 on tiny-gpt-neo; GPT-Neo 1.3B was trained with bfloat16 activations, and
# its fp16 overflows are well known): "auto" serves them in float32 on every device, and float16 is refused.
FLOAT32_ONLY = {"gpt_neo": "GPT-Neo"}


def auto_dtype(model_type: str, on_cuda: bool) -> str:
    """What "auto" serves in: float16 on CUDA, float32 on the CPU (fp16/bf16 matmuls are several times slower
    there), and float32 everywhere for an architecture in FLOAT32_ONLY."""
    return "float16" if on_cuda and model_type not in FLOAT32_ONLY else "float32"


def _source(name: str) -> str:
    if name in TINY_MODELS:
        return str(TINY_MODELS[name])
    return os.path.expanduser(name)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or name.endswith(".gguf")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the hub: seconds, where the hub client's own retries take most of a minute."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
        return True
    except OSError:
        return False


def _check_source(name: str, source: str, offline: bool) -> bool:
    """Fail fast, with the fix, when the model cannot be found; returns whether to stay off the hub."""
    if os.path.isdir(source):
        return offline
    if _looks_like_path(name):
        raise ModelNotFound(f"model path {source!r} does not exist (--model.name takes a Hugging Face id, a local "
                            f"directory, or one of {', '.join(TINY_MODELS)})")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(source, "config.json"), str)
    except Exception:  # not a valid repo id: let transformers say so
        return offline
    if cached:
        return offline or not _hub_reachable()  # cached and no hub: load it without the hub's retries
    # "models/opt" may be a repo id or a mistyped directory: say it is neither.
    nowhere = f"there is no local directory {source!r}, and " if "/" in name or os.sep in name else ""
    fix = (f"download it where the hub is reachable (`hf download {name}`) and copy the Hugging Face "
           f"cache (~/.cache/huggingface) here, or pass a local directory with --model.name /path/to/model")
    if offline:
        raise ModelNotFound(f"model {name!r}: {nowhere}it is not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                            f"downloading it: {fix}")
    if not _hub_reachable():
        raise ModelNotFound(f"model {name!r}: {nowhere}it is not in the Hugging Face cache, and the hub is unreachable from "
                            f"here: {fix}; set HF_HUB_OFFLINE=1 to never try the hub")
    return offline


def _check_quantized_install(name: str, quantization: str) -> None:
    """A bitsandbytes checkpoint needs bitsandbytes and accelerate: say so, with the fix, before transformers
    fails with a message about device maps."""
    import importlib.util

    missing = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
    if quantization.startswith("bnb-") and missing:
        raise ModelNotFound(f"model {name!r} is a bitsandbytes checkpoint ({quantization}) and {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install -e \".[quantized]\" "
                            f"(or pip install bitsandbytes==0.50.2 accelerate==1.16.0)")


class UnverifiablePrecision(ValueError):
    """The model would be served in a precision whose honest answers fail verification: the miner refuses to
    start rather than be rejected round after round (the message says which flag to change)."""


def precision_problem(name: str, dtype: str) -> str:
    """Why honest answers of model `name` served in `dtype` fail verification against a float32 reference, as
    calibration measured it ("" when nothing is known against it): the miner refuses to serve them."""
    if dtype == "bfloat16":
        return ("bfloat16 answers are too far from the validators' float32 reference to pass verification "
                "(docs/calibration.md): serve in float16 or float32 (--model.dtype, or --engine.vllm.dtype)")
    if dtype == "float16":
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(locate(name)[0]).model_type
        if model_type in FLOAT32_ONLY:
            return (f"{FLOAT32_ONLY[model_type]} in float16: honest generated-token logprob errors up to 0.146 were "
                    "measured (tiny-gpt-neo, docs/calibration.md) against the validators' 0.1, so 4 of 288 honest "
                    "checks failed. Serve it in float32: --model.dtype auto or float32 (or --engine.vllm.dtype)")
    return ""


def locate(name: str) -> tuple[str, bool]:
    """(where to load `name` from, whether to stay off the hub): the packaged tiny models by name, a local
    directory, or a Hugging Face id that is cached (or downloadable); ModelNotFound with the fix otherwise.
    Both engine backends start here, so a missing model fails the same way, in seconds, on either."""
    source = _source(name)
    # Read at call time: huggingface_hub reads the variable once, at import.
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return source, _check_source(name, source, offline)


def load_model(name: str = "tiny", device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load `name` (HF id, local path, or "tiny"); HF_HUB_OFFLINE=1 is honoured by transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars garble an operator's log
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    source, offline = locate(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left", local_files_only=offline)
        hf_config = AutoConfig.from_pretrained(source, local_files_only=offline)
        dt = DTYPES[auto_dtype(hf_config.model_type, dev.type == "cuda") if dtype == "auto" else dtype]
        quantization = quantization_of(hf_config.to_dict())
        _check_quantized_install(name, quantization)
        # A quantized model is placed on its device as it loads: bitsandbytes 8-bit weights cannot be moved after.
        placed = {"device_map": {"": dev}} if quantization else {}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, local_files_only=offline, **placed)
    except ImportError as exc:  # a quantized checkpoint whose library is missing (a method other than bitsandbytes)
        raise ModelNotFound(f"model {name!r} ({quantization}) cannot be loaded by this install: "
                            f"{str(exc).splitlines()[0]}") from None
    except (OSError, ValueError) as exc:
        where = "a local directory" if os.path.isdir(source) else "not a local directory"
        hub = "downloads are disabled (HF_HUB_OFFLINE=1)" if offline else "it could not be downloaded"
        raise ModelNotFound(
            f"model {name!r} could not be loaded from {source!r} ({where}; not in the Hugging Face cache, "
            f"or {hub}): {str(exc).splitlines()[0]}"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not quantization:
        model.to(dev)
    model.eval()
    config = model.config
    max_positions = int(getattr(config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    lm = LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=dev,
        dtype=dt,
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        max_positions=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        weights_fingerprint=weights_fingerprint(source, model),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        quantization=quantization,
    )
    params = sum(p.numel() for p in model.parameters())
    quant = f" ({lm.quantization})" if lm.quantization else ""
    logger.info(f"model {name}{quant}: {params / 1e6:.1f}M parameters, {dt} on {dev}, vocab {lm.vocab_size}, "
                f"max positions {max_positions}, weights {lm.weights_fingerprint[:12]}")
    return lm


def weights_fingerprint(source: str, model: torch.nn.Module) -> str:
    """The checkpoint files' fingerprint (neuron/fingerprint.py: the same on every backend); for a checkpoint
    without safetensors/bin files, the SHA-256 over every loaded tensor's name, shape, dtype and bytes."""
    try:
        return checkpoint_fingerprint(checkpoint_dir(source))
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the vocabulary and special tokens."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def forward_logprobs(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     want_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full log-softmax [B, S, V] in float32 (and last hidden states), left padding allowed."""
    input_ids = input_ids.to(lm.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(lm.device)
    out = lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   output_hidden_states=want_hidden, use_cache=False)
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)
    hidden = out.hidden_states[-1].float() if want_hidden else None
    return logprobs, hidden


_SPLIT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Positions whose full-vocabulary logits exist at once in forward_batch (bounds its memory).
HEAD_CHUNK = 256


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The model's body (final hidden states) and its LM head, when head(body(x)) gives exactly the
    model's logits, so the head can run at the requested positions only (it is a third of a 125M
    OPT's work per position, and full-vocabulary logits of a batch are hundreds of MB). None for a
    model that processes its logits further, or a wrapper that rewrites them: those run whole.
    Checked once per model object, on a few tokens."""
    if model not in _SPLIT:
        _SPLIT[model] = None
        body = getattr(model, "base_model", model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if body is not model and head is not None:
            device = next(model.parameters()).device
            ids = torch.arange(1, 9, device=device)[None] % head.weight.shape[0]
            with torch.inference_mode():
                want = model(input_ids=ids, use_cache=False).logits.float()
                got = head(body(input_ids=ids, use_cache=False).last_hidden_state).float()
            if got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                _SPLIT[model] = (body, head)
    return _SPLIT[model]


@torch.inference_mode()
def forward_batch(lm: LoadedModel, jobs: list[ForwardJob]) -> list[ForwardResult]:
    """Run several jobs as one left-padded batch and split the answers back, one per job.

    Only the requested positions go through the log-softmax (and, where the model allows, the LM head).
    InvalidArgument, before any work, for a job asking token log-probabilities where there is no next token.
    """
    for job in jobs:
        if problem := job.token_logprobs_problem():
            raise InvalidArgument(problem)
    width = max(j.seq_len for j in jobs)
    pad = lm.tokenizer.pad_token_id
    ids = torch.cat([torch.nn.functional.pad(j.input_ids, (width - j.seq_len, 0), value=pad) for j in jobs])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(j.input_ids), (width - j.seq_len, 0)) for j in jobs])
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    # (row, position) of every requested answer, job after job; positions count from the row's first real token.
    rows_at, cols_at, counts, row = [], [], [], 0
    for job in jobs:
        positions = torch.arange(job.seq_len) if job.positions is None else torch.tensor(job.positions)
        counts.append(len(positions))
        rows_at.append(torch.arange(row, row + job.rows).repeat_interleave(len(positions)))
        cols_at.append((positions + (width - job.seq_len)).repeat(job.rows))
        row += job.rows
    rows_at, cols_at = torch.cat(rows_at).to(lm.device), torch.cat(cols_at).to(lm.device)
    want_hidden = any(j.want_hidden for j in jobs)
    split, positions = _body_and_head(lm.model), position_ids(mask)
    if split is not None:
        body, head = split
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions,
                      use_cache=False).last_hidden_state[rows_at, cols_at]
        logits_of = lambda i: head(hidden[i:i + HEAD_CHUNK])  # noqa: E731
    else:
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       output_hidden_states=want_hidden, use_cache=False)
        hidden = out.hidden_states[-1][rows_at, cols_at] if want_hidden else None
        logits_of = lambda i: out.logits[rows_at[i:i + HEAD_CHUNK], cols_at[i:i + HEAD_CHUNK]]  # noqa: E731
    # The next input token of every answer, for the jobs that ask its log-probability (clamped at the last
    # column, which only jobs that do not ask can reach).
    want_tokens = any(j.want_token_logprobs for j in jobs)
    next_ids = ids[rows_at, (cols_at + 1).clamp(max=width - 1)] if want_tokens else None
    # A chunk of positions at a time: full-vocabulary float32 rows are 200 KB each for OPT.
    k = max(j.topk for j in jobs)
    chunks, tokens = [], []
    for i in range(0, len(rows_at), HEAD_CHUNK):
        logprobs = torch.log_softmax(logits_of(i).float(), dim=-1)
        chunks.append(logprobs.topk(k, dim=-1))
        if want_tokens:
            tokens.append(logprobs.gather(-1, next_ids[i:i + HEAD_CHUNK, None]).squeeze(-1))
    values = torch.cat([c.values for c in chunks]).cpu()
    top_ids = torch.cat([c.indices for c in chunks]).cpu()
    token_lp = torch.cat(tokens).cpu() if want_tokens else None
    hidden = hidden.float().cpu() if want_hidden else None
    outputs, at = [], 0
    for job, count in zip(jobs, counts):
        n, shape = job.rows * count, (job.rows, count)
        v = values[at:at + n, :job.topk].reshape(*shape, job.topk)
        outputs.append(ForwardResult(
            topk_ids=top_ids[at:at + n, :job.topk].reshape(*shape, job.topk),
            topk_logprobs=v,
            rest_mass=(1.0 - v.exp().sum(-1)).clamp(min=0.0),
            hidden=hidden[at:at + n].reshape(*shape, -1) if job.want_hidden else None,
            token_logprobs=token_lp[at:at + n].reshape(shape) if job.want_token_logprobs else None,
        ))
        at += n
    return outputs


def forward_topk(lm: LoadedModel, input_ids: torch.Tensor, positions: list[int] | None, topk: int,
                 want_hidden: bool = False, want_token_logprobs: bool = False) -> ForwardResult:
    """Next-token top-k at `positions` (None: all) of each row, unbatched: the direct call."""
    job = ForwardJob(input_ids, None if positions is None else tuple(positions), topk, want_hidden, want_token_logprobs)
    return forward_batch(lm, [job])[0]
