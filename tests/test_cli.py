"""The command line as a new user runs it: `python -m neuron.cli` in subprocesses, against a local chain."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_wallet
from neuron.chain.local import LocalChain

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
NEURON = [sys.executable, "-m", "neuron.cli"]


def neuron(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*NEURON, *args], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe: a chatty process never blocks on a full pipe
        return subprocess.Popen([*NEURON, *args], env=ENV, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)


def flags(tmp_path: Path, name: str = "") -> list[str]:
    """--subtensor.* for the local chain in tmp_path, and --wallet.* when a wallet name is given."""
    out = ["--subtensor.network", "local", "--subtensor.chain_path", str(tmp_path / "chain.db")]
    return out + (["--wallet.name", name, "--wallet.path", str(tmp_path / "wallets")] if name else [])


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "| ERROR" in line]


def test_wallet_create_refuses_to_overwrite_a_hotkey(tmp_path):
    wallet = ["--wallet.name", "alice", "--wallet.hotkey", "hot", "--wallet.path", str(tmp_path)]
    first = neuron("wallet", "create", *wallet)
    assert first.returncode == 0, first.stderr
    assert "created coldkey and hotkey for alice/hot" in first.stdout
    hotkey_file = tmp_path / "alice" / "hotkeys" / "hot"
    before = hotkey_file.read_bytes()
    address = first.stdout.split("hotkey  ")[1].split()[0]
    assert address.startswith("5") and len(address) == 48

    second = neuron("wallet", "create", *wallet)
    assert second.returncode != 0
    assert "already exists" in second.stderr and "refusing to overwrite" in second.stderr
    assert "Traceback" not in second.stderr and len(error_lines(second.stderr)) == 1
    assert hotkey_file.read_bytes() == before


def test_register_creates_the_local_subnet_then_is_a_no_op(tmp_path):
    wallet = make_wallet(tmp_path / "wallets", "miner")
    hotkey = wallet.hotkey.ss58_address
    first = neuron("register", "--netuid", "3", *flags(tmp_path, "miner"))
    assert first.returncode == 0, first.stderr
    assert "created subnet 3 on the local chain" in first.stderr
    assert f"registered hotkey {hotkey} on netuid 3 as uid 0" in first.stdout

    second = neuron("register", "--netuid", "3", *flags(tmp_path, "miner"))
    assert second.returncode == 0, second.stderr
    assert "created subnet" not in second.stderr
    assert f"hotkey {hotkey} is already registered on netuid 3 as uid 0; nothing to do" in second.stdout
    assert LocalChain(tmp_path / "chain.db").uid_of(3, hotkey) == 0


def test_a_miner_with_an_unregistered_hotkey_exits_with_one_line_naming_the_register_command(tmp_path):
    make_wallet(tmp_path / "wallets", "newbie")
    LocalChain(tmp_path / "chain.db").create_subnet(1)
    run = neuron("miner", "--model.name", "tiny", *flags(tmp_path, "newbie"), "--axon.port", "0")
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    [line] = error_lines(run.stderr)
    assert "is not registered on netuid 1" in line
    command = line.split("register it with: ")[1].split()
    assert command[:2] == ["neuron", "register"]
    # The line is meant to be pasted as it is: it must name this wallet path and this chain.
    pasted = neuron(*command[1:])
    assert pasted.returncode == 0 and "as uid 0" in pasted.stdout, pasted.stderr


def test_a_new_user_serves_a_miner_queries_it_and_stops_it(tmp_path):
    for name in ("miner", "validator"):
        created = neuron("wallet", "create", "--wallet.name", name, "--wallet.path", str(tmp_path / "wallets"))
        assert created.returncode == 0, created.stderr
        registered = neuron("register", "--netuid", "1", *flags(tmp_path, name))
        assert registered.returncode == 0, registered.stderr
    chain = LocalChain(tmp_path / "chain.db")
    miner_hotkey, validator_hotkey = (chain.metagraph(1).by_uid(uid).hotkey for uid in (0, 1))
    chain.add_stake(1, validator_hotkey, 10.0)  # enough for a validator permit, so the miner answers it

    log = tmp_path / "miner.log"
    miner = start("miner", "--model.name", "tiny", *flags(tmp_path, "miner"), "--axon.ip", "127.0.0.1",
                  "--axon.port", "0", "--axon.external_ip", "127.0.0.1", log=log)
    try:
        deadline = time.monotonic() + 60
        while (me := chain.metagraph(1).by_uid(0)).axon is None:
            assert miner.poll() is None, f"the miner exited early ({miner.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the miner never served its axon:\n{log.read_text()}"
            time.sleep(0.2)
        assert me.axon.ip == "127.0.0.1" and me.axon.port != 0  # port 0: the bound port is published

        shown = neuron("metagraph", "--netuid", "1", *flags(tmp_path), "--json")
        assert shown.returncode == 0, shown.stderr
        rows = {row["uid"]: row for row in json.loads(shown.stdout)["neurons"]}
        assert rows[0]["hotkey"] == miner_hotkey and rows[0]["axon"] == str(me.axon)
        assert rows[1]["hotkey"] == validator_hotkey and rows[1]["permit"] is True

        query = ["query", "--axon", str(me.axon), "--prompt", "hi", "--max-new-tokens", "4", "--json"]
        signed = start(*query, "--wallet.name", "validator", "--wallet.path", str(tmp_path / "wallets"),
                       log=tmp_path / "signed.out")
        unsigned = subprocess.Popen([*NEURON, *query], env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        out, err = unsigned.communicate(timeout=60)
        assert unsigned.returncode == 1 and out == ""
        assert "error: UNAUTHENTICATED: the request is not signed" in err and "--wallet.name" in err, err
        assert "Traceback" not in err
        assert signed.wait(timeout=60) == 0, (tmp_path / "signed.out").read_text()
        answer = json.loads((tmp_path / "signed.out").read_text().strip().splitlines()[-1])
        assert answer["signed"] is True and isinstance(answer["text"], str)
        assert 1 <= len(answer["token_ids"]) <= 4 and all(isinstance(t, int) for t in answer["token_ids"])

        miner.send_signal(signal.SIGTERM)
        assert miner.wait(timeout=10) == 0, log.read_text()
    finally:
        if miner.poll() is None:
            miner.kill()
            miner.wait()
    text = log.read_text()
    assert "stopping: finishing in-flight requests" in text and "axon stopped" in text
    assert f"Generate from {validator_hotkey[:8]} OK" in text and "Traceback" not in text
