"""Tests for serve.source: real files in tmp_path, real threads, every wait bounded in time."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import serve.source
import serve.watch
from serve.source import Candidate, WeightsNotFoundError, WeightsSource
from tests.files import symlink_atomic, write_atomic

WAIT_S = 5.0  # upper bound for any single wait in these tests

# an exception escaping any thread (the watcher's included) fails the test instead of being a warning
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


# -- helpers ----------------------------------------------------------------------------------------

def later(delay: float, action: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(delay, action)
    timer.daemon = True
    timer.start()
    return timer


def stop_later(source: WeightsSource, delay: float) -> threading.Event:
    """A stop event set after `delay`, the way callers do it: set, then interrupt the source."""
    stop = threading.Event()
    later(delay, lambda: (stop.set(), source.interrupt()))
    return stop


def wait_change(source: WeightsSource, previous: list[Candidate], timeout: float = WAIT_S) -> list[Candidate]:
    """wait_for_change, bounded: fails the test instead of hanging."""
    stop = threading.Event()
    timer = later(timeout, lambda: (stop.set(), source.interrupt()))
    try:
        changed = source.wait_for_change(previous, stop)
    finally:
        timer.cancel()
    assert changed is not None, f"no change noticed within {timeout} s"
    return changed


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def armed(source: WeightsSource) -> WeightsSource:
    """The source, once its event watcher has its first watches in place."""
    watcher = source._wakeups.watcher
    assert watcher is not None and watcher.armed.wait(WAIT_S), "event watcher never armed"
    return source


@pytest.fixture
def make_source() -> Iterator[Callable[..., WeightsSource]]:
    """Build sources with quick test settings; all are closed at the end."""
    sources: list[WeightsSource] = []

    def make(location: Path, **kwargs: object) -> WeightsSource:
        kwargs.setdefault("poll_interval", 0.2)
        kwargs.setdefault("debounce", 0.1)
        source = WeightsSource(location, **kwargs)  # type: ignore[arg-type]
        sources.append(source)
        return source

    yield make
    for source in sources:
        source.close()


# -- file mode --------------------------------------------------------------------------------------

def test_file_mode_atomic_rename_noticed_quickly_with_defaults(tmp_path: Path, make_source) -> None:
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"v1")
    source = make_source(weights, poll_interval=0.5, debounce=0.25)  # the defaults
    [first] = source.candidates()
    assert first.path == weights and first.version_hint == "model.pth"
    assert first.fingerprint[1] == weights.stat().st_ino and first.expected_sha256 is None

    renamed_at: list[float] = []
    writer = later(0.2, lambda: (renamed_at.append(time.monotonic()), write_atomic(weights, b"version 2")))
    [new] = wait_change(source, [first])
    noticed_after = time.monotonic() - renamed_at[0]
    writer.join(WAIT_S)

    assert noticed_after < 1.0
    assert new.fingerprint != first.fingerprint
    assert new.fingerprint[1] == weights.stat().st_ino and new.fingerprint[2] == len(b"version 2")
    assert new.path.read_bytes() == b"version 2"


def test_file_mode_in_place_rewrite_same_size(tmp_path: Path, make_source) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"aaaa")
    source = make_source(weights)
    [first] = source.candidates()

    def rewrite() -> None:
        with open(weights, "r+b") as f:  # same inode, same size: only mtime/ctime tell
            f.write(b"bbbb")

    later(0.1, rewrite)
    [new] = wait_change(source, [first])
    assert new.fingerprint[1:3] == first.fingerprint[1:3]  # same inode and size
    assert new.fingerprint[3] != first.fingerprint[3]
    assert new.path.read_bytes() == b"bbbb"


def test_file_mode_symlink_retarget(tmp_path: Path, make_source) -> None:
    (tmp_path / "a.pth").write_bytes(b"model a")
    (tmp_path / "b.pth").write_bytes(b"model b")
    current = tmp_path / "current.pth"
    os.symlink("a.pth", current)
    source = make_source(current)
    [first] = source.candidates()
    assert first.path == tmp_path / "a.pth" and first.version_hint == "current.pth"

    later(0.1, lambda: symlink_atomic("b.pth", current))
    [new] = wait_change(source, [first])
    assert new.path == tmp_path / "b.pth"
    assert new.fingerprint[0] == str(tmp_path / "b.pth")


def test_events_wake_the_wait_long_before_the_poll(tmp_path: Path, make_source) -> None:
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"v1")
    source = armed(make_source(weights, poll_interval=30.0, debounce=0.1))
    [first] = source.candidates()

    later(0.1, lambda: write_atomic(weights, b"v2 via events"))
    started = time.monotonic()
    [new] = wait_change(source, [first], timeout=3.0)  # the 30 s poll cannot be what noticed it
    assert time.monotonic() - started < 3.0
    assert new.path.read_bytes() == b"v2 via events"


def test_polling_alone_works_without_events(tmp_path: Path, make_source) -> None:
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"v1")
    source = make_source(weights, poll_interval=0.1, use_events=False)
    assert not any(t.name == f"weights-source[{weights}]" for t in threading.enumerate())
    [first] = source.candidates()

    later(0.1, lambda: write_atomic(weights, b"polled v2"))
    [new] = wait_change(source, [first])
    assert new.fingerprint != first.fingerprint and new.path.read_bytes() == b"polled v2"


def test_file_written_in_chunks_is_returned_only_once_settled(tmp_path: Path, make_source) -> None:
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"v1")
    source = make_source(weights, poll_interval=0.1, debounce=0.5)
    [first] = source.candidates()
    done = threading.Event()
    chunk = b"x" * 1024

    def writer() -> None:  # a non-atomic publisher: rewrites in place, appending for ~0.6 s
        with open(weights, "wb") as f:
            end = time.monotonic() + 0.6
            while time.monotonic() < end:
                f.write(chunk)
                f.flush()
                time.sleep(0.02)
        done.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    [new] = wait_change(source, [first])
    thread.join(WAIT_S)

    assert done.is_set(), "a candidate was returned while the file was still being written"
    assert new.fingerprint[2] == weights.stat().st_size > len(chunk)
    assert new.fingerprint[3] == weights.stat().st_mtime_ns


def test_sidecar_digest_read_and_its_changes_noticed(tmp_path: Path, make_source) -> None:
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"weights one")
    sidecar = tmp_path / "model.pth.sha256"
    source = make_source(weights)
    [first] = source.candidates()
    assert first.expected_sha256 is None and first.fingerprint[5] is None

    # the sidecar appearing is a change (upper case is accepted, returned lower case)
    later(0.1, lambda: write_atomic(sidecar, f"{sha256_hex(b'weights one').upper()}  model.pth\n".encode()))
    [with_sidecar] = wait_change(source, [first])
    assert with_sidecar.expected_sha256 == sha256_hex(b"weights one")
    assert with_sidecar.fingerprint[:5] == first.fingerprint[:5]
    assert with_sidecar.fingerprint[5][0] == str(sidecar)

    # a publisher writes the new sidecar, then renames the new weights: one change with both
    def publish() -> None:
        write_atomic(sidecar, f"{sha256_hex(b'weights two')}  model.pth\n".encode())
        write_atomic(weights, b"weights two")

    publish()
    [second] = wait_change(source, [with_sidecar])
    assert second.expected_sha256 == sha256_hex(b"weights two")
    assert second.path.read_bytes() == b"weights two"

    # only the sidecar changing is a change too
    later(0.1, lambda: write_atomic(sidecar, f"{sha256_hex(b'other')} *model.pth\n".encode()))
    [third] = wait_change(source, [second])
    assert third.fingerprint[:5] == second.fingerprint[:5]
    assert third.expected_sha256 == sha256_hex(b"other")


def test_malformed_sidecar_fails_closed(tmp_path: Path, make_source, caplog) -> None:
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"weights")
    (tmp_path / "model.pth.sha256").write_text("not-a-digest  model.pth\n")
    source = make_source(weights)
    with caplog.at_level(logging.WARNING, logger="serve.listing"):
        with pytest.raises(WeightsNotFoundError, match="sidecar"):
            source.candidates()
    assert "sha256 sidecar" in caplog.text


# -- directory mode ---------------------------------------------------------------------------------

def test_directory_highest_version_wins_and_new_version_noticed(tmp_path: Path, make_source) -> None:
    for version in (1, 2, 10):
        (tmp_path / str(version)).mkdir()
        (tmp_path / str(version) / "model.pth").write_bytes(f"v{version}".encode())
    (tmp_path / "2" / "extra.pt").write_bytes(b"not the model")  # several files: model.* wins
    (tmp_path / "loose.pth").write_bytes(b"ignored in versioned mode")
    source = make_source(tmp_path)
    found = source.candidates()
    assert [c.version_hint for c in found] == ["10", "2", "1"]  # numeric, not lexical, order
    assert found[1].path == tmp_path / "2" / "model.pth"

    def publish_version_11() -> None:  # a hidden temp version directory renamed into place
        staging = tmp_path / ".11.tmp"
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"v11")
        os.rename(staging, tmp_path / "11")

    later(0.1, publish_version_11)
    changed = wait_change(source, found)
    assert [c.version_hint for c in changed] == ["11", "10", "2", "1"]
    assert changed[0].path == tmp_path / "11" / "model.safetensors"

    def publish_version_12_in_place() -> None:  # a version directory filled after mkdir
        (tmp_path / "12").mkdir()
        time.sleep(0.05)
        (tmp_path / "12" / "model.pt").write_bytes(b"v12")

    later(0.1, publish_version_12_in_place)
    changed = wait_change(source, changed)
    assert changed[0].version_hint == "12" and changed[0].path.read_bytes() == b"v12"


def test_flat_directory_newest_mtime_first(tmp_path: Path, make_source) -> None:
    old, new, same_a, same_b = (tmp_path / n for n in ("old.pth", "new.pt", "a.pth", "b.safetensors"))
    for path, mtime in ((old, 1_000), (new, 3_000), (same_a, 2_000), (same_b, 2_000)):
        path.write_bytes(path.name.encode())
        os.utime(path, (mtime, mtime))
    source = make_source(tmp_path)
    found = source.candidates()
    assert [c.version_hint for c in found] == ["new.pt", "a.pth", "b.safetensors", "old.pth"]

    later(0.1, lambda: write_atomic(tmp_path / "newest.safetensors", b"fresh"))
    changed = wait_change(source, found)
    assert changed[0].path == tmp_path / "newest.safetensors"
    assert [c.version_hint for c in changed[1:]] == ["new.pt", "a.pth", "b.safetensors", "old.pth"]


def test_temp_and_hidden_files_are_ignored(tmp_path: Path, make_source) -> None:
    (tmp_path / "model.pth").write_bytes(b"the model")
    for name in (".hidden.pth", "model.pth.tmp", "upload.pt.part", "model.pth~", "notes.txt", "empty.pth"):
        (tmp_path / name).write_bytes(b"" if name == "empty.pth" else b"junk")
    (tmp_path / ".3").mkdir()  # a hidden directory is not a version directory
    (tmp_path / ".3" / "model.pth").write_bytes(b"hidden version")
    source = make_source(tmp_path)
    found = source.candidates()
    assert [c.path for c in found] == [tmp_path / "model.pth"]

    def churn() -> None:  # only ignored names change: no change must be reported
        for i in range(5):
            (tmp_path / f"upload{i}.pth.part").write_bytes(b"partial")
            (tmp_path / f".staging{i}.pth").write_bytes(b"hidden")
            (tmp_path / f"next{i}.pt.tmp").write_bytes(b"tmp")
            time.sleep(0.05)

    later(0.05, churn)
    assert source.wait_for_change(found, stop_later(source, 1.0)) is None


def kubelet_publish(volume: Path, stamp: str, data: bytes) -> Path:
    """What kubelet does: new timestamped dir, ..data_tmp symlink renamed over ..data, old dir removed."""
    new_dir = volume / f"..2026_11_29_17_00_{stamp}"
    new_dir.mkdir()
    (new_dir / "model.pth").write_bytes(data)
    (new_dir / "model.pth.sha256").write_text(f"{sha256_hex(data)}  model.pth\n")
    old_dir = os.readlink(volume / "..data") if os.path.lexists(volume / "..data") else None
    symlink_atomic(new_dir.name, volume / "..data")
    for name in ("model.pth", "model.pth.sha256"):
        if not os.path.lexists(volume / name):
            os.symlink(f"..data/{name}", volume / name)
    if old_dir:
        for child in (volume / old_dir).iterdir():
            child.unlink()
        (volume / old_dir).rmdir()
    return new_dir / "model.pth"


@pytest.mark.parametrize("poll_interval", [0.2, 30.0], ids=["poll", "events-only"])
@pytest.mark.parametrize("mode", ["file", "directory"])
def test_kubelet_data_swap_noticed_twice(tmp_path: Path, make_source, mode: str, poll_interval: float) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    first_file = kubelet_publish(volume, "00.000", b"kube v1")
    source = make_source(volume / "model.pth" if mode == "file" else volume, poll_interval=poll_interval)
    [first] = source.candidates()
    assert first.path == first_file and first.expected_sha256 == sha256_hex(b"kube v1")
    assert first.version_hint == "model.pth"

    previous = first
    for stamp, data in (("01.000", b"kube v2"), ("02.000", b"kube v3!")):
        publisher = later(0.1, lambda: kubelet_publish(volume, stamp, data))
        [new] = wait_change(source, [previous])
        publisher.join(WAIT_S)
        assert new.path == volume / f"..2026_11_29_17_00_{stamp}" / "model.pth"
        assert new.path.read_bytes() == data and new.expected_sha256 == sha256_hex(data)
        previous = new


# -- events and wake-ups (poll_interval=30: the poll cannot be what noticed) --------------------------

def test_events_follow_a_symlink_retargeted_to_another_directory(tmp_path: Path, make_source) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.pth").write_bytes(f"model {name}".encode())
    current = tmp_path / "current.pth"
    os.symlink("a/model.pth", current)
    source = armed(make_source(current, poll_interval=30.0))
    [first] = source.candidates()

    later(0.1, lambda: symlink_atomic("b/model.pth", current))  # an event in the link's directory
    [retargeted] = wait_change(source, [first], timeout=3.0)
    assert retargeted.path == tmp_path / "b" / "model.pth"

    def rewrite_in_place() -> None:  # only an event in b/ tells: the watcher must have re-armed there
        with open(tmp_path / "b" / "model.pth", "r+b") as f:
            f.write(b"MODEL")

    later(0.3, rewrite_in_place)
    [rewritten] = wait_change(source, [retargeted], timeout=3.0)
    assert rewritten.path.read_bytes() == b"MODEL b"


def test_events_see_a_version_directory_filled_after_mkdir(tmp_path: Path, make_source) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.pth").write_bytes(b"v1")
    source = armed(make_source(tmp_path, poll_interval=30.0))
    found = source.candidates()
    (tmp_path / "2").mkdir()  # an empty version directory: nothing to serve yet, but now watched too
    time.sleep(0.3)
    later(0.1, lambda: write_atomic(tmp_path / "2" / "model.pth", b"v2"))
    changed = wait_change(source, found, timeout=3.0)
    assert [c.version_hint for c in changed] == ["2", "1"]
    later(0.1, lambda: write_atomic(tmp_path / "1" / "model.pth", b"v1 again"))
    again = wait_change(source, changed, timeout=3.0)
    assert again[1].path.read_bytes() == b"v1 again"


def count_scans(monkeypatch) -> list[float]:
    """Record the time of every scan the sources make from now on."""
    times: list[float] = []
    real_scan = serve.source.scan
    monkeypatch.setattr(serve.source, "scan", lambda *args: (times.append(time.monotonic()), real_scan(*args))[1])
    return times


def test_an_idle_wait_does_not_wake_before_the_poll(tmp_path: Path, make_source, monkeypatch) -> None:
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"v1")
    source = armed(make_source(weights, poll_interval=0.5))
    found = source.candidates()
    scans = count_scans(monkeypatch)
    assert source.wait_for_change(found, stop_later(source, 1.25)) is None
    assert 2 <= len(scans) <= 3  # at 0, 0.5 and 1 s: the poll; nothing else woke the wait


def test_interrupt_makes_the_wait_look_again_and_at_its_stop_event(tmp_path: Path, make_source,
                                                                   monkeypatch) -> None:
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"v1")
    source = make_source(weights, poll_interval=30.0, use_events=False)
    found = source.candidates()
    scans = count_scans(monkeypatch)
    stop = threading.Event()
    later(0.2, source.interrupt)  # a wake-up without stop: one more scan, then back to waiting
    later(0.4, stop.set)  # stop alone is only seen when something wakes the wait...
    later(0.6, source.interrupt)  # ...here the interrupt
    started = time.monotonic()
    assert source.wait_for_change(found, stop) is None
    assert 0.5 < time.monotonic() - started < 1.5
    assert len(scans) == 2


def test_a_stop_without_interrupt_is_seen_at_the_next_poll(tmp_path: Path, make_source) -> None:
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"v1")
    source = make_source(weights, poll_interval=0.5)
    found = source.candidates()
    stop = threading.Event()
    later(0.1, stop.set)
    started = time.monotonic()
    assert source.wait_for_change(found, stop) is None
    assert time.monotonic() - started < 0.5 + 0.5


def test_without_inotify_the_poll_alone_notices(tmp_path: Path, make_source, monkeypatch, caplog) -> None:
    def unavailable() -> None:
        raise OSError(errno.ENOSYS, "inotify is Linux-only (this is testos)")

    monkeypatch.setattr(serve.watch, "_inotify_calls", unavailable)
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"v1")
    with caplog.at_level(logging.WARNING, logger="serve.watch"):
        source = make_source(weights, poll_interval=0.2)
        [first] = source.candidates()
        later(0.1, lambda: write_atomic(weights, b"polled"))
        [new] = wait_change(source, [first])
    assert new.path.read_bytes() == b"polled"
    assert caplog.text.count("relying on polling") == 1


# -- robustness ------------------------------------------------------------------------------------

def test_wait_returns_none_promptly_when_stopped_and_after_close(tmp_path: Path, make_source) -> None:
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"v1")
    source = make_source(weights, poll_interval=30.0)
    found = source.candidates()

    started = time.monotonic()
    assert source.wait_for_change(found, stop_later(source, 0.2)) is None
    assert time.monotonic() - started < 0.2 + 0.5

    results: list[object] = []
    waiter = threading.Thread(target=lambda: results.append(source.wait_for_change(found, threading.Event())))
    waiter.start()
    time.sleep(0.1)
    source.close()
    waiter.join(1.0)
    assert not waiter.is_alive() and results == [None]
    assert not any(t.name == f"weights-source[{weights}]" for t in threading.enumerate())
    source.close()  # idempotent


def test_dangling_symlink_and_loops_do_not_crash(tmp_path: Path, make_source, caplog) -> None:
    (tmp_path / "good.pth").write_bytes(b"good")
    os.utime(tmp_path / "good.pth", (1_000, 1_000))
    os.symlink("missing.pth", tmp_path / "dangling.pth")
    os.symlink("loop.pth", tmp_path / "loop.pth")
    os.symlink("b_loop.pt", tmp_path / "a_loop.pt")
    os.symlink("a_loop.pt", tmp_path / "b_loop.pt")
    os.symlink(".", tmp_path / "subdir_loop")  # a directory loop for the recursive watcher
    source = make_source(tmp_path)
    with caplog.at_level(logging.WARNING, logger="serve.listing"):
        found = source.candidates()
    assert [c.path for c in found] == [tmp_path / "good.pth"]
    assert "dangling symlink" in caplog.text and "symlink loop" in caplog.text

    later(0.1, lambda: write_atomic(tmp_path / "better.pth", b"better"))
    changed = wait_change(source, found)
    assert [c.version_hint for c in changed] == ["better.pth", "good.pth"]


def test_file_mode_dangling_or_looping_location_raises_clearly(tmp_path: Path, make_source) -> None:
    dangling = tmp_path / "model.pth"
    os.symlink("nowhere.pth", dangling)
    with pytest.raises(WeightsNotFoundError, match="dangling symlink"):
        make_source(dangling).candidates()
    loop = tmp_path / "loop.pth"
    os.symlink("loop.pth", loop)
    with pytest.raises(WeightsNotFoundError, match="symlink loop"):
        make_source(loop).candidates()


def test_missing_location_raises_naming_it_then_appears(tmp_path: Path, make_source) -> None:
    missing = tmp_path / "not-there" / "model.pth"
    source = make_source(missing)
    with pytest.raises(WeightsNotFoundError, match=str(missing)):
        source.candidates()
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path / "empty")):
        (tmp_path / "empty").mkdir()
        make_source(tmp_path / "empty").candidates()

    def appear() -> None:
        missing.parent.mkdir()
        write_atomic(missing, b"finally")

    later(0.1, appear)
    [new] = wait_change(source, [])
    assert new.path == missing and new.path.read_bytes() == b"finally"
