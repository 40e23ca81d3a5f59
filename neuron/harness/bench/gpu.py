"""`neuron bench --bench.only gpu`: decode speed on a GPU, side by side in one run, and a profile of one decode step.

For 1, 16, 64 and 256 streams (64-token prompts, 128 new tokens, greedy), in alternation: the HF engine
called directly, the same through a signed axon over gRPC, plain `model.generate` on the batch, and the
memory-bandwidth bound: every decode step reads the weights once and each stream's keys and values, so
n * bandwidth / (weight bytes + n * mean context * KV bytes per token) tokens/s, with the bandwidth of a
large device-to-device copy timed in the same run. Targets (issue 22): the engine at >= 50% of the bound
at 1 stream and >= 30% at 64, and never below `model.generate`.

Then torch.profiler over a few decode steps of the runner, with CUDA graphs and without: wall time per
step, device busy time, the host's share, the synchronisations, and the top operations (--bench.profile FILE).

    neuron bench --bench.only gpu --model.device cuda --model.dtype float16 --model.name opt-1.3b-random
    neuron bench ... --bench.json bench.json --bench.profile prof.txt   # keep the figures and the profile tables
    neuron bench --bench.only gpu --bench.quick        # the same code on the CPU with the tiny model (a smoke test)

OPT-1.3B's shape with random weights (the speed of a model does not depend on its weights), built on the
device in memory: nothing is downloaded or written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from neuron.harness.bench.figure import Figure, alternate, table
from neuron.config import BenchConfig
from neuron.harness.bench.run import RANDOM, _admit_only, _miner_config, copy_bandwidth, model_of
from neuron.model import TINY_PATH, LoadedModel, load_model

# Where the host waits for the device (a copy to the host waits for the work queued before it).
PROFILE_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
                 "aten::item", "aten::_local_scalar_dense", "cudaGraphLaunch", "cudaLaunchKernel")


@dataclass
class GpuSizes:
    """The issue's sizes; --bench.quick shrinks them to a smoke test."""

    prompt_len: int = 64
    new_tokens: int = 128
    streams: tuple[int, ...] = (1, 16, 64, 256)
    reps: int = 2  # alternations of (engine, axon, generate) per stream count, after one warm-up each
    profile_streams: int = 16
    profile_steps: int = 8


# 12 streams: more than one caller may have in flight by default (auth.max_in_flight), which the bench lifts.
QUICK_GPU = GpuSizes(prompt_len=8, new_tokens=8, streams=(1, 12), reps=1, profile_streams=2, profile_steps=2)


