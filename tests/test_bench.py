"""`neuron bench --bench.quick` runs end to end and writes every figure; its numbers are never asserted."""

import json
import math
import subprocess
import sys


def test_bench_quick_runs_and_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "neuron.cli", "bench", "--bench.quick", "--bench.json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["command"][:2] == ["neuron", "bench"]
    figures = report["figures"]
    for key in ("forward_latency_axon_vs_direct", "forward_16_batched_vs_single_c8", "forward_16_axon_vs_direct_c8",
                "generate_1_axon_vs_plain", "generate_4_vs_1", "validator_round_2_vs_1", "validator_judge_2_vs_1",
                "sampler_validator_vs_decode_step", "sampler_full_vocab_vs_decode_step", "decode_1_vs_bound",
                "decode_4_vs_bound", "miner_rss_loaded_vs_weights", "miner_peak_rss_vs_weights"):
        f = figures[key]
        assert {"label", "a", "b", "ratio", "unit", "target", "met"} <= set(f), key
        assert all(math.isfinite(f[k]) and f[k] > 0 for k in ("a", "b", "ratio")), f
    assert math.isfinite(figures["miner_peak_rss_per_stream"]["a"])
    assert "A/B" in done.stdout and "forward 16 tok/4 pos, 8 clients" in done.stdout


def test_bench_gateway_quick_runs_and_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "neuron.cli", "bench", "--bench.quick", "--bench.only", "gateway",
                           "--bench.json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    for key in ("gateway_1_stream_vs_direct", "gateway_4_users_vs_direct", "gateway_cpu_per_token", "gateway_ttft_added_p50",
                "gateway_judge_vs_generate_per_token"):
        f = figures[key]
        assert {"label", "a", "b", "ratio", "unit", "target", "met"} <= set(f), key
        assert all(math.isfinite(f[k]) and f[k] > 0 for k in ("a", "b", "ratio")), f
    assert "added time to first token" in done.stdout and "p99" in done.stdout
