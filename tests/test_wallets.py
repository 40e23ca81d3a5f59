"""Wallet passwords for unattended use are the SDK's own encoded variable: what `neuron wallet password-env` writes,
the SDK (and btcli) unlock the coldkey with; keys are restored from their mnemonic."""

import os
import subprocess
import sys
from pathlib import Path

from neuron import wallets
from neuron.config import WalletConfig

REPO = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("BT_PW_")}
ENV.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")


def neuron(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuron.cli", *args], input=stdin, env=env or ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_the_sdk_unlocks_a_coldkey_with_the_variable_that_password_env_writes(tmp_path):
    flags = ["--wallet.name", "cold", "--wallet.path", str(tmp_path)]
    written = neuron("wallet", "password-env", *flags, stdin="correct horse battery\n")
    assert written.returncode == 0, written.stderr
    name, value = written.stdout.strip().split("=", 1)
    assert name == wallets.coldkey_password_env(WalletConfig(name="cold", path=str(tmp_path)))
    assert value != "correct horse battery"  # the SDK's encoded form, not the plain password
    env = {**ENV, name: value}

    created = neuron("wallet", "create", *flags, env=env)  # no terminal: the password comes from the variable
    assert created.returncode == 0, created.stderr
    assert "neuron wallet password-env --wallet.name cold" in created.stdout
    [public] = [line.split()[1] for line in created.stdout.splitlines() if line.startswith("coldkey 5")]

    # The SDK's own unlock (what neuron stake and btcli use), in a process with no terminal to prompt on.
    unlock = ("import bittensor as bt, sys; from bittensor import wallets as w\n"
              f"wallet = bt.Wallet(name='cold', path={str(tmp_path)!r})\n"
              "print(wallet.coldkey.ss58_address)\n"
              "print(w.resolve_wallet_password(wallet))\n")
    sdk = subprocess.run([sys.executable, "-c", unlock], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=60)
    assert sdk.returncode == 0, sdk.stderr
    assert sdk.stdout.split() == [public, "correct", "horse", "battery"]

    # With the coldkey on disk, password-env checks the password against it before writing anything.
    again = neuron("wallet", "password-env", *flags, stdin="correct horse battery\n")
    assert again.returncode == 0 and again.stdout == written.stdout
    wrong = neuron("wallet", "password-env", *flags, stdin="wrong horse battery\n")
    assert wrong.returncode == 1 and wrong.stdout == "" and "does not unlock" in wrong.stderr


def test_a_plain_or_short_password_in_the_variable_is_refused_with_the_fix(tmp_path):
    flags = ["--wallet.name", "p", "--wallet.path", str(tmp_path)]
    name = wallets.coldkey_password_env(WalletConfig(name="p", path=str(tmp_path)))
    plain = neuron("wallet", "create", *flags, env={**ENV, name: "a plain password"})
    assert plain.returncode == 1 and not (tmp_path / "p").exists()
    assert "not in the SDK's encoded form" in plain.stderr and "neuron wallet password-env" in plain.stderr
    short = neuron("wallet", "create", *flags, env={**ENV, name: wallets.encode_password_env(name, "five5")})
    assert short.returncode == 1 and not (tmp_path / "p").exists()
    assert f"at least {wallets.MIN_PASSWORD_LEN} characters" in short.stderr
    refused = neuron("wallet", "password-env", *flags, stdin="five5\n")
    assert refused.returncode == 1 and refused.stdout == "" and "at least 8" in refused.stderr


def test_encoding_leaves_this_process_environment_as_it_was(monkeypatch):
    monkeypatch.setenv("BT_PW_NEURON_TEST", "before")
    value = wallets.encode_password_env("BT_PW_NEURON_TEST", "a long password")
    assert os.environ["BT_PW_NEURON_TEST"] == "before" and value != "a long password"
    monkeypatch.setenv("BT_PW_NEURON_TEST", value)
    from bittensor.sp_core import get_password_from_environment

    assert get_password_from_environment("BT_PW_NEURON_TEST") == "a long password"


def test_regen_restores_keys_from_their_mnemonics_and_never_overwrites(tmp_path):
    import bittensor as bt

    made = tmp_path / "made"
    words = {}
    w = bt.Wallet(name="r", hotkey="h", path=str(made))
    w.create_new_coldkey(use_password=False, suppress=True, on_mnemonic=lambda m: words.setdefault("cold", m))
    w.create_new_hotkey(suppress=True, on_mnemonic=lambda m: words.setdefault("hot", m))

    flags = ["--wallet.name", "r", "--wallet.hotkey", "h", "--wallet.path", str(tmp_path / "restored")]
    name = wallets.coldkey_password_env(WalletConfig(name="r", path=str(tmp_path / "restored")))
    env = {**ENV, name: wallets.encode_password_env(name, "correct horse battery")}
    cold = neuron("wallet", "regen", *flags, stdin=words["cold"] + "\n", env=env)
    assert cold.returncode == 0, cold.stderr
    assert w.coldkeypub.ss58_address in cold.stdout and "(encrypted)" in cold.stdout
    assert words["cold"] not in cold.stdout + cold.stderr
    hot = neuron("wallet", "regen", *flags, "--key", "hotkey", stdin=words["hot"] + "\n")
    assert hot.returncode == 0, hot.stderr
    assert w.hotkey.ss58_address in hot.stdout

    again = neuron("wallet", "regen", *flags, stdin=words["cold"] + "\n", env=env)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    bad = neuron("wallet", "regen", "--wallet.name", "x", "--wallet.path", str(tmp_path), "--no_password",
                 stdin="not a real mnemonic at all\n")
    assert bad.returncode == 1 and "not a valid mnemonic" in bad.stderr and not (tmp_path / "x").exists()