def random_lm(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    """An OPT of `shape` with random weights, made on the device in memory, with the tiny model's tokenizer."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tiny = json.loads((TINY_PATH / "config.json").read_text())
    special = {k: tiny[k] for k in ("bos_token_id", "pad_token_id", "eos_token_id")}
    torch.manual_seed(seed)
    with torch.device(device):
        model = OPTForCausalLM(OPTConfig(**shape, **special)).to(dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_PATH, padding_side="left")
    return LoadedModel(name="random", model=model, tokenizer=tokenizer, device=device, dtype=dtype,
                       vocab_size=shape["vocab_size"], max_positions=shape["max_position_embeddings"],
                       eos_token_id=special["eos_token_id"], weights_fingerprint="0" * 64,
                       tokenizer_fingerprint="0" * 64)


def device_bandwidth(device: torch.device, mb: int = 1024) -> float:
    """Bytes per second a device copy moves (read + write), the best of five, timed with CUDA events."""
    if device.type != "cuda":
        return copy_bandwidth(device)
    x = torch.empty(mb * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del x, y
    torch.cuda.empty_cache()
    return 2 * mb * 2**20 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class GpuBench:
    """One model; per stream count an engine, an axon over its own engine, and plain generate."""

    def __init__(self, lm: LoadedModel, sizes: GpuSizes, workdir: Path):
        from neuron.harness.mocknet import dev_wallet

        self.lm, self.sizes = lm, sizes
        self.gen = torch.Generator().manual_seed(1234)
        self.validator = dev_wallet(workdir / "wallets", "gpu-bench-validator")
        self.miner = dev_wallet(workdir / "wallets", "gpu-bench-miner")

    def prompts(self, n: int) -> list[list[int]]:
        return torch.randint(3, self.lm.vocab_size, (n, self.sizes.prompt_len), generator=self.gen).tolist()

    def config(self, n: int):
        s = self.sizes
        # One caller sends every stream: the per-hotkey bound on calls in flight is lifted.
        return _miner_config(**{"auth.max_in_flight": 0, "batching.max_generate_batch": n,
                                "batching.queue_size": max(256, n),
                                "batching.max_wait_ms": 0.0, "limits.max_seq_len": s.prompt_len + s.new_tokens})

    def engine(self, n: int):
        from neuron.engine import open_engine

        return open_engine(self.config(n), self.lm)

    async def figures(self, bandwidth: float) -> tuple[list[Figure], list[str]]:
        from neuron.axon import Axon
        from neuron.dendrite import Dendrite, Target
        from neuron.engine.runner import kv_shape
        from neuron.engine.types import GenerateJob
        from neuron.pb.neuron.v1 import axon_pb2 as pb

        s, lm = self.sizes, self.lm
        weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
        layers, kv_heads, head_dim = kv_shape(lm.model.config)
        kv_per_token = 2 * layers * kv_heads * head_dim * torch.finfo(lm.dtype).bits // 8
        cuda = lm.device.type == "cuda"
        figures, rows = [], []
        dendrite = Dendrite(self.validator.hotkey)
        try:
            for n in s.streams:
                engine, served = self.engine(n), self.engine(n)  # called directly; served by the axon
                axon = Axon(served, self.config(n), self.miner.hotkey, _admit_only(self.validator.hotkey.ss58_address))
                try:
                    await engine.start()
                    await served.start()
                    target = Target(f"127.0.0.1:{await axon.start()}", self.miner.hotkey.ss58_address)

                    async def direct() -> float:
                        jobs = [GenerateJob(tuple(p), s.new_tokens) for p in self.prompts(n)]
                        start = time.perf_counter()
                        counts = await asyncio.gather(*(_count(engine.generate(j)) for j in jobs))
                        return sum(counts) / (time.perf_counter() - start)

                    async def through_axon() -> float:
                        requests = [pb.GenerateRequest(prompt_ids=p, max_new_tokens=s.new_tokens)
                                    for p in self.prompts(n)]

                        async def one(r) -> int:
                            return len([c async for c in dendrite.stream(target, r, 600)])
                        start = time.perf_counter()
                        counts = await asyncio.gather(*(one(r) for r in requests))
                        return sum(counts) / (time.perf_counter() - start)

                    async def generate() -> float:
                        return await asyncio.to_thread(self.plain_generate, self.prompts(n))

                    for measure in (direct, through_axon, generate):  # warm-up: graphs captured, kernels chosen
                        await measure()
                    xs, zs, gs = await alternate(s.reps, direct, through_axon, generate)
                finally:
                    await axon.stop(grace=0)
                    await served.stop(0)
                    await engine.stop(0)
                context = s.prompt_len + s.new_tokens / 2
                bound = n * bandwidth / (weights + n * context * kv_per_token)
                bound_target = (">= 0.5" if n == 1 else ">= 0.3" if n == 64 else "") if cuda else ""
                at_least = ">= 1.0" if cuda else ""
                figures += [
                    Figure(f"gpu_decode_{n}_engine_vs_bound", f"decode, {n} streams: engine / bandwidth bound",
                           statistics.median(xs), bound, statistics.median(xs) / bound, "tok/s", bound_target),
                    Figure(f"gpu_decode_{n}_axon_vs_bound", f"decode, {n} streams: axon / bandwidth bound",
                           statistics.median(zs), bound, statistics.median(zs) / bound, "tok/s"),
                    Figure.paired(f"gpu_decode_{n}_engine_vs_generate", f"decode, {n} streams: engine / model.generate",
                                  xs, gs, "tok/s", at_least),
                    Figure.paired(f"gpu_decode_{n}_axon_vs_generate", f"decode, {n} streams: axon / model.generate",
                                  zs, gs, "tok/s", at_least),
                ]
                rows.append((n, statistics.median(xs), statistics.median(zs), statistics.median(gs), bound))
                _sync(lm.device)
                if cuda:
                    torch.cuda.empty_cache()
        finally:
            await dendrite.close()
        notes = ["", f"side by side (tok/s; bound: {weights / 2**20:.0f} MiB of weights + {kv_per_token} B of KV "
                     f"per token of context, {bandwidth / 1e9:.0f} GB/s device copy):",
                 f"{'streams':>8} {'engine':>10} {'axon':>10} {'generate':>10} {'bound':>10} {'eng/bound':>9} "
                 f"{'axon/bound':>10} {'eng/gen':>8} {'axon/gen':>8}"]
        notes += [f"{n:>8} {x:>10.1f} {z:>10.1f} {g:>10.1f} {b:>10.1f} {x / b:>9.3f} {z / b:>10.3f} {x / g:>8.2f} "
                  f"{z / g:>8.2f}" for n, x, z, g, b in rows]
        return figures, notes

    def plain_generate(self, prompts: list[list[int]]) -> float:
        """transformers' generate over the whole batch at once (greedy, every row to the full length): tok/s."""
        lm, s = self.lm, self.sizes
        ids = torch.tensor(prompts, device=lm.device)
        _sync(lm.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.new_tokens,
                                    min_new_tokens=s.new_tokens, do_sample=False,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        _sync(lm.device)
        return (out.shape[1] - ids.shape[1]) * len(prompts) / (time.perf_counter() - start)


async def _count(gen) -> int:
    return len([s async for s in gen])


def profile_decode(lm: LoadedModel, sizes: GpuSizes, cuda_graphs: bool) -> str:
    """torch.profiler over `profile_steps` decode steps of `profile_streams` sequences, after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    from neuron.engine.runner import Runner
    from neuron.engine.types import SamplingParams

    n, steps = sizes.profile_streams, sizes.profile_steps
    runner = Runner(lm, n, sizes.prompt_len + 3 * steps + 8, cuda_graphs=cuda_graphs)
    gen = torch.Generator().manual_seed(7)
    prompts = torch.randint(3, lm.vocab_size, (n, sizes.prompt_len), generator=gen).tolist()
    runner.prefill(list(range(n)), prompts, [SamplingParams()] * n, [0] * n, list(range(n)))
    for _ in range(steps):  # warm-up: the graph of this bucket captured
        runner.decode()
    cuda = lm.device.type == "cuda"
    _sync(lm.device)
    start = time.perf_counter()
    for _ in range(steps):
        runner.decode()
    _sync(lm.device)
    wall_ms = (time.perf_counter() - start) / steps * 1000
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner.decode()
        _sync(lm.device)
    events = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / steps
    cpu_us = sum(e.self_cpu_time_total for e in events) / steps
    syncs = {name: e.count / steps for e in events for name in PROFILE_SYNCS if e.key == name}
    graphs = runner.graphs is not None and not runner.graphs.off
    lines = [f"== decode step, {n} sequences, {lm.dtype} on {lm.device}, CUDA graphs "
             f"{'on (replayed)' if graphs else 'off'}: {steps} steps profiled",
             f"wall per step (unprofiled): {wall_ms:.3f} ms",
             (f"device busy per step (sum of kernel self time): {device_us / 1000:.3f} ms = "
              f"{device_us / 1000 / wall_ms:.0%} of the wall time; the rest is host work or gaps" if cuda
              else "device busy per step: (the CPU is the device)"),
             f"host (CPU self time of all ops) per step: {cpu_us / 1000:.3f} ms",
             "synchronisations, copies and launches per step: "
             + (", ".join(f"{k} {v:g}" for k, v in syncs.items()) or "none seen"), ""]
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines.append(events.table(sort_by=sort, row_limit=20, max_name_column_width=60))
    if cuda:
        lines.append(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    for slot in list(runner.params):
        runner.release(slot)
    return "\n".join(lines)


async def run_gpu(lm: LoadedModel, sizes: GpuSizes, workdir: Path) -> tuple[list[Figure], list[str], float]:
    bandwidth = device_bandwidth(lm.device)
    figures, notes = await GpuBench(lm, sizes, workdir).figures(bandwidth)
    return figures, notes, bandwidth


def main(c: BenchConfig, argv: list[str]) -> int:
    """`neuron bench --bench.only gpu` (neuron/cli.py hands over here)."""
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{time:HH:mm:ss} | {level: <7} | {message}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sizes = QUICK_GPU if c.bench.quick else GpuSizes()
    if c.bench.reps:
        sizes = dataclasses.replace(sizes, reps=c.bench.reps)
    model = model_of(c)
    device = torch.device(c.model.device)
    started = time.perf_counter()
    if model in RANDOM:
        dtype = torch.float16 if c.model.dtype == "auto" and device.type == "cuda" else (
            torch.float32 if c.model.dtype == "auto" else getattr(torch, c.model.dtype))
        lm = random_lm(RANDOM[model], device, dtype)
    else:
        lm = load_model(model, c.model.device, c.model.dtype)
    with tempfile.TemporaryDirectory(prefix="neuron-bench-gpu-") as tmp:
        figures, notes, bandwidth = asyncio.run(run_gpu(lm, sizes, Path(tmp)))
    profiles = [profile_decode(lm, sizes, cuda_graphs=True)]
    if lm.device.type == "cuda":
        profiles.append(profile_decode(lm, sizes, cuda_graphs=False))
    gpu = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else "cpu"
    print(f"neuron bench {' '.join(argv)}: model {model}, {lm.dtype} on {lm.device} ({gpu}), "
          f"torch {torch.__version__}, "
          f"{time.perf_counter() - started:.0f} s")
    print(table(figures, notes))
    print("\n".join(p.split("\n\n")[0] for p in profiles))  # the profile's summary lines; the tables go to the file
    if c.bench.profile:
        Path(c.bench.profile).write_text("\n\n".join(profiles) + "\n")
    if c.bench.json:
        report = {"command": ["neuron", "bench", *argv], "model": model, "device": str(lm.device), "gpu": gpu,
                  "dtype": str(lm.dtype), "torch": torch.__version__, "sizes": dataclasses.asdict(sizes),
                  "bandwidth_bytes_per_s": bandwidth, "notes": notes,
                  "figures": {f.key: f.as_dict() for f in figures}}
        Path(c.bench.json).write_text(json.dumps(report, indent=2))
    return 0
