"""Hot reload against the real server: swaps under load, bad files, directory and kubelet layouts,
polling alone, rollback, status and admin routes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from serve.versions import file_version
from tests.conftest import HOSTILE_KINDS, NOT_CANDIDATES, assert_matches, make_state_dict, reference_outputs, save_weights, write_hostile

ROWS = np.random.default_rng(3).standard_normal((4, 10))
FAST_RELOAD = {"SIMPLENN_POLL_INTERVAL_S": "0.2", "SIMPLENN_RELOAD_DEBOUNCE_S": "0.1"}


def predict(url: str) -> dict:
    response = httpx.post(url + "/predict", json={"inputs": ROWS.tolist()}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_version(url: str, version: str, timeout: float = 10) -> float:
    """Seconds until an answer carries ``version``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predict(url)["model_version"] == version:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"version {version} not served after {timeout} s")


def assert_serves(url: str, state: dict, path: Path | None = None) -> None:
    body = predict(url)
    if path is not None:
        assert body["model_version"] == file_version(path)
    assert_matches(body["outputs"], reference_outputs(state, ROWS))


def test_twenty_swaps_under_load_fail_nothing_and_every_answer_matches_its_version(start_server,
                                                                                   tmp_path: Path) -> None:
    weights = tmp_path / "live" / "model.pth"
    states = {}
    save_weights(weights, make_state_dict(100))
    states[file_version(weights)] = make_state_dict(100)
    server = start_server(env={"SIMPLENN_WEIGHTS": str(weights), "SIMPLENN_BATCH_TIMEOUT_MS": "2"})
    answers: list[tuple[int, dict]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            while not stop.is_set():
                response = http.post("/predict", json={"inputs": ROWS.tolist()})
                answers.append((response.status_code, response.json()))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    delays = []
    try:
        for seed in range(101, 121):
            state = make_state_dict(seed)
            save_weights(weights, state)  # atomic rename over the served file
            states[file_version(weights)] = state
            delays.append(wait_for_version(server.url, file_version(weights)))
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert len(answers) > 100
    assert [status for status, _ in answers if status != 200] == []
    served_versions = {body["model_version"] for _, body in answers}
    assert len(served_versions) >= 10
    for _, body in answers:
        assert_matches(body["outputs"], reference_outputs(states[body["model_version"]], ROWS))
    print(f"\nrename -> first answer: p50 {np.percentile(delays, 50):.3f} s, p99 {np.percentile(delays, 99):.3f} s")


def test_bad_files_are_rejected_while_the_old_version_keeps_answering(start_server, tmp_path: Path) -> None:
    weights = tmp_path / "model.pth"
    good_state = make_state_dict(7)
    save_weights(weights, good_state)
    good_version = file_version(weights)
    server = start_server(env={"SIMPLENN_WEIGHTS": str(weights), "SIMPLENN_MAX_WEIGHTS_BYTES": "4096",
                               **FAST_RELOAD})
    seen_at = 0.0
    marker = tmp_path / "code-ran"
    for name in HOSTILE_KINDS:
        write_hostile(name, weights, marker)
        if name in NOT_CANDIDATES:  # nothing to load: the old model simply stays
            time.sleep(1.0)
            assert_serves(server.url, good_state)
            save_weights(weights, good_state)
            time.sleep(0.3)
            continue
        deadline = time.monotonic() + 10
        status = {}
        while time.monotonic() < deadline:  # wait until the worker has looked at THIS file and said no
            status = httpx.get(server.url + "/v1/models/simplenn", timeout=5).json()
            last = status["last_reload"]
            if last and last["result"] == "failed" and last["at"] > seen_at and str(weights) in last["error"]:
                seen_at = last["at"]
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"{name}: no failed reload reported: {status}")
        assert status["version"] == good_version, name
        assert_serves(server.url, good_state)
        assert predict(server.url)["model_version"] == good_version
        os.unlink(weights)
        save_weights(weights, good_state)  # same bytes again before the next corruption
        time.sleep(0.3)
    assert not marker.exists()
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    for reason in ("unreadable", "mismatch", "not_finite", "too_large"):
        assert f'simplenn_reloads_total{{reason="{reason}",result="failed"}}' in metrics


