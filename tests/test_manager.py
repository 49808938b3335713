"""The version manager's decisions, in-process: real control connections (socket pairs), real weights files
pinned by a real store, and a real process to kill where a worker is replaced. What each worker is told is
read back from its end of the connection, as a worker would read it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from serve.manager import VersionManager
from serve.source import Candidate
from serve.versions import VersionStore, version_of
from tests.control_children import Child


def commands(child: Child) -> list[tuple[str, str]]:
    """(``load``/``serve``, version) of each command sent to ``child`` since the last call."""
    return [(m["t"], m["version"]) for m in child.told() if m["t"] in ("load", "serve")]


def candidate(folder: Path, name: str, content: bytes) -> Candidate:
    path = folder / name
    path.write_bytes(content)
    st = path.stat()
    return Candidate(path, name, (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, None), None)


@pytest.fixture
def manager(tmp_path: Path) -> VersionManager:
    return VersionManager(VersionStore(tmp_path / "versions", 1 << 20), workers=2, load_timeout=60)


def serve_first(manager: VersionManager, workers: list[Child], first: Candidate) -> str:
    """Both workers join, the first candidate arrives, both serve it; returns its version id."""
    for child in workers:
        manager.fleet.join(child.peer)
        manager.worker_joined(child.peer)
    manager.on_candidates([first])
    version = version_of(first.path.read_bytes())[0]
    for child in workers:
        assert commands(child) == [("serve", version)]
        manager.fleet.serving(child.peer, version, None)
        manager.serving(child.peer, version)
    return version


def test_the_first_version_is_served_by_every_worker_and_opens_the_startup_gate(manager, tmp_path):
    workers = [Child("worker", 0), Child("worker", 1)]
    v1 = serve_first(manager, workers, candidate(tmp_path, "a.pth", b"one"))
    assert manager.startup.event.is_set() and manager.startup.error is None
    assert manager.fleet.versions[:2] == (v1, None)
    assert Path(manager.served.path).read_bytes() == b"one"  # the pinned snapshot, not the file itself


def test_a_new_version_is_served_only_once_every_worker_has_loaded_it(manager, tmp_path):
    workers = [Child("worker", 0), Child("worker", 1)]
    v1 = serve_first(manager, workers, candidate(tmp_path, "a.pth", b"one"))
    manager.on_candidates([candidate(tmp_path, "b.pth", b"two"), candidate(tmp_path, "a.pth", b"one")])
    v2 = manager.rollout.version.id
    assert [commands(w) for w in workers] == [[("load", v2)], [("load", v2)]]
    manager.loaded(workers[0].peer, v2)
    assert manager.served.id == v1 and [commands(w) for w in workers] == [[], []]  # one has not loaded it yet
    manager.loaded(workers[1].peer, v2)
    assert [commands(w) for w in workers] == [[("serve", v2)], [("serve", v2)]]
    assert (manager.served.id, manager.previous.id, manager.rollout) == (v2, v1, None)
    assert manager.fleet.last_reload["result"] == "ok"


def test_a_version_any_worker_rejects_is_served_nowhere_and_not_tried_again(manager, tmp_path):
    workers = [Child("worker", 0), Child("worker", 1)]
    v1 = serve_first(manager, workers, candidate(tmp_path, "a.pth", b"one"))
    bad = candidate(tmp_path, "b.pth", b"bad")
    manager.on_candidates([bad])
    v2 = manager.rollout.version.id
    manager.loaded(workers[0].peer, v2)
    manager.rejected(workers[1].peer, v2, "b.pth: missing key fc1.weight", "keys")
    assert manager.served.id == v1 and manager.rollout is None
    assert [commands(w) for w in workers] == [[("load", v2)], [("load", v2)]]  # and never "serve"
    assert manager.fleet.last_reload == {**manager.fleet.last_reload, "result": "failed", "reason": "keys"}
    manager.on_candidates([bad])  # the same file again: known bad, not offered
    assert manager.rollout is None and [commands(w) for w in workers] == [[], []]
    manager.rescan()  # an operator's rescan gives it one more try
    manager.on_candidates([bad])
    assert manager.rollout is not None and manager.rollout.version.id == v2


def test_a_worker_that_dies_during_a_rollout_does_not_hold_it_up(manager, tmp_path):
    workers = [Child("worker", 0), Child("worker", 1)]
    serve_first(manager, workers, candidate(tmp_path, "a.pth", b"one"))
    manager.on_candidates([candidate(tmp_path, "b.pth", b"two")])
    v2 = manager.rollout.version.id
    manager.loaded(workers[0].peer, v2)
    assert manager.fleet.leave(workers[1].peer)
    manager.worker_left(workers[1].peer)
    assert manager.served.id == v2 and commands(workers[0]) == [("load", v2), ("serve", v2)]
    replacement = Child("worker", 1)
    manager.fleet.join(replacement.peer)
    manager.worker_joined(replacement.peer)
    assert commands(replacement) == [("serve", v2)]  # it serves what its peer serves


def test_a_rollback_holds_for_a_replacement_worker_until_a_rescan(manager, tmp_path):
    workers = [Child("worker", 0), Child("worker", 1)]
    v1 = serve_first(manager, workers, candidate(tmp_path, "a.pth", b"one"))
    current = [candidate(tmp_path, "b.pth", b"two")]
    manager.on_candidates(current)
    v2 = manager.rollout.version.id
    for child in workers:
        manager.loaded(child.peer, v2)
    assert [commands(w) for w in workers] == [[("load", v2), ("serve", v2)]] * 2
    assert manager.rollback() is True
    assert [commands(w) for w in workers] == [[("serve", v1)], [("serve", v1)]]
    assert (manager.served.id, manager.previous.id) == (v1, v2)
    replacement = Child("worker", 2)
    manager.fleet.join(replacement.peer)
    manager.worker_joined(replacement.peer)
    assert commands(replacement) == [("serve", v1)]
    manager.rescan()  # an operator's rescan looks at the files again: the best one on disk is rolled out
    manager.on_candidates(current)
    assert manager.rollout is not None and manager.rollout.version.id == v2


def test_a_worker_that_does_not_load_in_time_is_killed_and_the_others_switch(manager, tmp_path):
    stuck = subprocess.Popen(["sleep", "60"])
    try:
        workers = [Child("worker", 0), Child("worker", 1, pid=stuck.pid)]
        serve_first(manager, workers, candidate(tmp_path, "a.pth", b"one"))
        manager.on_candidates([candidate(tmp_path, "b.pth", b"two")])
        rollout = manager.rollout
        manager.loaded(workers[0].peer, rollout.version.id)
        manager._load_timed_out(rollout)  # what the hub's timer calls after the load timeout
        assert stuck.wait(5) == -9  # SIGKILLed; the supervisor replaces it
        assert manager.served.id == rollout.version.id
    finally:
        stuck.kill()


def test_api_servers_are_shown_the_state_and_told_when_the_server_drains(manager, tmp_path):
    api = Child("api", 0)
    manager.fleet.join(api.peer)
    assert api.told()[-1]["draining"] is False
    v1 = serve_first(manager, [Child("worker", 0), Child("worker", 1)], candidate(tmp_path, "a.pth", b"one"))
    manager.fleet.publish()
    state = api.told()[-1]
    assert (state["version"], state["versions"], len(state["workers"])) == (v1, [v1], 2)
    manager.fleet.set_draining()
    deadline = time.monotonic() + 1
    while not (messages := api.told()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert messages[-1]["draining"] is True
