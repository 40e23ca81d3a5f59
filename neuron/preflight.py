"""Start-up checks run before a model loads (minutes on a GPU): each failure is one line naming the flag to fix."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from loguru import logger

from neuron.config import ConfigError, MinerConfig, SubtensorConfig, ValidatorConfig, WalletConfig, with_overrides


def miner(config: MinerConfig) -> MinerConfig:
    """`neuron miner`'s checks: chain, wallet, and the address it publishes (the config, with that address set)."""
    chain_flags(config.subtensor)
    on_chain = config.subtensor.network != "none" or bool(config.subtensor.chain_endpoint)
    if on_chain or config.auth.required:
        wallet_files(config.wallet)
    precision(config)
    return axon_address(config) if on_chain else config


def precision(config: MinerConfig | ValidatorConfig) -> None:
    """A precision asked for by name whose honest answers fail verification (neuron/model.py precision_problem)
    is refused before the load; "auto" never picks one, and the miner checks what its engine serves again."""
    vllm = isinstance(config, MinerConfig) and config.engine.backend == "vllm"
    flag, dtype = ("--engine.vllm.dtype", config.engine.vllm.dtype) if vllm else ("--model.dtype", config.model.dtype)
    if dtype != "auto":
        from neuron.model import precision_problem

        if problem := precision_problem(config.model.name, dtype):
            raise ConfigError(f"{flag} {dtype}: {problem}")


def validator(config: ValidatorConfig) -> None:
    """`neuron validator`'s checks: chain, wallet, and the state file it resumes from and saves to."""
    if config.subtensor.network == "none" and not config.subtensor.chain_endpoint:
        raise ConfigError("the validator needs a chain: set --subtensor.network")
    chain_flags(config.subtensor)
    wallet_files(config.wallet)
    state_path(config.state_path)
    precision(config)  # a reference in a refused precision would reject honest miners as surely


def chain_flags(sub: SubtensorConfig) -> None:
    """A local chain's file must exist (a mistyped path must not look like an empty chain); endpoints are ws(s)://."""
    if sub.chain_endpoint:
        if not sub.chain_endpoint.startswith(("ws://", "wss://")):
            raise ConfigError(f"--subtensor.chain_endpoint {sub.chain_endpoint}: expected ws:// or wss://")
        return
    if sub.network != "local":
        return
    if not sub.chain_path:
        raise ConfigError("--subtensor.network local needs --subtensor.chain_path (the local chain's SQLite file)")
    if not Path(sub.chain_path).expanduser().is_file():
        raise ConfigError(f"--subtensor.chain_path: local chain {sub.chain_path} does not exist; "
                          "`neuron register --subtensor.network local` creates one")


def wallet_files(w: WalletConfig) -> None:
    """The wallet's hotkey and public coldkey are on disk (read without unlocking anything)."""
    root = Path(w.path).expanduser() / w.name
    create = (f"create it with: neuron wallet create --wallet.name {w.name} --wallet.hotkey {w.hotkey} "
              f"--wallet.path {w.path}")
    if not root.is_dir():
        raise ConfigError(f"--wallet.name {w.name}: no wallet at {root} (--wallet.path {w.path}); {create}")
    hotkey = root / "hotkeys" / w.hotkey
    if not hotkey.is_file():
        have = sorted(p.name for p in (root / "hotkeys").glob("*") if p.is_file() and not p.name.endswith("pub.txt"))
        listed = f"; this wallet has: {', '.join(have)}" if have else ""
        raise ConfigError(f"--wallet.hotkey {w.hotkey}: no hotkey file at {hotkey}{listed}; {create}")
    if not os.access(hotkey, os.R_OK):
        raise ConfigError(f"--wallet.hotkey {w.hotkey}: {hotkey} is not readable by this user (uid {os.getuid()})")
    if not (root / "coldkeypub.txt").is_file():
        raise ConfigError(f"--wallet.name {w.name}: no coldkeypub.txt in {root}; restore it with "
                          "`btcli wallet regen-coldkeypub` or `neuron wallet regen`")


def state_path(path: str) -> Path:
    """The validator's state: an existing file must load, and its directory must take the atomic save."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_file():
            raise ConfigError(f"--state_path {path}: {p} is not a file")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"--state_path {path}: {p} is not readable by this user (uid {os.getuid()})")
        from neuron.validator.state import State

        try:
            State.load(p)
        except ValueError as exc:
            raise ConfigError(f"--state_path: {exc}") from None
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--state_path {path}: cannot create the directory {parent}: {exc.strerror}") from None
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--state_path {path}: the directory {parent} is not writable by this user "
                          f"(uid {os.getuid()}); the state is saved there after every round")
    return p


def _loopback(ip: str) -> bool:
    if ip == "localhost":
        return True
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def axon_address(config: MinerConfig) -> MinerConfig:
    """Decide what the chain is told before anything is published: a loopback bind on a local chain publishes
    itself; on a shared chain it is refused unless an external address says where a proxy listens."""
    axon, sub = config.axon, config.subtensor
    if axon.external_ip:
        try:
            ipaddress.ip_address(axon.external_ip)
        except ValueError:
            raise ConfigError(f"--axon.external_ip {axon.external_ip}: not an IP address") from None
    local = sub.network == "local" and not sub.chain_endpoint
    port = axon.external_port or axon.port
    if _loopback(axon.ip):
        if not axon.external_ip:
            if local:
                ip = "127.0.0.1" if axon.ip == "localhost" else axon.ip
                logger.info(f"the axon binds loopback ({axon.ip}) on a local chain: publishing {ip}:"
                            f"{port or '(the bound port)'}, reachable from this machine only (--axon.external_ip "
                            "overrides)")
                return with_overrides(config, **{"axon.external_ip": ip})
            raise ConfigError(f"--axon.ip {axon.ip} is loopback: validators on other machines cannot reach it, and the "
                              f"chain ({sub.chain_endpoint or sub.network}) would get this machine's outside address "
                              "where nothing listens; bind --axon.ip 0.0.0.0, or behind a proxy that forwards to this "
                              "port set --axon.external_ip to the proxy's address")
        if not _loopback(axon.external_ip):
            logger.warning(f"--axon.ip {axon.ip} is loopback but --axon.external_ip {axon.external_ip} is published: "
                           f"validators reach this miner only if something on {axon.external_ip}:{port or '(the bound port)'} "
                           f"forwards to {axon.ip}")
    if axon.external_ip and _loopback(axon.external_ip) and not local:
        logger.warning(f"--axon.external_ip {axon.external_ip} is loopback: no validator on "
                       f"{sub.chain_endpoint or sub.network} can reach it")
    return config

