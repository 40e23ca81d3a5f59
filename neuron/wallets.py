"""Wallets are the SDK's, at btcli's path: an encrypted coldkey, its mnemonic shown once, never overwritten."""

from __future__ import annotations

import getpass
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import bittensor as bt
from bittensor.keyfiles import Keyfile

from neuron.config import WalletConfig


class WalletError(RuntimeError):
    """A wallet is missing, would be overwritten, or cannot be unlocked; the message says what to do."""


def open_wallet(cfg: WalletConfig) -> bt.Wallet:
    """The wallet, with its hotkey readable (a clear error naming the create command otherwise)."""
    wallet = bt.Wallet(name=cfg.name, hotkey=cfg.hotkey, path=os.path.expanduser(cfg.path))
    try:
        wallet.hotkey
        wallet.coldkeypub
    except FileNotFoundError as exc:
        raise WalletError(f"{exc}; create it with: neuron wallet create --wallet.name {cfg.name} "
                          f"--wallet.hotkey {cfg.hotkey} --wallet.path {cfg.path}") from None
    return wallet


def coldkey_password_env(cfg: WalletConfig) -> str:
    """The environment variable the SDK reads the coldkey's password from (for automation)."""
    return bt.Wallet(name=cfg.name, hotkey=cfg.hotkey, path=os.path.expanduser(cfg.path)).coldkey_file.env_var_name()


def new_password(cfg: WalletConfig, ask: Callable[[str], str] = getpass.getpass) -> str:
    """The coldkey password: from its environment variable, else asked twice on a terminal."""
    env = coldkey_password_env(cfg)
    if os.environ.get(env):
        return os.environ[env]
    if not sys.stdin.isatty():
        raise WalletError(f"the coldkey needs a password and there is no terminal to ask for one: set {env}, "
                          "or pass --no_password to store it unencrypted (development only)")
    while True:
        first = ask(f"password for the coldkey {cfg.name}: ")
        if len(first) < 8:
            print("use at least 8 characters", file=sys.stderr)
            continue
        if ask("again: ") == first:
            return first
        print("the passwords differ; try again", file=sys.stderr)


def create_wallet(cfg: WalletConfig, password: str | None,
                  show_mnemonic: Callable[[str, str], None]) -> tuple[bt.Wallet, list[str]]:
    """Create the coldkey (if absent; encrypted unless `password` is None) and the hotkey.

    `show_mnemonic(kind, words)` is called once per new key: the only time the words are shown.
    Refuses to overwrite a hotkey.
    """
    path = os.path.expanduser(cfg.path)
    wallet = bt.Wallet(name=cfg.name, hotkey=cfg.hotkey, path=path)
    created = []
    hotkey_file = os.path.join(path, cfg.name, "hotkeys", cfg.hotkey)
    if os.path.exists(hotkey_file):
        raise WalletError(f"hotkey {cfg.name}/{cfg.hotkey} already exists at {hotkey_file}; refusing to overwrite it")
    if not os.path.exists(os.path.join(path, cfg.name, "coldkeypub.txt")):
        wallet.create_new_coldkey(use_password=password is not None, coldkey_password=password, overwrite=False,
                                  suppress=True, on_mnemonic=lambda words: show_mnemonic("coldkey", words))
        created.append("coldkey")
    # Hotkeys stay unencrypted, as with btcli: a miner signs with it unattended.
    wallet.create_new_hotkey(use_password=False, overwrite=False, suppress=True,
                             on_mnemonic=lambda words: show_mnemonic("hotkey", words))
    created.append("hotkey")
    return wallet, created


@dataclass(frozen=True)
class WalletEntry:
    """One wallet on disk, read without unlocking anything."""

    name: str
    coldkey: str  # ss58 from coldkeypub.txt, "" when missing
    encrypted: bool | None  # None when the coldkey file is absent (a public-key-only wallet)
    hotkeys: tuple[tuple[str, str], ...]  # (name, ss58)


def list_wallets(path: str) -> list[WalletEntry]:
    """Every wallet under `path`, sorted by name."""
    root = Path(os.path.expanduser(path))
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        w = bt.Wallet(name=d.name, path=str(root))
        try:
            coldkey = w.coldkeypub.ss58_address
        except Exception:  # unreadable or absent: still listed, so the operator sees it
            coldkey = ""
        cold = Keyfile(str(d / "coldkey"))
        encrypted = cold.is_encrypted() if cold.exists_on_device() else None
        hotkeys = []
        for h in sorted((d / "hotkeys").iterdir()) if (d / "hotkeys").is_dir() else []:
            if h.is_file() and not h.name.endswith("pub.txt"):
                try:
                    hotkeys.append((h.name, bt.Wallet(name=d.name, hotkey=h.name, path=str(root)).hotkey.ss58_address))
                except Exception:
                    hotkeys.append((h.name, "(unreadable)"))
        out.append(WalletEntry(d.name, coldkey, encrypted, tuple(hotkeys)))
    return out
