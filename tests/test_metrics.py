"""Prometheus metrics at /metrics, summed over every process, with exact counts."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.scrape import scrape_when, value


def test_exact_counts_after_known_traffic(start_server) -> None:
    server = start_server(env={"SIMPLENN_API_SERVERS": "2", "SIMPLENN_MAX_BATCH_SIZE": "1"})
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for _ in range(7):
            assert http.post("/predict", json={"input": [0.1] * 10}).status_code == 200
        for _ in range(3):
            assert http.post("/predict", json={"inputs": [[0.2] * 10] * 4}).status_code == 200
        for _ in range(2):
            assert http.post("/predict", json={"input": [1]}).status_code == 422
        assert http.post("/v1/models/simplenn:predict", json={"instances": [[0.3] * 10] * 5}).status_code == 200
    samples = scrape_when(server.url, lambda got: value(got, "simplenn_queue_wait_seconds_count") == 11)
    assert value(samples, "simplenn_requests_total", route="/predict", code="200") == 10
    assert value(samples, "simplenn_requests_total", route="/predict", code="422") == 2
    assert value(samples, "simplenn_requests_total", route="/v1/models/{name}:predict", code="200") == 1
    assert value(samples, "simplenn_request_duration_seconds_count", route="/predict") == 12
    assert value(samples, "simplenn_rows_predicted_total") == 7 + 12 + 5
    # max batch size 1 row: every request is its own forward pass (a 4-row request runs alone)
    assert value(samples, "simplenn_batch_size_rows_count") == 11
    assert value(samples, "simplenn_batch_size_rows_sum") == 24
    assert value(samples, "simplenn_inference_duration_seconds_count") == 11
    assert value(samples, "simplenn_queue_wait_seconds_count") == 11
    assert value(samples, "simplenn_requests_in_flight") == 1  # the scrape itself
    assert value(samples, "simplenn_reloads_total", result="ok", reason="") == 1  # the startup load
    versions = [dict(labels)["version"] for (name, labels), v in samples.items()
                if name == "simplenn_model_info" and v == 1]
    status = httpx.get(server.url + "/v1/models/simplenn", timeout=5).json()
    assert versions == [status["version"]]
    assert value(samples, "simplenn_last_reload_timestamp_seconds") > 1.7e9


def test_metrics_names_follow_prometheus_conventions(client: httpx.Client) -> None:
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("simplenn_")}
    for name, family in families.items():
        if family.type == "counter":
            assert any(s.name.endswith("_total") for s in family.samples), name
        if "duration" in name or "wait" in name:
            assert name.endswith("_seconds"), name


_FORK_SCRIPT = """
import os, sys
from serve import metrics
metrics.ROWS.inc(1)
child = os.fork()
if child == 0:
    metrics.ROWS.inc(2)
    os._exit(0)
os.waitpid(child, 0)
metrics.ROWS.inc(4)
metrics._pid = 424242  # what prometheus_client now asks for the pid: a write goes to that pid's file
metrics.ROWS.inc(8)
print(os.getpid(), child)
"""


def test_values_use_the_cached_pid_and_a_fork_gets_its_own_file(tmp_path) -> None:
    """Metric writes ask serve.metrics for the pid (no system call), and a forked child still writes a file
    of its own: the sum over the files is exact."""
    import os
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry, multiprocess

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    parent, child = out.split()
    counters = sorted(p.name for p in tmp_path.glob("counter_*.db"))
    assert counters == sorted(f"counter_{pid}.db" for pid in (parent, child, "424242"))
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    assert registry.get_sample_value("simplenn_rows_predicted_total") == 15
