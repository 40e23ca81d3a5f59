"""The miner's liveness: a real miner (run_miner, a real gRPC server, the HF engine over the tiny model)
whose engine dies or hangs goes NOT_SERVING, fails its calls with UNAVAILABLE, says why once, and exits."""

import asyncio
import dataclasses
import socket
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loguru import logger

from conftest import FailsOn, HangsOn, miner_config
from neuron.dendrite import Dendrite, Target
from neuron.engine.types import ForwardJob
from neuron.errors import Unavailable
from neuron.miner import EXIT_ENGINE_DEAD, PortInUse, run_miner
from neuron.pb.neuron.v1 import axon_pb2 as pb
from test_metrics import free_port, readiness

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def wait_serving(health, miner: asyncio.Task, timeout: float = 60) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        assert not miner.done(), miner.result()
        try:
            if (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)).status == SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("the miner never served")


class Miner:
    """run_miner as a task on free ports, with its health stub, a dendrite, and its ERROR log lines."""

    def __init__(self, tiny, model, **overrides):
        self.axon_port, self.metrics_port = free_port(), free_port()
        config = miner_config(**{"model.name": "tiny", "axon.port": self.axon_port, "metrics.ip": "127.0.0.1",
                                 "metrics.port": self.metrics_port, **overrides})
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(run_miner(config, None, None, stop=self.stop,
                                                  model_transform=lambda lm: dataclasses.replace(lm, model=model)))
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.axon_port}")
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.dendrite, self.target = Dendrite(), Target(f"127.0.0.1:{self.axon_port}")
        self.errors: list[str] = []
        self._sink = logger.add(lambda m: self.errors.append(m.record["message"]), level="ERROR")

    async def close(self) -> None:
        logger.remove(self._sink)
        self.stop.set()
        await asyncio.wait_for(self.task, 30)
        await self.dendrite.close()
        await self.channel.close()

    async def generate(self, ids: list[int], timeout: float = 30):
        return await self.dendrite.call(self.target, "Generate", pb.GenerateRequest(prompt_ids=ids, max_new_tokens=4),
                                        timeout)


async def test_a_failed_device_turns_health_not_serving_and_the_miner_exits_non_zero(tiny):
    ids = tiny.tokenizer("Fine zq").input_ids
    miner = Miner(tiny, FailsOn(tiny.model, poison=ids[-1]))
    try:
        await wait_serving(miner.health, miner.task)
        assert await asyncio.to_thread(readiness, miner.metrics_port) == (200, "ok\n")
        watch = miner.health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        assert (await miner.generate(ids[:-1])).ok

        failed = await miner.generate(ids)
        started = time.monotonic()
        assert failed.code == grpc.StatusCode.UNAVAILABLE and "illegal memory access" in failed.message
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        assert await asyncio.wait_for(miner.task, 5) == EXIT_ENGINE_DEAD
        assert time.monotonic() - started < 5
        assert len(miner.errors) == 1 and "AcceleratorError" in miner.errors[0] and "exiting" in miner.errors[0]
    finally:
        await miner.close()


async def test_a_hung_step_is_caught_by_the_watchdog(tiny):
    ids = tiny.tokenizer("Fine zq").input_ids
    model = HangsOn(tiny.model, poison=ids[-1])
    miner = Miner(tiny, model, **{"batching.stall_timeout_s": 1.0})
    try:
        await wait_serving(miner.health, miner.task)
        assert (await miner.generate(ids[:-1])).ok
        started = time.monotonic()
        hung = await miner.generate(ids)
        assert hung.code == grpc.StatusCode.UNAVAILABLE and "no progress" in hung.message
        assert await asyncio.wait_for(miner.task, 5) == EXIT_ENGINE_DEAD
        assert 1.0 <= time.monotonic() - started < 5
        assert len(miner.errors) == 1 and "stall_timeout_s" in miner.errors[0]
    finally:
        model.release.set()
        await miner.close()


async def test_a_stop_signal_still_exits_zero(tiny):
    miner = Miner(tiny, tiny.model)
    try:
        await wait_serving(miner.health, miner.task)
        miner.stop.set()
        assert await asyncio.wait_for(miner.task, 10) == 0
        assert miner.errors == []
    finally:
        await miner.close()


async def test_a_stop_during_the_model_load_serves_nothing(tiny):
    """SIGTERM (the stop event) while the model loads: the miner leaves once the load is done, never binding
    its port or publishing an address, and exits 0."""
    stop, lines = asyncio.Event(), []
    port = free_port()
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")

    def loaded_then_signalled(lm):
        stop.set()  # the signal arrives while the model loads (model_transform runs right after the load)
        return lm

    try:
        code = await asyncio.wait_for(run_miner(miner_config(**{"model.name": "tiny", "axon.port": port}), None, None,
                                                stop=stop, model_transform=loaded_then_signalled), 60)
    finally:
        logger.remove(sink)
    assert code == 0
    assert "stopped while the model loaded: not serving" in lines
    assert not any(line.startswith("axon serving") for line in lines)


async def test_a_port_taken_after_the_check_fails_the_start_and_the_engine_is_stopped(tiny, monkeypatch):
    """The axon's port is taken between the miner's early check and the bind: the start fails with PortInUse,
    and the engine the miner had started is stopped, not left running."""
    from neuron import miner
    from neuron.engine import open_engine

    port, opened, taken = free_port(), [], socket.socket()

    def take_the_port(lm):  # runs after the check, before the engine opens
        taken.bind(("127.0.0.1", port))
        taken.listen()
        return lm

    monkeypatch.setattr(miner, "open_engine", lambda c, lm: opened.append(open_engine(c, lm)) or opened[-1])
    try:
        with pytest.raises(PortInUse, match=f"port {port}"):
            await run_miner(miner_config(**{"model.name": "tiny", "axon.port": port}), None, None,
                            model_transform=take_the_port)
    finally:
        taken.close()
    [engine] = opened
    with pytest.raises(Unavailable):
        await engine.forward(ForwardJob(torch.tensor([[5, 6, 7]]), None, 4))
