"""The whole system on one machine: local chain, miner processes (honest and every dishonest kind), validator."""

import json

from neuron.cli import main
from neuron.harness.cheats import GENERATION, names

GENERATION_CHEATS = names(GENERATION)

# What each cheat must be caught by: the first check it cannot pass.
CAUGHT_BY = {
    "random": "forward:", "random_weights": "forward:", "truncated": "forward:", "quantized": "forward:",
    "noise": "forward:", "replay": "forward:", "echo": "generate:", "early_stop": "generate:",
    "slow": "deadline_exceeded", "dead": "deadline_exceeded",
    # Generation cheats answer Forward honestly; their tokens are not the seeded sampler's. A round can
    # pass on its own (a greedy request, which most of them answer honestly, or a small deviation), but
    # the evidence across rounds flags them and they keep failing for it.
    # selective is honest only on what looked like a challenge once, and the cheap model's otherwise.
    **{k: ("generate:", "evidence:") for k in (*GENERATION_CHEATS, "selective")},
}


def test_the_default_mix_pays_the_honest_miners_only(tmp_path, capsys):
    report, plot = tmp_path / "report.json", tmp_path / "weights.png"
    code = main(["mocknet", "--workdir", str(tmp_path / "net"), "--report", str(report), "--plot", str(plot)])
    assert code == 0
    out = capsys.readouterr().out
    assert "honest miners hold" in out
    data = json.loads(report.read_text())
    rows = data["rows"]
    kinds = sorted(r["kind"] for r in rows if r["kind"] != "honest")
    assert kinds == sorted(CAUGHT_BY)
    honest = [r for r in rows if r["kind"] == "honest"]
    # On a loaded 2-core machine a honest miner may miss one deadline (a dozen processes share it).
    assert len(honest) == 3 and all(r["verified_fraction"] >= 0.75 for r in honest), out
    # On failure, the whole table: which miner held the weight the honest ones lack, and why.
    assert sum(r["weight"] for r in honest) >= 0.95, out
    for r in rows:
        assert {"uid", "hotkey", "kind", "verified_fraction", "weight"} <= set(r)
        if r["kind"] != "honest":
            assert r["weight"] <= 0.01, r
            # A generation cheat's round passes where it changed nothing (steering the tiny model often
            # does not move a token); its weight is what must go, and the evidence sees to that.
            assert r["verified_fraction"] <= (0.75 if r["kind"] in (*GENERATION_CHEATS, "selective") else 0.0), r
            expected = CAUGHT_BY[r["kind"]]
            expected = expected if isinstance(expected, tuple) else (expected,)
            assert any(r["caught_for"].startswith(e) or e in r["caught_for"] for e in expected), r
    # Users through the validator's gateway from round 2 on: answered by honest miners, never by a flagged cheat.
    organic = data["organic"]
    assert "users:" in out and organic["requests"] >= 10 and organic["answered"] >= 0.9, organic
    assert sum(organic["tokens_by_uid"].values()) > 0 and len(organic["tokens_by_uid_by_round"]) == len(
        data["weights_by_round"])
    cheats = {str(r["uid"]) for r in rows if r["kind"] != "honest"}
    assert set(organic["cheat_tokens_after_flagged"]) <= cheats
    assert not any(organic["cheat_tokens_after_flagged"].values()), organic["cheat_tokens_after_flagged"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_temporary_directory_goes_and_ctrl_c_prints_the_rounds_so_far(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "neuron.cli", "mocknet", "--honest", "1", "--dishonest", "slow",
               "--timeout_s", "2"]
    done = subprocess.run([*command, "--rounds", "1"], env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "honest miners hold" in done.stdout
    assert list(tmp_path.glob("neuron-mocknet-*")) == []  # its wallets hold unencrypted coldkeys

    err = tmp_path / "mocknet.err"
    with open(err, "w") as stderr:
        run = subprocess.Popen([*command, "--rounds", "1000"], env=env, cwd=repo, stdout=subprocess.PIPE,
                               stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + 300
        while "round 1:" not in err.read_text():
            assert run.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)
        run.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130, err.read_text()
    assert "interrupted: the table covers the" in out and "slow" in out and "honest miners hold" in out
    [kept] = tmp_path.glob("neuron-mocknet-*")
    assert f"logs: {kept / 'logs'}" in out and (kept / "logs" / "honest-0.log").exists()
    assert "Traceback" not in err.read_text()
    assert "kept in" in err.read_text()
