"""Shared fixtures: the real tiny model and SmolLM2 (loaded once), a real axon on port 0, wallets, a local chain."""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import pytest
import torch

# No hub at test time: every model comes from the package or the local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from neuron.config import MinerConfig, with_overrides
from neuron.model import load_model

# The CUDA tests (tests/gpu, marker `cuda`): skipped here, run on a lent GPU by scripts/gpu_check.sh (docs/gpu.md).
# NEURON_CUDA_TESTS_DEVICE=cpu runs their code on the CPU instead (scripts/gpu_check.sh --cpu-smoke: a dry run).
CUDA_TESTS_DEVICE = os.environ.get("NEURON_CUDA_TESTS_DEVICE", "cuda")
needs_cuda = pytest.mark.skipif(CUDA_TESTS_DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device on this machine: the cuda tests run on a GPU "
                                "(scripts/gpu_check.sh, docs/gpu.md)")
_on_cuda: dict[tuple[str, str], object] = {}


def cuda_model(name: str, dtype: str = "float32"):
    """An embedded model on the GPU, loaded once per session per dtype (the cuda tests')."""
    if (name, dtype) not in _on_cuda:
        _on_cuda[name, dtype] = load_model(name, device=CUDA_TESTS_DEVICE, dtype=dtype)
    return _on_cuda[name, dtype]


SMOLLM2 = Path(os.environ.get("NEURON_CACHE") or Path.home() / ".cache" / "neuron").expanduser() / "smollm2-135m"


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_gpt_neo():
    """The seed models' GPT-Neo in miniature: global and local layers, a local window shorter than the test prompts."""
    return load_model("tiny-gpt-neo", device="cpu", dtype="float32")


# bitsandbytes checkpoints need the quantized extra; where it is missing, their tests skip and say so.
_MISSING = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
HAS_QUANTIZED = not _MISSING
needs_quantized = pytest.mark.skipif(not HAS_QUANTIZED, reason=f"{' and '.join(_MISSING)} not installed: bitsandbytes "
                                     "checkpoints need the quantized extra (the README's test command installs it)")


@pytest.fixture(scope="session")
def tiny_gpt_neo_4bit():
    """That GPT-Neo as a bitsandbytes 4-bit checkpoint (NF4, float32 compute): a declared model of its own."""
    if not HAS_QUANTIZED:
        pytest.skip(needs_quantized.kwargs["reason"])
    return load_model("tiny-gpt-neo-4bit", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2():
    if not (SMOLLM2 / ".complete").exists():
        pytest.fail(f"SmolLM2 checkpoint missing at {SMOLLM2}: run `python scripts/fetch_smollm2.py` first "
                    "(the README's test command does)")
    return load_model(str(SMOLLM2), device="cpu", dtype="float32")


@pytest.fixture(scope="session", params=["tiny", "smollm2"])
def lm(request):
    """Each test that takes `lm` runs on both models."""
    return request.getfixturevalue(request.param)


def miner_config(**overrides) -> MinerConfig:
    """A miner config bound to loopback on a free port, auth off unless overridden."""
    base = {"axon.ip": "127.0.0.1", "axon.port": 0, "auth.required": False, "axon.grace_s": 1.0}
    base.update(overrides)
    return with_overrides(MinerConfig(), **base)


def make_axon(lm, config: MinerConfig | None = None, **kwargs):
    """A real axon over its own HF engine on `lm`, neither started: start_miner and stop_miner run both."""
    from neuron.axon import Axon
    from neuron.engine import open_engine

    config = config or miner_config()
    return Axon(open_engine(config, lm), config, **kwargs)


async def start_miner(axon) -> int:
    """As the miner does: the engine, then the axon over it (the engine stopped again if the axon fails); the port."""
    await axon.engine.start()
    try:
        return await axon.start()
    except BaseException:
        await axon.engine.stop(0)
        raise


async def stop_miner(axon, grace: float = 0) -> None:
    """As the miner does: the axon (in-flight calls get `grace` seconds), then its engine."""
    await axon.stop(grace=grace)
    await axon.engine.stop(grace)


class PoisonRows(torch.nn.Module):
    """The real model, except that rows whose last input token is `poison` get NaN logits."""

    def __init__(self, inner: torch.nn.Module, poison: int):
        super().__init__()
        self.inner, self.config, self.poison = inner, inner.config, poison

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        bad = input_ids[:, -1] == self.poison
        out.logits = torch.where(bad[:, None, None], torch.full_like(out.logits, float("nan")), out.logits)
        return out


class FailsOn(torch.nn.Module):
    """The real model, except that a batch holding token `poison` raises `error`; by default as a broken GPU
    does (a CUDA error other than out-of-memory: the device is unusable until the process ends)."""

    def __init__(self, inner: torch.nn.Module, poison: int, error: type[Exception] = torch.AcceleratorError,
                 message: str = "CUDA error: an illegal memory access was encountered"):
        super().__init__()
        self.inner, self.config, self.poison = inner, inner.config, poison
        self.error, self.message = error, message

    def forward(self, input_ids, **kwargs):
        if (input_ids == self.poison).any():
            raise self.error(self.message)
        return self.inner(input_ids=input_ids, **kwargs)


class HangsOn(torch.nn.Module):
    """The real model, except that a batch holding token `poison` waits until `release` is set (a hung step)."""

    def __init__(self, inner: torch.nn.Module, poison: int):
        super().__init__()
        self.inner, self.config, self.poison = inner, inner.config, poison
        self.release = threading.Event()

    def forward(self, input_ids, **kwargs):
        if (input_ids == self.poison).any():
            self.release.wait(60)
        return self.inner(input_ids=input_ids, **kwargs)


def make_wallet(path: Path, name: str, hotkey: str = "default"):
    import bittensor as bt

    wallet = bt.Wallet(name=name, hotkey=hotkey, path=str(path))
    wallet.create_new_coldkey(use_password=False, overwrite=True, suppress=True)
    wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    return wallet


async def local_network(tmp_path: Path, lm, servicers: list) -> tuple:
    """(chain, validator wallet, {uid: axon}): a local chain (subnet 1) with a staked validator, and one real
    miner axon (auth on, on a free port, its address on the chain) per servicer class (None: honest)."""
    from neuron.chain.local import LocalChain

    chain = LocalChain(tmp_path / "chain.sqlite", block_time=0.05)
    chain.create_subnet(1, weights_rate_limit=1, min_validator_stake=1.0, max_validators=2)
    vwallet = make_wallet(tmp_path / "w", "validator")
    chain.register(1, vwallet)
    chain.add_stake(1, vwallet.hotkey.ss58_address, 100.0)
    miners = {}
    for i, servicer in enumerate(servicers):
        w = make_wallet(tmp_path / "w", f"miner{i}")
        uid, _ = chain.register(1, w)
        extra = {"servicer_factory": servicer} if servicer is not None else {}
        axon = make_axon(lm, miner_config(**{"auth.required": True}), keypair=w.hotkey,
                         metagraph=lambda: chain.metagraph(1), **extra)
        chain.serve_axon(1, w, "127.0.0.1", await start_miner(axon))
        miners[uid] = axon
    return chain, vwallet, miners


class WholeBufferStep:
    """What DecodeGraphs.logits computes (the step over every column of the KV ring), without the capture:
    set as a Runner's `graphs` to run the graph's code path eagerly."""

    def __init__(self, runner):
        self.runner = runner

    def logits(self, b):
        r = self.runner
        return r.forward_step(b, r.attention_mask(b, 0, r.max_len), 0, r.max_len)
