"""Wallets are the SDK's, at btcli's path; created without prompts and never overwritten."""

from __future__ import annotations

import os

import bittensor as bt

from neuron.config import WalletConfig


class WalletError(RuntimeError):
    """A wallet is missing or would be overwritten; the message says what to run."""


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


def create_wallet(cfg: WalletConfig) -> tuple[bt.Wallet, list[str]]:
    """Create the coldkey (if absent) and the hotkey, unencrypted; refuses to overwrite a hotkey."""
    path = os.path.expanduser(cfg.path)
    wallet = bt.Wallet(name=cfg.name, hotkey=cfg.hotkey, path=path)
    created = []
    hotkey_file = os.path.join(path, cfg.name, "hotkeys", cfg.hotkey)
    if os.path.exists(hotkey_file):
        raise WalletError(f"hotkey {cfg.name}/{cfg.hotkey} already exists at {hotkey_file}; refusing to overwrite it")
    if not os.path.exists(os.path.join(path, cfg.name, "coldkeypub.txt")):
        wallet.create_new_coldkey(use_password=False, overwrite=False, suppress=True)
        created.append("coldkey")
    wallet.create_new_hotkey(use_password=False, overwrite=False, suppress=True)
    created.append("hotkey")
    return wallet, created
