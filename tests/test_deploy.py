"""The deploy files run as shipped: the units pass systemd's own checks, the user and directories they need are
declared, and the PM2 file starts without its environment files."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = ["neuron-miner.service", "neuron-validator.service"]
EXPOSURE_LIMIT = 8.7  # systemd-analyze security: below it, better than "EXPOSED"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed on this machine")
    return path


def unit_with_runnable_binary(tmp_path: Path, name: str) -> Path:
    """The unit as shipped, its ExecStart pointed at an executable here (verify checks that it exists)."""
    fake = tmp_path / "bin" / "neuron"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    text = (DEPLOY / "systemd" / name).read_text()
    assert "ExecStart=/opt/neuron/.venv/bin/neuron " in text
    out = tmp_path / name
    out.write_text(text.replace("/opt/neuron/.venv/bin/neuron", str(fake)))
    return out


@pytest.mark.parametrize("name", UNITS)
def test_the_units_pass_systemd_analyze_verify(tmp_path, name):
    analyze = tool("systemd-analyze")
    run = subprocess.run([analyze, "verify", "--man=no", str(unit_with_runnable_binary(tmp_path, name))],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr


@pytest.mark.parametrize("name", UNITS)
def test_the_units_score_better_than_exposed_and_keep_the_gpu(tmp_path, name):
    analyze = tool("systemd-analyze")
    run = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(DEPLOY / "systemd" / name)],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", run.stdout)
    if found is None:
        pytest.skip(f"this systemd-analyze has no offline security review: {run.stderr.strip()[:200]}")
    assert float(found.group(1)) < EXPOSURE_LIMIT, run.stdout
    directives = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in
                  (DEPLOY / "systemd" / name).read_text().splitlines() if "=" in line and not line.startswith("#")}
    # CUDA needs the NVIDIA device nodes, code generation at run time, and /proc/meminfo (vLLM, psutil).
    assert directives["DeviceAllow"] == "char-nvidia* rw"
    for breaks_the_gpu in ("PrivateDevices", "MemoryDenyWriteExecute", "ProcSubset"):
        assert breaks_the_gpu not in directives
    assert directives["StateDirectory"] == directives["LogsDirectory"] == "neuron"
    assert int(directives["StartLimitBurst"]) > 1 and int(directives["StartLimitIntervalSec"]) >= 60
    assert int(directives["RestartSec"]) >= 5


def test_sysusers_and_tmpfiles_make_the_user_and_directories_the_units_use(tmp_path):
    sysusers, tmpfiles = tool("systemd-sysusers"), tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for cmd in ([sysusers, f"--root={root}", str(DEPLOY / "systemd" / "neuron.sysusers.conf")],
                [tmpfiles, f"--root={root}", "--create", str(DEPLOY / "systemd" / "neuron.tmpfiles.conf")]):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
    [entry] = [line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()
               if line.startswith("neuron:")]
    uid, home = int(entry[2]), entry[5]
    assert home == "/var/lib/neuron"  # ProtectHome=yes hides /home: the wallets live under the state directory
    for path, mode, owner in (("etc/neuron", 0o750, 0), ("var/lib/neuron", 0o700, uid), ("var/log/neuron", 0o750, uid),
                              ("opt/neuron", 0o755, 0)):
        st = (root / path).stat()
        assert (st.st_mode & 0o777, st.st_uid) == (mode, owner), path
    state = re.search(r"--state_path (\S+)", (DEPLOY / "validator.env.example").read_text()).group(1)
    assert state.startswith(home + "/")  # inside StateDirectory=neuron, the only writable place besides logs


def test_pm2_starts_without_its_environment_files(tmp_path):
    node = tool("node")
    script = ("const c = require(process.argv[1]);"
              "console.log(JSON.stringify(c.apps.map(a => ({name: a.name, env: a.env, max: a.max_restarts}))));")
    missing = subprocess.run([node, "-e", script, str(DEPLOY / "pm2" / "ecosystem.config.js")],
                             env={**os.environ, "NEURON_ETC": str(tmp_path / "nowhere")}, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 0, missing.stderr
    apps = json.loads(missing.stdout)
    assert [a["name"] for a in apps] == ["neuron-miner", "neuron-validator"]
    assert all(a["env"] == {} and a["max"] for a in apps)
    assert "miner.env not found" in missing.stderr
    (tmp_path / "miner.env").write_text('# a comment\nNEURON_MINER_ARGS="--axon.port 9"\nBT_PW__X=ab+/cd==\n')
    one = subprocess.run([node, "-e", script, str(DEPLOY / "pm2" / "ecosystem.config.js")],
                         env={**os.environ, "NEURON_ETC": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert json.loads(one.stdout)[0]["env"] == {"NEURON_MINER_ARGS": "--axon.port 9", "BT_PW__X": "ab+/cd=="}
