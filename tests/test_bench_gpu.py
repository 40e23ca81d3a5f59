"""`neuron bench --bench.only gpu --bench.quick` runs end to end on the CPU (the tiny model) and writes every figure
and the profile of a decode step; its numbers are never asserted (on a GPU: scripts/gpu_check.sh)."""

import json
import math
import subprocess
import sys


def test_bench_gpu_quick_runs_and_writes_its_figures_and_profile(tmp_path):
    out, prof = tmp_path / "bench.json", tmp_path / "profile.txt"
    done = subprocess.run([sys.executable, "-m", "neuron.cli", "bench", "--bench.only", "gpu", "--bench.quick",
                           "--bench.json", str(out), "--bench.profile", str(prof)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["bandwidth_bytes_per_s"] > 0
    for n in (1, 12):
        for what in ("engine_vs_bound", "axon_vs_bound", "engine_vs_generate", "axon_vs_generate"):
            f = report["figures"][f"gpu_decode_{n}_{what}"]
            assert all(math.isfinite(f[k]) and f[k] > 0 for k in ("a", "b", "ratio")), f
    assert "side by side" in done.stdout and "eng/bound" in done.stdout
    text = prof.read_text()
    assert "wall per step" in text and "aten::" in text
