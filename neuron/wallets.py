"""Wallets are the SDK's, at btcli's path: an encrypted coldkey, its mnemonic shown once, never overwritten;
its password for unattended use in the SDK's own encoded BT_PW_ variable."""

from __future__ import annotations

import ctypes
import getpass
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import bittensor as bt
from bittensor.keyfiles import Keyfile, KeyfileError, Keypair, WrongPasswordError
from bittensor.sp_core import get_password_from_environment, save_password_to_environment

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


# One rule on every path (prompt, variable, password-env, regen): the SDK's own prompt refuses only an empty one.
MIN_PASSWORD_LEN = 8


def coldkey_password_env(cfg: WalletConfig) -> str:
    """The environment variable the SDK reads the coldkey's password from (for automation)."""
    return _wallet(cfg).coldkey_file.env_var_name()


def _wallet(cfg: WalletConfig) -> bt.Wallet:
    return bt.Wallet(name=cfg.name, hotkey=cfg.hotkey, path=os.path.expanduser(cfg.path))


def check_password(password: str, where: str = "the password") -> str:
    if len(password) < MIN_PASSWORD_LEN:
        raise WalletError(f"{where} is too short: use at least {MIN_PASSWORD_LEN} characters")
    return password


def encode_password_env(name: str, password: str) -> str:
    """The value of `name` that the SDK (and btcli) decode to `password`, made by the SDK's own encoder.

    The SDK's encoder sets the variable in the C environment only (not os.environ); it is read back from there
    and the environment is restored, so this process's environment is unchanged.
    """
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    before = libc.getenv(name.encode())
    save_password_to_environment(name, password)
    value = libc.getenv(name.encode())
    if before is None:
        libc.unsetenv(name.encode())
    else:
        libc.setenv(name.encode(), before, 1)
    if value is None:
        raise WalletError(f"the SDK did not set ${name}")
    return value.decode()


def env_password(cfg: WalletConfig) -> str | None:
    """The coldkey password from its BT_PW_ variable, decoded as the SDK decodes it; None when unset."""
    env = coldkey_password_env(cfg)
    if not os.environ.get(env):
        return None
    fix = password_env_command(cfg)
    try:
        password = get_password_from_environment(env)
    except KeyfileError as exc:
        raise WalletError(f"${env} is not in the SDK's encoded form ({exc}); it holds the plain password? "
                          f"Write the variable with: {fix}") from None
    return check_password(password or "", f"the password in ${env}")


def password_env_command(cfg: WalletConfig) -> str:
    line = f"neuron wallet password-env --wallet.name {cfg.name}"
    return line + (f" --wallet.path {cfg.path}" if cfg.path != WalletConfig().path else "")


def new_password(cfg: WalletConfig, ask: Callable[[str], str] = getpass.getpass) -> str:
    """The coldkey password: from its environment variable (the SDK's encoded form), else asked twice on a
    terminal."""
    from_env = env_password(cfg)
    if from_env is not None:
        return from_env
    if not sys.stdin.isatty():
        raise WalletError(f"the coldkey needs a password and there is no terminal to ask for one: set "
                          f"{coldkey_password_env(cfg)}, in the SDK's encoded form that `{password_env_command(cfg)}` "
                          "writes; or pass --no_password to store it unencrypted (development only)")
    return _ask_twice(f"password for the coldkey {cfg.name}: ", ask)


def _ask_twice(prompt: str, ask: Callable[[str], str]) -> str:
    while True:
        first = ask(prompt)
        if len(first) < MIN_PASSWORD_LEN:
            print(f"use at least {MIN_PASSWORD_LEN} characters", file=sys.stderr)
            continue
        if ask("again: ") == first:
            return first
        print("the passwords differ; try again", file=sys.stderr)


def read_secret(prompt: str, ask: Callable[[str], str] = getpass.getpass) -> str:
    """Asked on a terminal without echo, or one line of stdin (scripts); never from a flag (shell history)."""
    if sys.stdin.isatty():
        return ask(prompt)
    line = sys.stdin.readline()
    if not line:
        raise WalletError(f"{prompt.rstrip(': ')}: nothing on stdin and no terminal to ask on")
    return line.rstrip("\r\n")


def password_env_line(cfg: WalletConfig, ask: Callable[[str], str] = getpass.getpass) -> str:
    """`BT_PW_...=<encoded>` for the coldkey: the password is checked against the coldkey when it exists."""
    env = coldkey_password_env(cfg)
    coldkey = _wallet(cfg).coldkey_file
    if coldkey.exists_on_device():
        if not coldkey.is_encrypted():
            raise WalletError(f"the coldkey {coldkey.path} is not encrypted: it needs no password")
        password = read_secret(f"password of the coldkey {cfg.name}: ", ask)
        try:
            coldkey.get_keypair(password)
        except (WrongPasswordError, KeyfileError, ValueError) as exc:
            raise WalletError(f"that password does not unlock {coldkey.path} ({exc})") from None
    elif sys.stdin.isatty():  # for a coldkey still to be made (neuron wallet create reads the variable)
        password = _ask_twice(f"password for the new coldkey {cfg.name}: ", ask)
    else:
        password = read_secret("password", ask)
    check_password(password)
    return f"{env}={encode_password_env(env, password)}"


def regenerate(cfg: WalletConfig, key: str, mnemonic: str, password: str | None) -> bt.Wallet:
    """Restore the coldkey (encrypted unless `password` is None) or the hotkey from its mnemonic, with the SDK;
    an existing key file is never overwritten."""
    wallet = _wallet(cfg)
    target = wallet.coldkey_file if key == "coldkey" else wallet.hotkey_file
    if target.exists_on_device():
        raise WalletError(f"{key} {target.path} already exists; refusing to overwrite it (move it away first)")
    words = " ".join(mnemonic.split())
    try:
        Keypair.create_from_mnemonic(words)
    except Exception as exc:  # the SDK's binding raises its own types for bad words or checksums
        raise WalletError(f"not a valid mnemonic ({exc})") from None
    if key == "coldkey":
        wallet.regenerate_coldkey(mnemonic=words, use_password=password is not None, coldkey_password=password,
                                  overwrite=False, suppress=True)
    else:
        wallet.regenerate_hotkey(mnemonic=words, use_password=False, overwrite=False, suppress=True)
    return wallet


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