def test_half_written_file_is_never_served(start_server, tmp_path: Path) -> None:
    weights = tmp_path / "model.pth"
    old = make_state_dict(8)
    save_weights(weights, old)
    server = start_server(env={"SIMPLENN_WEIGHTS": str(weights), **FAST_RELOAD})
    new = make_state_dict(9)
    staged = tmp_path / "staged.pth"
    torch.save(new, staged)
    data = staged.read_bytes()
    with open(weights, "wb") as out:  # in-place, non-atomic publisher, pausing half way
        out.write(data[: len(data) // 2])
        out.flush()
        for _ in range(10):
            assert_serves(server.url, old)
            time.sleep(0.1)
        out.write(data[len(data) // 2:])
    wait_for_version(server.url, file_version(staged))
    assert_serves(server.url, new, weights)


def test_directory_mode_serves_the_highest_version(start_server, tmp_path: Path) -> None:
    root = tmp_path / "versions"
    save_weights(root / "1" / "model.pth", make_state_dict(11))
    save_weights(root / "2" / "model.pth", make_state_dict(12))
    server = start_server(env={"SIMPLENN_WEIGHTS": str(root), **FAST_RELOAD})
    assert_serves(server.url, make_state_dict(12), root / "2" / "model.pth")
    staging = root / ".10.tmp"
    save_weights(staging / "model.pth", make_state_dict(13))
    os.replace(staging, root / "10")  # a new version directory appears atomically
    wait_for_version(server.url, file_version(root / "10" / "model.pth"))
    assert_serves(server.url, make_state_dict(13))


def _kubelet_publish(volume: Path, state: dict, stamp: str) -> Path:
    """What kubelet does for a ConfigMap/Secret/projected volume update."""
    data_dir = volume / f"..{stamp}"
    save_weights(data_dir / "model.pth", state, atomic=False)
    tmp_link = volume / "..data_tmp"
    tmp_link.symlink_to(data_dir.name)
    os.replace(tmp_link, volume / "..data")
    if not (volume / "model.pth").is_symlink():
        (volume / "model.pth").symlink_to("..data/model.pth")
    return data_dir / "model.pth"


def test_kubelet_data_swap_is_picked_up_twice_in_a_row(start_server, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    _kubelet_publish(volume, make_state_dict(21), "2026_11_29_17_00_00.1")
    server = start_server(env={"SIMPLENN_WEIGHTS": str(volume / "model.pth"), **FAST_RELOAD})
    assert_serves(server.url, make_state_dict(21))
    for seed, stamp in ((22, "2026_11_29_17_01_00.2"), (23, "2026_11_29_17_02_00.3")):
        published = _kubelet_publish(volume, make_state_dict(seed), stamp)
        wait_for_version(server.url, file_version(published))
        assert_serves(server.url, make_state_dict(seed))


def test_polling_alone_notices_a_swap(start_server, tmp_path: Path) -> None:
    weights = tmp_path / "model.pth"
    save_weights(weights, make_state_dict(31))
    server = start_server(env={"SIMPLENN_WEIGHTS": str(weights), "SIMPLENN_WATCH_EVENTS": "false", **FAST_RELOAD})
    save_weights(weights, make_state_dict(32))
    wait_for_version(server.url, file_version(weights))
    assert_serves(server.url, make_state_dict(32))


def test_admin_routes_are_absent_without_a_token(client: httpx.Client) -> None:
    assert client.post("/admin/reload").status_code == 404
    assert client.post("/admin/rollback").status_code == 404


def test_rollback_and_rescan_need_the_token_and_work(start_server, tmp_path: Path) -> None:
    weights = tmp_path / "model.pth"
    save_weights(weights, make_state_dict(41))
    first = file_version(weights)
    server = start_server(env={"SIMPLENN_WEIGHTS": str(weights), "SIMPLENN_ADMIN_TOKEN": "s3cret", **FAST_RELOAD})
    save_weights(weights, make_state_dict(42))
    second = file_version(weights)
    wait_for_version(server.url, second)
    assert httpx.post(server.url + "/admin/rollback", timeout=5).status_code == 401
    assert httpx.post(server.url + "/admin/rollback", headers={"Authorization": "Bearer nope"},
                      timeout=5).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert httpx.post(server.url + "/admin/rollback", headers=auth, timeout=5).status_code == 202
    wait_for_version(server.url, first)
    assert_serves(server.url, make_state_dict(41))
    status = httpx.get(server.url + "/v1/models/simplenn", timeout=5).json()
    assert status["last_reload"]["result"] == "rollback"
    assert httpx.post(server.url + "/admin/reload", headers=auth, timeout=5).status_code == 202
    wait_for_version(server.url, second)  # a re-scan serves the file on disk again


def test_status_route_names_the_live_version_and_404s_other_models(client: httpx.Client) -> None:
    status = client.get("/v1/models/simplenn").json()
    assert status["ready"] is True and len(status["version"]) == 12
    assert status["workers"][0]["version"] == status["version"]
    missing = client.get("/v1/models/other")
    assert missing.status_code == 404 and "other" in missing.json()["error"]


def _last_reload(url: str) -> dict | None:
    return httpx.get(url + "/v1/models/simplenn", timeout=5).json()["last_reload"]


def _wait_for_failure_after(url: str, after: float, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = _last_reload(url)
        if last and last["result"] == "failed" and last["at"] > after:
            return last
        time.sleep(0.05)
    raise AssertionError(f"no new failed reload after {after}: {_last_reload(url)}")


def test_sighup_rescans_and_gives_a_known_bad_file_one_more_try(start_server, tmp_path: Path) -> None:
    weights = tmp_path / "model.pth"
    save_weights(weights, make_state_dict(51))
    server = start_server(env={"SIMPLENN_WEIGHTS": str(weights), **FAST_RELOAD})
    write_hostile("wrong-shape", weights, tmp_path / "marker")
    first = _wait_for_failure_after(server.url, 0.0)
    time.sleep(1.0)
    assert _last_reload(server.url)["at"] == first["at"]  # the same bad file is not retried in a loop
    server.proc.send_signal(signal.SIGHUP)
    second = _wait_for_failure_after(server.url, first["at"])
    assert "shape" in second["error"]
    assert_serves(server.url, make_state_dict(51))


def test_a_file_deleted_right_after_it_appears_is_never_served(start_server, tmp_path: Path) -> None:
    weights = tmp_path / "model.pth"
    save_weights(weights, make_state_dict(61))
    server = start_server(env={"SIMPLENN_WEIGHTS": str(tmp_path), **FAST_RELOAD})
    for seed in range(62, 67):  # a newer file appears and vanishes before it has settled
        newer = save_weights(tmp_path / f"model-{seed}.pth", make_state_dict(seed))
        os.unlink(newer)
        time.sleep(0.2)
    assert_serves(server.url, make_state_dict(61), weights)
