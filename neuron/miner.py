"""The miner: wiring only. Engine + axon + chain registration, address and metagraph refresh, and the
engine's liveness: a dead or hung engine ends the miner with EXIT_ENGINE_DEAD, for its supervisor to restart."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket

from loguru import logger

from neuron.axon import Axon, AxonServicer
from neuron.chain.base import Chain, Metagraph, NotRegistered
from neuron.config import MinerConfig, WalletConfig
from neuron.engine import open_engine
from neuron.engine.types import Engine
from neuron.signals import until_signalled
from neuron.model import UnverifiablePrecision, load_model, precision_problem


def external_ip(configured: str) -> str:
    """The address published on the chain: configured, else the one the default route uses."""
    if configured:
        return configured
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks a route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


EXIT_ENGINE_DEAD = 75  # sysexits' EX_TEMPFAIL: the engine failed; a restart may well serve again
ENGINE_POLL_S = 0.25  # how often the miner asks its engine whether it still serves


class PortInUse(OSError):
    """The axon's (or the metrics') port is taken; the message says which and what to do."""


def check_port_free(ip: str, port: int, flag: str = "--axon.port") -> None:
    """Fail before the model loads (minutes for a large one) when the port cannot be bound."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
        try:
            s.bind((ip, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} on {ip} is already in use (another miner?): stop that process, or "
                                f"pick a free port with {flag} N") from None
            raise PortInUse(f"cannot bind {ip}:{port}: {exc.strerror}; check {flag} and the address") from None


def is_public(ip: str) -> bool:
    """Whether a bind address is reachable from other machines (0.0.0.0 and non-loopback addresses)."""
    try:
        return not ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip not in ("localhost",)


