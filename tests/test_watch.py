"""Tests for serve.watch: a real inotify instance and watcher thread on tmp_path, every wait bounded."""

from __future__ import annotations

import errno
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import serve.watch
from serve.watch import DirectoryEvents, DirectoryWatcher, WatchTarget, directory_target
from tests.files import symlink_atomic, write_atomic

WAIT_S = 3.0

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only"),
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]


def readable(events: DirectoryEvents, timeout: float = WAIT_S) -> bool:
    return bool(select.select([events], [], [], timeout)[0])


class Calls:
    """An `on_event` callback that counts calls and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = threading.Condition()

    def __call__(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait_more_than(self, count: int, timeout: float = WAIT_S) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count > count, timeout)


@pytest.fixture
def watch() -> Iterator[Callable[..., tuple[DirectoryWatcher, Calls]]]:
    """Start watchers over a targets function; all are closed at the end."""
    watchers: list[DirectoryWatcher] = []

    def start(targets: Callable[[], tuple[WatchTarget, ...]]) -> tuple[DirectoryWatcher, Calls]:
        calls = Calls()
        watcher = DirectoryWatcher(targets, calls, name="test-watcher")
        watchers.append(watcher)
        watcher.start()
        assert watcher.armed.wait(WAIT_S)
        return watcher, calls

    yield start
    for watcher in watchers:
        assert watcher.close(WAIT_S)


def dirs(*paths: Path) -> Callable[[], tuple[WatchTarget, ...]]:
    return lambda: tuple(t for t in map(directory_target, paths) if t is not None)


# -- DirectoryEvents --------------------------------------------------------------------------------

def test_create_and_rename_over_are_read_by_name(tmp_path: Path) -> None:
    with DirectoryEvents() as events:
        events.add(str(tmp_path))
        assert events.drain() == [] and not readable(events, 0.05)
        (tmp_path / "model.pth").write_bytes(b"v1")
        assert readable(events)
        assert set(events.drain()) == {"model.pth"}
        write_atomic(tmp_path / "model.pth", b"v2")
        assert readable(events)
        assert {"model.pth.tmp", "model.pth"} <= set(events.drain())
        assert events.drain() == []


def test_a_symlink_swap_and_a_deleted_directory_are_events(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    os.symlink("a", tmp_path / "..data")
    with DirectoryEvents() as events:
        events.add(str(tmp_path))
        events.add(str(tmp_path / "b"))
        symlink_atomic("b", tmp_path / "..data")
        assert readable(events) and "..data" in events.drain()
        (tmp_path / "b").rmdir()
        assert readable(events) and "" in events.drain()  # the watched directory itself is gone


def test_add_refuses_what_is_not_a_directory_and_close_is_idempotent(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    events = DirectoryEvents()
    with pytest.raises(OSError) as missing:
        events.add(str(tmp_path / "missing"))
    assert missing.value.errno == errno.ENOENT
    with pytest.raises(OSError) as not_dir:
        events.add(str(tmp_path / "file"))
    assert not_dir.value.errno == errno.ENOTDIR
    events.close()
    events.close()
    with pytest.raises(ValueError):
        events.fileno()


def test_a_forked_child_does_not_keep_the_instance(tmp_path: Path) -> None:
    with DirectoryEvents() as events:
        events.add(str(tmp_path))
        fd = events.fileno()
        pid = os.fork()
        if pid == 0:  # the child: the descriptor must be closed already
            try:
                os.fstat(fd)
            except OSError:
                os._exit(0)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        os.fstat(fd)  # still open here


# -- DirectoryWatcher -------------------------------------------------------------------------------

def test_every_batch_is_reported_at_once(tmp_path: Path, watch) -> None:
    _, calls = watch(dirs(tmp_path))
    for change in (lambda: (tmp_path / "model.pth").write_bytes(b"v1"),
                   lambda: write_atomic(tmp_path / "model.pth", b"v2"),
                   lambda: os.symlink("model.pth", tmp_path / "link.pth")):
        before = calls.count
        time.sleep(0.1)  # past the gap that merges a burst into one batch
        started = time.monotonic()
        change()
        assert calls.wait_more_than(before), "no batch reported"
        assert time.monotonic() - started < 0.5


def test_idle_watcher_thread_never_wakes(tmp_path: Path, watch) -> None:
    watcher, calls = watch(dirs(tmp_path))
    status = Path(f"/proc/self/task/{watcher._thread.native_id}/status")

    def switches() -> int:
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])

    time.sleep(0.1)
    before = switches()
    time.sleep(1.0)
    assert switches() == before and calls.count == 0


def test_re_arms_when_the_targets_move_after_an_event(tmp_path: Path, watch) -> None:
    """kubelet style: a ..data symlink swap (an event in the volume) moves the second watched directory."""
    volume = tmp_path / "volume"
    for name in ("..v1", "..v2"):
        (volume / name).mkdir(parents=True)
    os.symlink("..v1", volume / "..data")
    _, calls = watch(dirs(volume, volume / "..data"))
    symlink_atomic("..v2", volume / "..data")
    assert calls.wait_more_than(0)
    time.sleep(0.2)  # the swap's batch, then the re-arm's report
    before = calls.count
    (volume / "..v2" / "model.pth").write_bytes(b"in the new directory")
    assert calls.wait_more_than(before), "the watcher did not re-arm on the swapped-in directory"


def test_check_re_arms_when_the_targets_moved_without_an_event(tmp_path: Path, watch) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    current = [tmp_path / "old"]
    watcher, calls = watch(lambda: dirs(*current)())
    current[0] = tmp_path / "new"  # nothing watched changed: only check() can tell
    watcher.check()
    assert calls.wait_more_than(0), "check() did not re-arm"
    time.sleep(0.2)
    before = calls.count
    (tmp_path / "new" / "model.pth").write_bytes(b"x")
    assert calls.wait_more_than(before)


def test_close_while_blocked_is_prompt(tmp_path: Path) -> None:
    watcher = DirectoryWatcher(dirs(tmp_path), lambda: None, name="test-watcher")
    watcher.start()
    assert watcher.armed.wait(WAIT_S)
    time.sleep(0.1)  # blocked in poll() with no timeout
    started = time.monotonic()
    assert watcher.close(WAIT_S)
    assert time.monotonic() - started < 0.5 and not watcher._thread.is_alive()
    assert watcher.close(WAIT_S)  # idempotent


def test_unwatchable_directories_and_missing_inotify_are_logged_once(tmp_path: Path, watch, monkeypatch,
                                                                     caplog) -> None:
    missing = WatchTarget(str(tmp_path / "missing"), 0, 0)
    with caplog.at_level(logging.WARNING, logger="serve.watch"):
        _, calls = watch(lambda: (missing, *dirs(tmp_path)()))
        (tmp_path / "model.pth").write_bytes(b"still watched")
        assert calls.wait_more_than(0)
    assert caplog.text.count("cannot watch") == 1

    def unavailable() -> None:
        raise OSError(errno.ENOSYS, "inotify is Linux-only (this is testos)")

    monkeypatch.setattr(serve.watch, "_inotify_calls", unavailable)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="serve.watch"):
        watcher = DirectoryWatcher(dirs(tmp_path), lambda: None, name="test-watcher")
        watcher.start()
        watcher._thread.join(WAIT_S)
    assert not watcher.armed.is_set() and not watcher._thread.is_alive()
    assert caplog.text.count("relying on polling") == 1 and "Linux-only" in caplog.text
    watcher.check()  # harmless once the thread is gone
    assert watcher.close(WAIT_S)
