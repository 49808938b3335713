"""Directory change events from Linux inotify, to wake a waiting thread as soon as a directory changes.

:class:`DirectoryEvents` is one inotify instance (``ctypes`` on the C library: no dependency) watching a
few directories, each one level deep (the entries of a watched directory: created, deleted, renamed
in or out, written, attributes changed; and the directory itself being deleted or moved).
:class:`DirectoryWatcher` is a daemon thread that blocks in ``poll()`` on that descriptor and on a wake
pipe, with no timeout: idle, it costs nothing. It calls back after every batch of events, then asks
which directories it should watch and re-arms when the answer changed.

Events are an accelerator for a poll that stays the correctness backstop: they are not available off
Linux, on network filesystems (changes made by other machines raise no event), or when the inotify
limits (``fs.inotify.max_user_instances``, ``max_user_watches``) are reached. Then a warning is logged
once and the caller's poll alone notices changes.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import select
import stat
import struct
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import NamedTuple

from serve.channel import WakePipe

__all__ = ["DirectoryEvents", "DirectoryWatcher", "WatchTarget", "directory_target"]

logger = logging.getLogger(__name__)

# <sys/inotify.h>: what a watched directory reports (about its entries and about itself)
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_ONLYDIR = 0x400, 0x800, 0x01000000
_DIRECTORY_MASK = (_IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
                   | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR)
_IN_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # the kernel defines IN_NONBLOCK/IN_CLOEXEC as these flags
_IN_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name
_READ_BYTES = 64 * 1024  # room for hundreds of events (one is at most 16 + NAME_MAX + 1 bytes)
_MAX_READS = 64  # per drain: a writer that never stops cannot keep the watcher thread reading forever
_BATCH_GAP_S = 0.05  # after a batch is reported, the next one waits this long (events meanwhile are merged)


class WatchTarget(NamedTuple):
    """A directory to watch, by real path and identity (a directory replaced under the same path differs)."""

    path: str
    device: int
    inode: int


def directory_target(path: str | os.PathLike[str]) -> WatchTarget | None:
    """The directory at `path` (symlinks resolved) as a watch target; None if it is not a directory now."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return None
    return WatchTarget(real, st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


@functools.cache
def _inotify_calls() -> tuple[Callable[[int], int], Callable[[int, bytes, int], int]]:
    """``inotify_init1`` and ``inotify_add_watch`` from the C library; OSError(ENOSYS) where there are none."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, f"inotify is Linux-only (this is {sys.platform})")
    libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
    try:
        init, add_watch = libc.inotify_init1, libc.inotify_add_watch
    except AttributeError:
        raise OSError(errno.ENOSYS, "the C library has no inotify") from None
    init.argtypes, init.restype = [ctypes.c_int], ctypes.c_int
    add_watch.argtypes, add_watch.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int
    return init, add_watch


def _last_error(call: str, path: str | None = None) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}", path)


def _event_names(data: bytes) -> Iterator[str]:
    """The entry names in a buffer of ``struct inotify_event`` ('' for an event about the directory itself)."""
    offset = 0
    while offset + _EVENT_HEADER.size <= len(data):
        _wd, _mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
        start = offset + _EVENT_HEADER.size
        yield os.fsdecode(data[start:start + length].split(b"\0", 1)[0])
        offset = start + length


class DirectoryEvents:
    """One inotify instance: directories added with :meth:`add`, readable when something changed in them.

    OSError from the constructor where inotify is unavailable (not Linux) or its limits are reached.
    A forked child closes its copy at once (it runs no watcher thread; the instance and its watches
    count against the per-user inotify limits for as long as any process holds it).
    """

    def __init__(self) -> None:
        init, self._add_watch = _inotify_calls()
        self._fd = init(_IN_NONBLOCK | _IN_CLOEXEC)
        if self._fd < 0:
            raise _last_error("inotify_init1")
        _OPEN_INSTANCES.add(self)

    def add(self, directory: str) -> None:
        """Watch the entries of `directory` (symlinks followed; one level deep); OSError if it cannot be."""
        if self._add_watch(self.fileno(), os.fsencode(directory), _DIRECTORY_MASK) < 0:
            raise _last_error("inotify_add_watch", directory)

    def fileno(self) -> int:
        """The descriptor to wait on (readable while events are queued); ValueError once closed."""
        if self._fd < 0:
            raise ValueError("inotify instance is closed")
        return self._fd

    def drain(self) -> list[str]:
        """Read every queued event without blocking: the names that changed, '' for a directory itself."""
        names: list[str] = []
        for _ in range(_MAX_READS):
            try:
                data = os.read(self.fileno(), _READ_BYTES)
            except BlockingIOError:
                break
            names.extend(_event_names(data))
        return names

    def close(self) -> None:
        """Close the descriptor (every watch goes with it). Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> DirectoryEvents:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_OPEN_INSTANCES: weakref.WeakSet[DirectoryEvents] = weakref.WeakSet()


def _close_in_forked_child() -> None:
    for events in list(_OPEN_INSTANCES):
        events.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_forked_child)