class MetagraphCache:
    """The latest metagraph, refreshed in the background; admission reads it without touching the chain."""

    def __init__(self, chain: Chain | None, netuid: int):
        self.chain, self.netuid = chain, netuid
        self.current: Metagraph | None = None

    def __call__(self) -> Metagraph | None:
        return self.current

    async def refresh(self) -> None:
        if self.chain is not None:
            self.current = await asyncio.to_thread(self.chain.metagraph, self.netuid)

    async def keep_fresh(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.refresh()
            except Exception as exc:  # keep serving on the last good metagraph
                logger.warning(f"metagraph refresh failed, keeping the one from block "
                               f"{self.current.block if self.current else '-'}: {exc}")


async def engine_death(engine: Engine) -> str:
    """Why the engine stopped serving, once it has (it never comes back)."""
    while (why := engine.dead_reason()) is None:
        await asyncio.sleep(ENGINE_POLL_S)
    return why


async def stopped_or_dead(stop: asyncio.Event, engine: Engine) -> str | None:
    """Wait for a stop signal (None) or the engine's death (why)."""
    signalled, dead = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(engine_death(engine))
    try:
        await asyncio.wait((signalled, dead), return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
        dead.cancel()
    return dead.result() if dead.done() and not dead.cancelled() else None


async def run_miner(config: MinerConfig, chain: Chain | None, wallet, stop: asyncio.Event | None = None,
                    servicer_factory=AxonServicer, model_transform=None) -> int:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then shut down gracefully, and return 0; or until the
    engine can no longer serve, then return EXIT_ENGINE_DEAD. servicer_factory and model_transform
    (LoadedModel -> LoadedModel) are for harnesses (neuron/harness/cheat_miner.py)."""
    stop = stop or asyncio.Event()
    engine = axon = refresher = metrics_server = died = None
    # Handlers first: a SIGTERM while the model loads must still end in a clean shutdown, not a kill.
    with until_signalled(stop):
        try:
            netuid = config.subtensor.netuid
            check_port_free(config.axon.ip, config.axon.port)
            if config.metrics.port:
                check_port_free(config.metrics.ip, config.metrics.port, "--metrics.port")
            if not config.auth.required and is_public(config.axon.ip):
                logger.warning(f"auth is off (--auth.required false) and the axon binds {config.axon.ip}, reachable "
                               "from other machines: anyone can use this model; bind 127.0.0.1 for development")
            keypair = wallet.hotkey if wallet is not None else None
            metagraph = MetagraphCache(chain, netuid)
            if chain is not None:
                await metagraph.refresh()
                hotkey = keypair.ss58_address
                me = metagraph.current.by_hotkey(hotkey)
                if me is None:
                    raise NotRegistered(f"hotkey {hotkey} ({config.wallet.name}/{config.wallet.hotkey}) is not registered "
                                        f"on netuid {netuid}; register it with: {register_command(config)}")
                logger.info(f"hotkey {hotkey[:8]} is uid {me.uid} on netuid {netuid}")
            lm = None
            if model_transform is not None:  # a harness: its model behind the same engine
                lm = await asyncio.to_thread(
                    lambda: model_transform(load_model(config.model.name, config.model.device, config.model.dtype)))
            engine = await asyncio.to_thread(open_engine, config, lm)
            await engine.start()  # the miner owns the engine: the axon only serves it (vLLM knows its model only now)
            if stop.is_set():  # SIGTERM while the model loaded (a load cannot be cut short): serve nothing, publish nothing
                logger.info("stopped while the model loaded: not serving")
                return 0
            if problem := await asyncio.to_thread(precision_problem, config.model.name, engine.info().dtype):
                # an honest miner rejected round after round is worse than one that never starts (the engine stops below)
                raise UnverifiablePrecision(f"not serving: {problem}")
            server = Axon(engine, config, keypair, metagraph, servicer_factory=servicer_factory)
            if config.metrics.port:
                from neuron import metrics

                server.guard.metrics = metrics.MinerMetrics(engine.stats)
                metrics_server = metrics.serve(server.guard.metrics.registry, config.metrics.ip, config.metrics.port,
                                               not_ready=lambda: server.down)
                logger.info(f"metrics at http://{config.metrics.ip}:{metrics_server.server_port}/metrics, "
                            "readiness at /health")
            try:
                port = await server.start()
            except RuntimeError as exc:  # gRPC's "Failed to bind": taken between the check and now
                raise PortInUse(f"port {config.axon.port} on {config.axon.ip} could not be bound ({exc}); pick a free "
                                "port with --axon.port N") from None
            axon = server  # stopped on the way out only once it started
            if chain is not None:
                ip, public_port = external_ip(config.axon.external_ip), config.axon.external_port or port
                await asyncio.to_thread(chain.serve_axon, netuid, wallet, ip, public_port)
                logger.info(f"served axon address {ip}:{public_port} on the chain")
                refresher = asyncio.create_task(metagraph.keep_fresh(config.auth.metagraph_refresh_s))
            died = await stopped_or_dead(stop, engine)
            if died is None:
                logger.info("stopping: finishing in-flight requests")
            else:
                logger.error(f"the engine can no longer serve: {died}; exiting with code {EXIT_ENGINE_DEAD} for the "
                             "supervisor to restart the miner")
        finally:
            if refresher is not None:
                refresher.cancel()
            if axon is not None:  # the server first (in-flight calls finish within grace), then its engine
                await axon.stop(why=f"the engine can no longer serve: {died}" if died else "shutting down")
            if engine is not None:  # stopped however far the start got (a port taken after the check included)
                await engine.stop(config.axon.grace_s)
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
    return 0 if died is None else EXIT_ENGINE_DEAD


def register_command(config: MinerConfig) -> str:
    """The `neuron register` line for this miner's wallet and chain, to paste as it is."""
    w, sub = config.wallet, config.subtensor
    line = (f"neuron register --netuid {sub.netuid} --wallet.name {w.name} --wallet.hotkey {w.hotkey} "
            f"--subtensor.network {sub.network}")
    if w.path != WalletConfig().path:
        line += f" --wallet.path {w.path}"
    if sub.chain_path:
        line += f" --subtensor.chain_path {sub.chain_path}"
    return line
