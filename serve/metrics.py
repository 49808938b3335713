"""Every Prometheus metric of the server, correct across its processes.

The server sets ``PROMETHEUS_MULTIPROC_DIR`` (emptied at start) before any process imports this
module, so counters and histograms written by the API servers and the inference workers are summed
at scrape time by :func:`render`. Names follow Prometheus conventions: the ``simplenn_`` prefix, base
units, ``_total`` for counters, ``_seconds`` for durations.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess, values

_pid = os.getpid()


def _cached_pid() -> int:
    """This process's pid, kept in a variable that ``os.fork`` refreshes in the child."""
    return _pid


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


# In multiprocess mode prometheus_client asks for the pid at every write of a value (to notice a fork), a
# system call each: 5 to 7 per request in each process, measured dear on a virtual machine. Its documented
# hook, MultiProcessValue(process_identifier), takes a cached one; a fork refreshes it before any child code
# runs, and a spawned process imports this module anew. tests/test_metrics.py checks the hook is in use.
os.register_at_fork(after_in_child=_refresh_pid)
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    values.ValueClass = values.MultiProcessValue(process_identifier=_cached_pid)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

REQUESTS = Counter("simplenn_requests_total",
                   "Requests answered, by route and status code (gRPC: route 'grpc:/<service>/<method>', "
                   "code the status name).", ["route", "code"])
REQUEST_SECONDS = Histogram("simplenn_request_duration_seconds", "Time from request to answer, by route.",
                            ["route"], buckets=_LATENCY_BUCKETS)
IN_FLIGHT = Gauge("simplenn_requests_in_flight", "Requests (HTTP and gRPC) being handled now (a scrape counts itself).",
                  multiprocess_mode="livesum")
INFERENCE_SECONDS = Histogram("simplenn_inference_duration_seconds", "Forward pass time per batch.",
                              buckets=_LATENCY_BUCKETS)
BATCH_ROWS = Histogram("simplenn_batch_size_rows", "Rows per forward pass.", buckets=_BATCH_BUCKETS)
QUEUE_SECONDS = Histogram("simplenn_queue_wait_seconds", "Time a request waited before its batch ran.",
                          buckets=_LATENCY_BUCKETS)
ROWS = Counter("simplenn_rows_predicted_total", "Rows the model has predicted.")
MODEL_INFO = Gauge("simplenn_model_info", "1 for the version each worker serves now.", ["version", "worker"],
                   multiprocess_mode="livemax")
RELOADS = Counter("simplenn_reloads_total", "Weight reload attempts, by result and failure reason.",
                  ["result", "reason"])
RELOAD_SECONDS = Histogram("simplenn_reload_duration_seconds", "Time to load, verify and swap new weights.",
                           buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
LAST_RELOAD = Gauge("simplenn_last_reload_timestamp_seconds", "Unix time of the last successful reload.",
                    multiprocess_mode="max")

_live_versions: dict[int, str] = {}
_request_series: dict[tuple[str, str], tuple[Counter, Histogram]] = {}  # labelled children


def observe_request(route: str, code: str, seconds: float) -> None:
    """Count one answered request (HTTP or gRPC) and its duration. Each (route, code) pair's series is
    looked up once per process: ``labels()`` validates and locks at every call (about 3 µs of the 5 µs
    the two updates took per request). Routes are path templates and codes are bounded, so few pairs exist."""
    series = _request_series.get((route, code))
    if series is None:
        series = _request_series[(route, code)] = (REQUESTS.labels(route=route, code=code),
                                                   REQUEST_SECONDS.labels(route=route))
    series[0].inc()
    series[1].observe(seconds)


def set_live_version(version: str, worker: int) -> None:
    """Mark ``version`` as the one ``worker`` serves (and the one it served before as not live)."""
    old = _live_versions.get(worker)
    if old is not None and old != version:
        MODEL_INFO.labels(version=old, worker=str(worker)).set(0)
    MODEL_INFO.labels(version=version, worker=str(worker)).set(1)
    _live_versions[worker] = version


def render() -> tuple[bytes, str]:
    """The scrape body and its content type, aggregated over all processes when in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a dead process's live gauges (called by the supervisor when a child exits)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
