"""Prometheus metrics and the readiness probe: scraped from a real miner process, and the validator's and the
engine's exporters."""

import dataclasses
import json
import socket
import urllib.error
import urllib.request

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from neuron.engine.types import EngineStats
from neuron.metrics import MinerMetrics, ValidatorMetrics, refusal_reason, serve
from test_cli import neuron, start, stop, wait_serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return samples(response.read().decode())


def readiness(port: int) -> tuple[int, str]:
    """GET /health: (status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_real_miner_serves_request_engine_and_refusal_metrics(tmp_path):
    axon_port, metrics_port = free_port(), free_port()
    log = tmp_path / "miner.log"
    miner = start("miner", "--model.name", "tiny", "--subtensor.network", "none", "--auth.required", "false",
                  "--axon.ip", "127.0.0.1", "--axon.port", str(axon_port), "--metrics.ip", "127.0.0.1",
                  "--metrics.port", str(metrics_port), log=log)
    try:
        wait_serving(miner, log)
        assert readiness(metrics_port) == (200, "ok\n")
        before = scrape(metrics_port)
        assert ("neuron_miner_requests_total", (("rpc", "Generate"), ("status", "OK"))) not in before
        assert before[("neuron_miner_engine_queued", ())] == 0.0

        answer = neuron("query", "--axon", f"127.0.0.1:{axon_port}", "--prompt", "hi", "--max-new-tokens", "3", "--json")
        assert answer.returncode == 0, answer.stderr
        tokens = len(json.loads(answer.stdout)["token_ids"])
        too_long = neuron("query", "--axon", f"127.0.0.1:{axon_port}", "--prompt", "hi", "--max-new-tokens", "100000")
        assert too_long.returncode == 1 and "INVALID_ARGUMENT" in too_long.stderr

        after = scrape(metrics_port)
        assert after[("neuron_miner_requests_total", (("rpc", "Generate"), ("status", "OK")))] == 1.0
        assert after[("neuron_miner_requests_total", (("rpc", "Generate"), ("status", "INVALID_ARGUMENT")))] == 1.0
        assert after[("neuron_miner_request_seconds_count", (("rpc", "Generate"),))] == 1.0
        assert after[("neuron_miner_request_seconds_sum", (("rpc", "Generate"),))] > 0
        assert after[("neuron_miner_generated_tokens_total", ())] == tokens
        assert {"neuron_miner_engine_running", "neuron_miner_engine_forward_batches_total"} <= {k[0] for k in after}
        stop(miner, log)
    finally:
        if miner.poll() is None:
            miner.kill()
            miner.wait()
    assert "auth is off" not in log.read_text()  # loopback: only this machine can reach it


def test_readiness_is_200_while_serving_and_503_with_the_reason_otherwise():
    down = ["starting"]
    server = serve(MinerMetrics().registry, "127.0.0.1", 0, not_ready=lambda: down[0])
    try:
        port = server.server_port
        assert readiness(port) == (503, "starting\n")
        down[0] = None
        assert readiness(port) == (200, "ok\n")
        down[0] = "the engine can no longer serve: the engine thread died"
        assert readiness(port) == (503, "the engine can no longer serve: the engine thread died\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert b"# TYPE neuron_miner_requests_total counter" in response.read()
    finally:
        server.shutdown()
        server.server_close()


def engine_stats(**values) -> EngineStats:
    """EngineStats with the given fields, the others 0."""
    return EngineStats(**{**{f.name: 0 for f in dataclasses.fields(EngineStats)}, **values})


def test_engine_stats_become_counters_gauges_and_a_token_rate():
    stats = engine_stats(queued=3, running=2, forward_batches=4, forward_rows=10)
    m = MinerMetrics(lambda: stats)
    first = samples(generate_latest(m.registry).decode())
    assert first[("neuron_miner_engine_queued", ())] == 3.0
    assert first[("neuron_miner_engine_forward_rows_total", ())] == 10.0
    assert first[("neuron_miner_engine_forward_batch_rows_mean", ())] == 2.5
    stats = dataclasses.replace(stats, generated_tokens=50)
    second = samples(generate_latest(m.registry).decode())
    assert second[("neuron_miner_engine_generated_tokens_total", ())] == 50.0
    assert second[("neuron_miner_engine_tokens_per_second", ())] > 0


def test_refusals_are_counted_by_reason():
    m = MinerMetrics()
    m.observe_request("Forward", "PERMISSION_DENIED", 0.001, "this hotkey has no validator permit; miners answer ...")
    m.observe_request("Forward", "RESOURCE_EXHAUSTED", 0.001, "rate limit: at most 20 requests/s")
    m.observe_request("Forward", "OK", 0.02)
    got = samples(generate_latest(m.registry).decode())
    assert got[("neuron_miner_admission_refusals_total", (("reason", "no_validator_permit"),))] == 1.0
    assert got[("neuron_miner_admission_refusals_total", (("reason", "rate_limit"),))] == 1.0
    assert refusal_reason("PERMISSION_DENIED", "something new") == "permission_denied"


def test_validator_metrics_label_results_and_reasons_per_uid():
    m = ValidatorMetrics()
    m.observe_judgement(3, False, "forward: top-k overlap 0.62 < 0.75 at position 0")
    m.observe_judgement(3, False, "forward: top-k overlap 0.50 < 0.75 at position 4")
    m.observe_judgement(4, True, "")
    got = samples(generate_latest(m.registry).decode())
    failed = ("neuron_validator_verifications_total",
              (("reason", "forward: top-k overlap"), ("result", "failed"), ("uid", "3")))
    assert got[failed] == 2.0  # numbers stripped: one series per kind of failure
    assert got[("neuron_validator_verifications_total", (("reason", ""), ("result", "verified"), ("uid", "4")))] == 1.0


def test_failed_calls_are_labelled_by_status_not_by_message():
    from neuron.metrics import reason_kind

    message = "forward: unavailable: failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:8091"
    assert reason_kind(message) == "forward: unavailable"
    assert reason_kind("generate: deadline_exceeded: Deadline Exceeded") == "generate: deadline_exceeded"
    assert reason_kind("generate: token 3 differs: margin 0.5 > 0.1") == "generate: token"


def test_one_scrape_after_tokens_shows_their_rate():
    """An operator's first curl after traffic: not 0 because nobody scraped before."""
    stats = engine_stats()
    m = MinerMetrics(lambda: stats)
    stats = engine_stats(generated_tokens=40)
    assert samples(generate_latest(m.registry).decode())[("neuron_miner_engine_tokens_per_second", ())] > 0


