"""The server as a process: startup, health, startup failures, TorchScript mode, graceful shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.servers import alive, process_tree, worker_pids
from tests.conftest import HOSTILE_KINDS, ROOT, SHIPPED_WEIGHTS, assert_matches, reference_outputs, write_hostile


def test_health_live_and_ready(client: httpx.Client) -> None:
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").json() == {"status": "ready"}


def test_openapi_describes_predict(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"input", "inputs"}


STARTUP_WORDS = {
    "zero-bytes": "empty", "random-bytes": "cannot be read", "truncated": "cannot be read",
    "runs-code": "cannot be read", "wrong-keys": "missing keys ['fc2.weight']", "wrong-dtype": "dtype torch.int64",
    "wrong-shape": "key 'fc2.weight' has shape [2, 5], SimpleNN expects [1, 5]", "nan": "NaN", "inf": "infinite",
    "too-large": "over the limit of 4096", "symlink-loop": "symlink loop",
}


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_weights_stop_startup_with_one_clear_line(start_server, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "code-ran"
    path = write_hostile(kind, tmp_path / "bad.pth", marker)
    server = start_server(env={"SIMPLENN_WEIGHTS": str(path), "SIMPLENN_MAX_WEIGHTS_BYTES": "4096"}, ready=False)
    assert server.wait_exit(60) == 1
    lines = [line for line in server.log().splitlines() if line.startswith("simplenn-serve: cannot start")]
    assert len(lines) == 1, server.log()
    assert str(path) in lines[0] and STARTUP_WORDS[kind] in lines[0], lines[0]
    assert "Traceback" not in server.log()
    assert not marker.exists()


@pytest.mark.parametrize("env, words", [
    ({"SIMPLENN_MODEL_CLASS": "models.simple_nn:NoSuchNet"}, "NoSuchNet"),
    ({"SIMPLENN_MODEL_CLASS": "tests.user_models:NotAModule"}, "not a torch.nn.Module subclass"),
    ({"SIMPLENN_DEVICE": "cuda:7"}, "SIMPLENN_DEVICE=cuda:7"),
])
def test_a_worker_that_cannot_serve_stops_startup_with_its_reason(start_server, env: dict, words: str) -> None:
    server = start_server(env=env, ready=False)
    assert server.wait_exit(60) == 1
    lines = [line for line in server.log().splitlines() if line.startswith("simplenn-serve: cannot start")]
    assert len(lines) == 1 and words in lines[0], server.log()[-2000:]


def test_only_the_inference_workers_load_torch(server) -> None:
    """The supervisor and the API servers never import torch: they cost tens of MiB, not hundreds."""
    tree = {pid for pid in process_tree(server.pid) if alive(pid)}
    loads_torch = {pid: "libtorch" in Path(f"/proc/{pid}/maps").read_text() for pid in tree}
    workers = worker_pids(server.pid)
    assert workers and all(loads_torch[pid] for pid in workers)
    assert not any(loads for pid, loads in loads_torch.items() if pid not in workers), loads_torch


def test_bad_setting_exits_2_naming_it() -> None:
    env = {**os.environ, "SIMPLENN_MAX_BATCH_SIZE": "0"}
    result = subprocess.run([sys.executable, "-m", "serve", "--port", "99999"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "SIMPLENN_PORT (--port)" in result.stderr and "65535" in result.stderr
    assert "SIMPLENN_MAX_BATCH_SIZE" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "simplenn-serve"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--max-batch-size" in result.stdout


def test_torchscript_mode_gives_the_same_answers(start_server) -> None:
    server = start_server(args=["--compile", "torchscript"])
    rows = np.random.default_rng(7).standard_normal((64, 10))
    response = httpx.post(server.url + "/predict", json={"inputs": rows.tolist()}, timeout=30)
    assert response.status_code == 200
    assert_matches(response.json()["outputs"], reference_outputs(SHIPPED_WEIGHTS, rows))
    assert server.log().count("TorchScript") <= 2  # deprecation notes are logged once per process, not per call


def test_sigterm_drains_in_flight_requests_and_leaves_no_process(start_server) -> None:
    server = start_server(env={"SIMPLENN_MODEL_CLASS": "tests.user_models:SlowSimpleNN", "SLOW_FORWARD_S": "0.4",
                               "SIMPLENN_DRAIN_S": "1.0", "SIMPLENN_MAX_BATCH_SIZE": "1"})
    tree = process_tree(server.pid)
    assert len(tree) >= 4  # main, manager, worker, API server(s)
    results: list[int] = []

    def call() -> None:
        response = httpx.post(server.url + "/predict", json={"input": [0.1] * 10}, timeout=30)
        results.append(response.status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # the requests are queued or computing (0.4 s each, one at a time)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert httpx.get(server.url + "/health/ready", timeout=5).status_code == 503  # not ready at once...
    assert httpx.get(server.url + "/health/live", timeout=5).status_code == 200  # ...but still serving
    for thread in threads:
        thread.join(30)
    assert results == [200] * 4
    assert server.wait_exit(30) == 0
    deadline = time.monotonic() + 10
    while any(map(alive, tree)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, tree)), f"processes left behind: {sorted(filter(alive, tree))}"


def test_a_killed_worker_fails_its_requests_with_503_fast_and_is_replaced(start_server) -> None:
    server = start_server(env={"SIMPLENN_MODEL_CLASS": "tests.user_models:SlowSimpleNN", "SLOW_FORWARD_S": "3",
                               "SIMPLENN_REQUEST_TIMEOUT_S": "60"})
    workers = list(worker_pids(server.pid))
    assert len(workers) == 1
    results: list[tuple[int, float]] = []

    def call() -> None:
        started = time.monotonic()
        response = httpx.post(server.url + "/predict", json={"input": [0.1] * 10}, timeout=60)
        results.append((response.status_code, time.monotonic() - started))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    os.kill(workers[0], signal.SIGKILL)
    for thread in threads:
        thread.join(30)
    assert [status for status, _ in results] == [503] * 3
    assert all(seconds < 3 for _, seconds in results), results  # not the 60 s timeout
    server.wait_ready(60)  # replaced, ready again
    assert httpx.post(server.url + "/predict", json={"input": [0.1] * 10}, timeout=30).status_code == 200
    assert "exited with -9; replacing it" in server.log()
