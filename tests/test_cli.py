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


def wait_serving(proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until a started miner logs that its axon serves; fails with its log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while "axon serving" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def stop(proc: subprocess.Popen, log: Path) -> None:
    """SIGTERM, and a clean exit within 10 s."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, log.read_text()


def flags(tmp_path: Path, name: str = "") -> list[str]:
    """--subtensor.* for the local chain in tmp_path, and --wallet.* when a wallet name is given."""
    out = ["--subtensor.network", "local", "--subtensor.chain_path", str(tmp_path / "chain.db")]
    return out + (["--wallet.name", name, "--wallet.path", str(tmp_path / "wallets")] if name else [])


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "| ERROR" in line]


def test_wallet_create_refuses_to_overwrite_a_hotkey(tmp_path):
    wallet = ["--wallet.name", "alice", "--wallet.hotkey", "hot", "--wallet.path", str(tmp_path), "--no-password"]
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


def test_a_new_user_serves_a_miner_validates_it_queries_it_and_stops_it(tmp_path):
    """The README's flow: wallets, register, miner, a validator refused for want of a permit, stake, verified."""
    for name in ("miner", "validator"):
        created = neuron("wallet", "create", "--wallet.name", name, "--wallet.path", str(tmp_path / "wallets"),
                         "--no-password")
        assert created.returncode == 0, created.stderr
        registered = neuron("register", "--netuid", "1", *flags(tmp_path, name))
        assert registered.returncode == 0, registered.stderr
    chain = LocalChain(tmp_path / "chain.db")
    miner_hotkey, validator_hotkey = (chain.metagraph(1).by_uid(uid).hotkey for uid in (0, 1))

    log = tmp_path / "miner.log"
    miner = start("miner", "--model.name", "tiny", *flags(tmp_path, "miner"), "--axon.ip", "127.0.0.1",
                  "--axon.port", "0", "--axon.external_ip", "127.0.0.1", "--auth.metagraph_refresh_s", "0.2", log=log)
    validate = ["validator", "--netuid", "1", "--model.name", "tiny", *flags(tmp_path, "validator"), "--rounds", "1",
                "--state_path", str(tmp_path / "state.json"), "--timeout_s", "20"]
    try:
        deadline = time.monotonic() + 60
        while (me := chain.metagraph(1).by_uid(0)).axon is None:
            assert miner.poll() is None, f"the miner exited early ({miner.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the miner never served its axon:\n{log.read_text()}"
            time.sleep(0.2)
        assert me.axon.ip == "127.0.0.1" and me.axon.port != 0  # port 0: the bound port is published

        # No stake yet: the validator is told at start-up, and each refusal is named in the round's INFO lines.
        refused = neuron(*validate)
        assert refused.returncode == 0, refused.stderr
        assert f"uid 1 ({validator_hotkey}) has no validator permit on netuid 1" in refused.stderr
        assert "neuron stake add --amount" in refused.stderr
        assert "1 of 1 serving miners answer" in refused.stderr  # Info is public: reachable, permit or not
        assert "round 1: 0/1 miners verified" in refused.stderr
        assert f"round 1: uid 0 {miner_hotkey} refused: forward: permission_denied" in refused.stderr
        assert "PERMISSION_DENIED" in log.read_text() and f"(hotkey {validator_hotkey})" in log.read_text()

        staked = neuron("stake", "add", "--amount", "10", "--netuid", "1", *flags(tmp_path, "validator"))
        assert staked.returncode == 0, staked.stderr
        assert f"uid 1 ({validator_hotkey}) on netuid 1 now has stake 10; validator permit: yes" in staked.stdout
        for _ in range(5):  # the miner re-reads the metagraph every 0.2 s; a busy machine may lag a little
            verified = neuron(*validate)
            assert verified.returncode == 0, verified.stderr
            if "1/1 miners verified" in verified.stderr:
                break
        assert "1/1 miners verified" in verified.stderr, verified.stderr
        assert "resumed validator state" in verified.stderr and "no validator permit" not in verified.stderr

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

        stop(miner, log)
    finally:
        if miner.poll() is None:
            miner.kill()
            miner.wait()
    text = log.read_text()
    assert "stopping: finishing in-flight requests" in text and "axon stopped" in text
    assert f"Generate from {validator_hotkey[:8]} OK" in text and "Traceback" not in text


COMMANDS = ["miner", "validator", "mocknet", "wallet", "register", "stake", "metagraph", "query", "bench"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_help_listing_its_flags_with_defaults(command):
    shown = neuron(command, "--help")
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    assert shown.stdout.startswith(f"usage: neuron {command}")
    assert "(default: " in shown.stdout and "--config PATH" in shown.stdout
    expected = {"miner": ["--axon.port INT", "default: 8091", "--netuid = --subtensor.netuid", "--metrics.port"],
                "validator": ["--rounds INT", "--state_path TEXT", "rounds of this process", "--logging.logging_dir"],
                "mocknet": ["--keep", "--honest INT"],
                "wallet": ["create|list", "--no_password"],
                "register": ["--wallet.name TEXT", "--subtensor.chain_endpoint", "--logging.debug", "--yes"],
                "stake": ["add|remove", "--amount FLOAT", "--yes"],
                "metagraph": ["--json", "--logging.debug", "--netuid = --subtensor.netuid"],
                "query": ["--max_new_tokens INT", "--axon TEXT"],
                "bench": ["--bench.only A,B,...", "--bench.reps INT", "alternations per figure", "--model.name TEXT",
                          "--engine.backend TEXT", "--engine.vllm.kv_cache_memory_bytes INT", "default: 536870912"]}[command]
    for needle in expected:
        assert needle in shown.stdout, needle
    assert neuron("help", command).stdout == shown.stdout


@pytest.mark.parametrize("argv, message", [
    (["--bench.only", "forward,gpu"], "--bench.only gpu runs alone"),
    (["--bench.only", "froward"], "--bench.only froward: expected some of overhead,forward,"),
    (["--engine.backend", "tgi"], "--engine.backend tgi: expected one of hf, vllm"),
    (["--quick"], "unknown option --quick; did you mean --bench.quick?"),
])
def test_bench_refuses_what_it_cannot_run_before_any_work(argv, message):
    run = neuron("bench", *argv)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    [line] = error_lines(run.stderr)
    assert message in line


def test_version_usage_and_a_mistyped_command_or_flag():
    version = neuron("--version")
    assert version.returncode == 0 and version.stdout.startswith("neuron ")
    usage = neuron()
    assert usage.returncode == 0 and all(c in usage.stdout for c in COMMANDS)
    typo = neuron("minre")
    assert typo.returncode == 2 and "did you mean `neuron miner`?" in typo.stderr
    flag = neuron("miner", "--axon.prot", "8092")
    assert flag.returncode == 1 and "Traceback" not in flag.stderr
    [line] = error_lines(flag.stderr)
    assert "unknown option --axon.prot; did you mean --axon.port?" in line


def test_config_files_missing_or_given_with_an_equals_sign(tmp_path):
    missing = neuron("miner", "--config", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 1
    [line] = error_lines(missing.stderr)
    assert "missing.yaml does not exist" in line
    LocalChain(tmp_path / "chain.db").create_subnet(2)
    config = tmp_path / "metagraph.yaml"
    config.write_text(f"subtensor:\n  network: local\n  chain_path: {tmp_path / 'chain.db'}\n")
    for form in ([f"--config={config}"], ["--config", str(config)]):
        shown = neuron("metagraph", *form, "--netuid", "2", "--logging.debug")
        assert shown.returncode == 0, shown.stderr
        assert "netuid 2 at block" in shown.stdout


def test_a_mistyped_chain_path_is_an_error_and_creates_nothing(tmp_path):
    typo = tmp_path / "chian.db"
    for command in (["metagraph", "--netuid", "1"], ["miner", "--model.name", "tiny", "--axon.port", "0"],
                    ["validator", "--model.name", "tiny"]):
        run = neuron(*command, "--subtensor.network", "local", "--subtensor.chain_path", str(typo))
        assert run.returncode == 1
        [line] = error_lines(run.stderr)
        assert f"local chain {typo} does not exist" in line, command
        assert not typo.exists()


def test_stake_off_a_local_chain_shows_what_it_does_and_needs_a_yes(tmp_path):
    make_wallet(tmp_path / "wallets", "alice")
    # No node listens here: the confirmation must come before anything touches the chain.
    run = neuron("stake", "add", "--amount", "2", "--netuid", "3", "--subtensor.chain_endpoint", "ws://127.0.0.1:9",
                 "--wallet.name", "alice", "--wallet.path", str(tmp_path / "wallets"))
    assert run.returncode == 1
    assert "staking 2 TAO from coldkey" in run.stderr and "on subnet 3 of ws://127.0.0.1:9" in run.stderr
    [line] = error_lines(run.stderr)
    assert "not confirmed" in line and "--yes" in line


def test_wallet_create_encrypts_the_coldkey_shows_mnemonics_once_and_lists(tmp_path):
    from bittensor.keyfiles import Keyfile

    path = tmp_path / "wallets"
    wallet = ["--wallet.name", "bob", "--wallet.path", str(path)]
    refused = neuron("wallet", "create", *wallet)  # no terminal, no password variable
    assert refused.returncode == 1
    [line] = error_lines(refused.stderr)
    variable = line.split("set ")[1].split(",")[0]
    assert variable.startswith("BT_PW_") and "--no_password" in line and not (path / "bob").exists()

    from neuron.wallets import encode_password_env

    env = {**ENV, variable: encode_password_env(variable, "correct horse battery")}  # as password-env writes it
    created = subprocess.run([*NEURON, "wallet", "create", *wallet], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    cold_words = created.stdout.split("coldkey mnemonic")[1].splitlines()[1].split()
    assert len(cold_words) == 12 and "hotkey mnemonic" in created.stdout
    assert Keyfile(str(path / "bob" / "coldkey")).is_encrypted()
    assert " ".join(cold_words).encode() not in (path / "bob" / "coldkey").read_bytes()

    second = neuron("wallet", "create", *wallet, "--wallet.hotkey", "second")  # the coldkey exists: no password
    assert second.returncode == 0, second.stderr
    assert "coldkey mnemonic" not in second.stdout and "hotkey mnemonic" in second.stdout

    listed = neuron("wallet", "list", "--wallet.path", str(path))
    assert listed.returncode == 0, listed.stderr
    assert "bob" in listed.stdout and "(encrypted)" in listed.stdout
    assert "hotkey default" in listed.stdout and "hotkey second" in listed.stdout


def test_validator_rounds_count_this_process_and_end_when_no_miner_serves(tmp_path):
    make_wallet(tmp_path / "wallets", "validator")
    assert neuron("register", "--netuid", "1", *flags(tmp_path, "validator")).returncode == 0
    chain = LocalChain(tmp_path / "chain.db")
    chain.add_stake(1, chain.metagraph(1).by_uid(0).hotkey, 10.0)
    args = ["validator", "--model.name", "tiny", *flags(tmp_path, "validator"), "--round_interval_s", "0",
            "--state_path", str(tmp_path / "state.json")]
    run = neuron(*args, "--rounds", "2")
    assert run.returncode == 1
    assert "no validator permit" not in run.stderr
    assert run.stderr.count("no miner on netuid 1 serves an axon") == 2
    [line] = error_lines(run.stderr)
    assert "2 rounds and no miner could be queried" in line

    # A miner that publishes an address nobody answers on: named at start-up and in each round.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    ghost = make_wallet(tmp_path / "wallets", "ghost")
    uid, _ = chain.register(1, ghost)
    chain.serve_axon(1, ghost, "127.0.0.1", closed)
    for expected_round in (1, 2):  # --rounds 1 after a saved round still runs one round
        run = neuron(*args, "--rounds", "1", "--timeout_s", "5")
        assert run.returncode == 0, run.stderr
        hotkey = ghost.hotkey.ss58_address
        assert f"uid {uid} {hotkey} at 127.0.0.1:{closed} is unreachable" in run.stderr
        assert f"round {expected_round}: uid {uid} {hotkey} unreachable: forward: unavailable" in run.stderr
        assert "stopped after 1 rounds of this process" in run.stderr


def test_a_busy_port_is_one_line_before_the_model_loads(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = neuron("miner", "--model.name", "tiny", "--subtensor.network", "none", "--auth.required", "false",
                     "--axon.ip", "127.0.0.1", "--axon.port", str(port))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    [line] = error_lines(run.stderr)
    assert f"port {port} on 127.0.0.1 is already in use" in line and "--axon.port" in line
    assert "model tiny" not in run.stderr  # nothing was loaded
    assert len(run.stderr.strip().splitlines()) == 1


def test_missing_models_fail_fast_with_the_fix(tmp_path):
    args = ["miner", "--subtensor.network", "none", "--auth.required", "false", "--axon.port", "0"]
    path = neuron(*args, "--model.name", str(tmp_path / "no-such-model"))
    assert path.returncode == 1
    [line] = error_lines(path.stderr)
    assert "does not exist" in line and "no-such-model" in line
    hub = neuron(*args, "--model.name", "someone/not-cached")  # HF_HUB_OFFLINE=1 in these tests
    assert hub.returncode == 1
    [line] = error_lines(hub.stderr)
    assert "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE=1 forbids" in line
    assert "there is no local directory 'someone/not-cached'" in line and "--model.name /path/to/model" in line


def test_a_dev_miner_without_auth_on_a_public_address_warns_and_logs_to_a_file(tmp_path):
    logs = tmp_path / "logs"
    log = tmp_path / "miner.out"
    miner = start("miner", "--model.name", "tiny", "--subtensor.network", "none", "--auth.required", "false",
                  "--axon.ip", "0.0.0.0", "--axon.port", "0", "--logging.logging_dir", str(logs), "--logging.json",
                  log=log)
    try:
        wait_serving(miner, log)
        stop(miner, log)
    finally:
        if miner.poll() is None:
            miner.kill()
            miner.wait()
    records = [json.loads(line) for line in (logs / "miner.log").read_text().splitlines()]
    warnings = [r["message"] for r in records if r["level"] == "WARNING"]
    assert any("auth is off" in w and "0.0.0.0" in w for w in warnings), warnings
    assert any("axon stopped" in r["message"] for r in records)


def test_a_bad_state_path_is_one_line_naming_the_flag_before_the_model_loads(tmp_path):
    make_wallet(tmp_path / "wallets", "validator")
    LocalChain(tmp_path / "chain.db").create_subnet(1)
    (tmp_path / "state").mkdir()
    run = neuron("validator", "--model.name", "tiny", *flags(tmp_path, "validator"), "--state_path",
                 str(tmp_path / "state"))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    [line] = error_lines(run.stderr)
    assert f"--state_path {tmp_path / 'state'}" in line and "is not a file" in line
    assert len(run.stderr.strip().splitlines()) == 1  # nothing loaded, no round ran, no "state saved"