def test_process_and_build_info_are_exported():
    got = samples(generate_latest(ValidatorMetrics().registry).decode())
    assert got[("process_resident_memory_bytes", ())] > 0
    [build] = [labels for name, labels in got if name == "neuron_build_info"]
    assert dict(build)["role"] == "validator" and dict(build)["version"]


def _exported_samples(tiny) -> set[str]:
    """Every sample name the miner (over the HF engine's stats), the validator and its gateway export."""
    from neuron.config import BatchingConfig
    from neuron.engine.hf import HFEngine
    from neuron.metrics import GatewayMetrics

    engine = HFEngine(tiny, BatchingConfig(), 512)
    validator = ValidatorMetrics()
    GatewayMetrics(validator.registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",),
                "gauge": ("",), "unknown": ("",)}
    return {family.name + s for registry in (MinerMetrics(engine.stats).registry, validator.registry)
            for family in registry.collect() for s in suffixes[family.type]}


def test_the_grafana_dashboard_names_only_exported_metrics(tiny):
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parent.parent / "deploy" / "grafana" / "neuron.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert len(exprs) >= 20
    named = {m for e in exprs for m in re.findall(r"\b(?:neuron|process)_[a-z_]+\b", e)}
    exported = _exported_samples(tiny)
    assert named - exported == set()
    # and each part has its panels: the miner, the validator, the gateway, the process
    assert {n.split("_")[0] + "_" + n.split("_")[1] for n in named} >= {
        "neuron_miner", "neuron_validator", "neuron_gateway", "process_cpu"}


def test_the_hf_engine_reports_the_series_every_engine_reports(tiny):
    """The vLLM engine's twin of this runs in CI's vLLM step (tests/engine/test_vllm.py)."""
    from neuron.config import BatchingConfig
    from neuron.engine.hf import HFEngine
    stats = HFEngine(tiny, BatchingConfig(), 512).stats()
    assert isinstance(stats, EngineStats) and stats.capacity == BatchingConfig().max_generate_batch
    exported = {f.name for f in MinerMetrics(lambda: stats).registry.collect() if f.name.startswith("neuron_miner_engine")}
    assert exported == {f"neuron_miner_engine_{f.name}" for f in dataclasses.fields(EngineStats)} | {
        "neuron_miner_engine_forward_batch_rows_mean", "neuron_miner_engine_tokens_per_second"}
    assert "neuron_miner_engine_joins" not in exported  # a backend's own extras stay out of the metrics