def _watching(targets: tuple[WatchTarget, ...], warn: Callable[[str], None]) -> DirectoryEvents:
    """A new inotify instance watching `targets`; a directory that cannot be watched is left to the poll, and
    `warn` is told why."""
    events = DirectoryEvents()
    for target in targets:
        try:
            events.add(target.path)
        except OSError as exc:  # e.g. permission denied, max_user_watches: that directory is polled only
            warn(f"cannot watch {target.path} for events ({exc.strerror}); relying on polling")
    return events


def _wait_for_events(events: DirectoryEvents, wake: WakePipe) -> bool:
    """Block (no timeout) until events are queued or `wake` is poked (a poke is drained); True if events were
    read (every queued one)."""
    poller = select.poll()
    poller.register(events.fileno(), select.POLLIN)
    poller.register(wake.fileno(), select.POLLIN)
    ready = {fd for fd, _ in poller.poll()}
    if wake.fileno() in ready:
        wake.drain()
    return events.fileno() in ready and bool(events.drain())


class DirectoryWatcher:
    """A daemon thread that calls `on_event` after every batch of events in the directories `targets()` names.

    ``targets`` is asked again after every batch: when the directories moved (a symlink swapped above
    them, a directory replaced), the watches are re-armed and `on_event` is called once more, since
    the move of a watched directory is itself an event in a watched directory (its parent) or in the
    directory (deleted or moved). A move that raises no event in a watched directory (a symlink swapped
    higher up) is only seen when :meth:`check` is called: the caller's poll does when it sees a change
    the events missed. Batches are reported at most every 50 ms; idle, the thread never wakes.
    """

    def __init__(self, targets: Callable[[], tuple[WatchTarget, ...]], on_event: Callable[[], None],
                 name: str) -> None:
        self._targets, self._on_event = targets, on_event
        self.armed = threading.Event()  # set once the first watches are in place
        self._armed_targets: tuple[WatchTarget, ...] | None = None
        self._warned: set[str] = set()
        self._closing = False
        self._wake = WakePipe()  # pokes: close() and check()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def check(self) -> None:
        """Re-arm soon if the directories to watch are no longer those armed (cheap stats; any thread)."""
        if self.armed.is_set() and self._thread.is_alive() and self._targets() != self._armed_targets:
            self._wake.poke()

    def close(self, timeout: float) -> bool:
        """Stop the thread (joined up to `timeout` seconds); False if it is still running. Idempotent."""
        self._closing = True
        self._wake.poke()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self._wake.close()
        return True

    def _run(self) -> None:
        """The thread: arm, block until events or a poke, report, re-arm when the targets moved."""
        events: DirectoryEvents | None = None
        try:
            while not self._closing:
                targets = self._targets()
                if events is None or targets != self._armed_targets:
                    events = self._arm(targets, events)
                self._wait(events)
        except Exception as exc:  # events are an accelerator: the caller's poll carries on alone
            self._warn_once(f"cannot watch for filesystem events ({exc}); relying on polling")
        finally:
            if events is not None:
                events.close()

    def _arm(self, targets: tuple[WatchTarget, ...], old: DirectoryEvents | None) -> DirectoryEvents:
        """A new inotify instance watching `targets`; the old one is closed and a re-arm is reported."""
        events = _watching(targets, self._warn_once)
        self._armed_targets = targets
        if old is not None:
            old.close()
            self._on_event()  # what changed while re-arming is seen by the re-check this triggers
        self.armed.set()
        return events

    def _wait(self, events: DirectoryEvents) -> None:
        """Block (no timeout) until events are queued or the pipe is poked; report a batch of events."""
        if _wait_for_events(events, self._wake) and not self._closing:
            self._on_event()
            self._wake.wait(_BATCH_GAP_S)  # merge a burst into the next batch; a poke (close) ends the gap

    def _warn_once(self, message: str) -> None:
        (logger.debug if message in self._warned else logger.warning)("%s", message)
        self._warned.add(message)
