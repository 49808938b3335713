"""Where the weights come from and when they change (TF Serving's "source").

One :class:`WeightsSource` runs in the supervisor process (the version manager's ``SourceFollower``
thread waits on it and hands every change to the manager). It lists the servable weights files at a
location and blocks until that list changes. No torch here, and no weights file is opened.

Listing (which files count, in which order, the ``.sha256`` sidecars, the publisher contract):
:mod:`serve.listing`. Filesystem events: :mod:`serve.watch`.

Change detection
----------------
A fingerprint poll every ``poll_interval`` seconds is the correctness backstop and works alone
(``use_events=False``, e.g. network filesystems). With ``use_events=True`` a daemon thread also
watches, with Linux inotify, the directories whose entries name what is served: the parent
directory and the resolved file's directory in file mode; the directory and its numbered version
directories in directory mode. Every batch of events triggers an immediate re-check. Paths are
re-resolved on every check, so swaps that never touch the served name are seen (a kubelet ``..data``
swap is an event in the volume directory); the watched directories are re-armed when they move
(after an event batch, or when the poll sees a change the events missed). Left to the poll: in-place
changes behind a symlink that points out of the watched directories (an intermediate link of a chain
in file mode, a loose file linked from elsewhere in directory mode), changes made by other machines on
a network filesystem, and everything when inotify is unavailable. Idle, nothing wakes but the poll;
a waiting ``wait_for_change`` looks at its `stop` event whenever it wakes, so whoever sets `stop`
calls :meth:`WeightsSource.interrupt`.

A candidate is only handed out once its fingerprint (real path, inode, size, mtime, ctime and the
sidecar's) has been the same in two observations at least ``debounce`` seconds apart, so files that
are still being written (a non-atomic publisher) are not served half-written. The list is handed out
once all candidates have settled; if something keeps changing for longer than a settle timeout
(``max(30 s, 20 * debounce)``), the settled ones are handed out without it, with a warning.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from serve.errors import WeightsNotFoundError
from serve.listing import WEIGHTS_SUFFIXES, Candidate, Problems, scan, version_directories
from serve.watch import DirectoryWatcher, WatchTarget, directory_target

__all__ = ["Candidate", "WeightsNotFoundError", "WeightsSource", "WEIGHTS_SUFFIXES"]

logger = logging.getLogger(__name__)

_MIN_SETTLE_TIMEOUT_S = 30.0  # see the module docstring: when a never-settling file stops blocking others
_CLOSE_JOIN_S = 2.0


@dataclass
class Observation:
    """One scan of the location, with what the settle tracking says about it."""

    candidates: list[Candidate]  # everything servable right now, best first
    pending: set[tuple]  # fingerprints not yet unchanged for `debounce`
    settles_in: float  # seconds until every pending fingerprint could count as settled
    timed_out: bool  # something has been pending for longer than the settle timeout
    problems: list[str]  # why entries were skipped, for error messages

    @property
    def settled(self) -> list[Candidate]:
        return [c for c in self.candidates if c.fingerprint not in self.pending]

    def ready(self) -> list[Candidate] | None:
        """The list to hand out now ([] if nothing is servable), or None while files are settling."""
        if not self.pending:
            return self.candidates
        return self.settled if self.timed_out else None

    def not_found_message(self, location: Path) -> str:
        """Why nothing at `location` can be served, for WeightsNotFoundError."""
        if self.pending:
            why = "everything found is still being written"
        else:
            why = "; ".join(self.problems) or "no weights files found"
        return (f"no servable weights at {location}: {why} (expected a {'/'.join(WEIGHTS_SUFFIXES)} "
                f"file, a directory of numbered version directories, or a directory of weights files)")


class SettleTracker:
    """Scans a location; tracks which fingerprints have stayed unchanged for `debounce` seconds and for
    how long some have not. Thread-safe: one scan at a time."""

    def __init__(self, location: Path, debounce: float) -> None:
        self.debounce = debounce
        self.timeout = max(_MIN_SETTLE_TIMEOUT_S, 20 * debounce)
        self._location = location
        self._lock = threading.Lock()
        self._first_seen: dict[tuple, float] = {}
        self._unsettled_since: float | None = None
        self._warned: set[str] = set()  # the last scan's warnings: not logged again while they last

    def observe(self) -> Observation:
        """Scan now and record what was found (fingerprints gone are forgotten)."""
        with self._lock:
            problems = Problems(self._warned)
            observation = self._track(scan(self._location, problems), problems)
            self._warned = problems.warned
            return observation

    def settled(self) -> list[Candidate]:
        """Scan until nothing found is settling (or the settle timeout passed): the settled candidates, best
        first; WeightsNotFoundError naming the location if there are none."""
        while True:
            observation = self.observe()
            ready = observation.ready()
            if ready:
                return ready
            if ready is not None:
                raise WeightsNotFoundError(observation.not_found_message(self._location))
            time.sleep(observation.settles_in)

    def _track(self, found: list[Candidate], problems: Problems) -> Observation:
        """Update the first sightings with one scan's candidates; warn when settling takes too long."""
        now = time.monotonic()
        self._first_seen = {c.fingerprint: self._first_seen.get(c.fingerprint, now) for c in found}
        pending = {fp for fp, t in self._first_seen.items() if now - t < self.debounce}
        if not pending:
            self._unsettled_since = None
        elif self._unsettled_since is None:
            self._unsettled_since = now
        timed_out = self._unsettled_since is not None and now - self._unsettled_since >= self.timeout
        if timed_out:
            names = ", ".join(sorted(fp[0] for fp in pending))
            problems.warn(f"weights at {self._location} still changing after {self.timeout:.0f} s "
                          f"({names}); not served until they settle")
        settles_in = max((self._first_seen[fp] + self.debounce - now for fp in pending), default=0.0)
        return Observation(found, pending, max(settles_in, 0.001), timed_out, problems.messages)


def watch_targets(location: Path) -> tuple[WatchTarget, ...]:
    """The directories whose entries name what `location` lists (see the module docstring)."""
    if os.path.isdir(location):
        directories = [location, *(location / name for name in version_directories(location))]
    else:
        directories = [location.parent, Path(os.path.realpath(location)).parent]
    return tuple(dict.fromkeys(t for t in map(directory_target, directories) if t is not None))


def start_watcher(location: Path, on_event: Callable[[], None]) -> DirectoryWatcher:
    """The event watcher thread for `location` (its name says which), started."""
    watcher = DirectoryWatcher(functools.partial(watch_targets, location), on_event, f"weights-source[{location}]")
    watcher.start()
    return watcher


class Wakeups:
    """What ends a waiting source's sleep before the next poll: a batch of filesystem events (from a watcher
    thread, when events are used), :meth:`set` (the source's interrupt) and :meth:`close`."""

    def __init__(self, location: Path, use_events: bool) -> None:
        self._location = location
        self._closed = threading.Event()
        self._wakeup = threading.Event()  # set by events, set() and close()
        self.watcher = start_watcher(location, self._wakeup.set) if use_events else None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed.is_set()

    def set(self) -> None:
        """End the current sleep, or the next one, now."""
        self._wakeup.set()

    def clear(self) -> None:
        """Forget the wake-ups so far: only those from now on end the next sleep."""
        self._wakeup.clear()

    def recheck(self) -> None:
        """Have the watcher re-arm soon if the directories to watch moved without an event (no watcher: nothing)."""
        if self.watcher is not None:
            self.watcher.check()

    def sleep(self, timeout: float, stop: threading.Event) -> None:
        """Block for up to `timeout`, ended early by a wake-up; not at all once `stop` is set or after close()."""
        if not (stop.is_set() or self._closed.is_set()):
            self._wakeup.wait(timeout)

    def close(self) -> None:
        """Stop the watcher thread (joins it, up to 2 s) and end every sleep. Idempotent."""
        self._closed.set()
        self._wakeup.set()
        if self.watcher is not None and not self.watcher.close(_CLOSE_JOIN_S):
            logger.warning("weights watcher thread for %s did not stop within %.0f s", self._location, _CLOSE_JOIN_S)


def _fingerprints(candidates: Sequence[Candidate]) -> list[tuple]:
    return [c.fingerprint for c in candidates]


class WeightsSource:
    """The servable weights at a file or directory location, and a blocking wait for them to change.

    Not meant for concurrent ``wait_for_change`` calls; ``candidates()`` may be called from any thread.
    Starts one daemon thread (the event watcher) when ``use_events`` is true; ``close()`` stops it.
    """

    def __init__(self, location: Path, *, poll_interval: float = 0.5, debounce: float = 0.25,
                 use_events: bool = True) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        if debounce < 0:
            raise ValueError(f"debounce must be >= 0, got {debounce}")
        self._location = Path(os.path.abspath(os.fspath(location)))  # symlinks stay unresolved: they move
        self._poll_interval = float(poll_interval)
        self._settle = SettleTracker(self._location, float(debounce))
        self._wakeups = Wakeups(self._location, use_events)  # events, interrupt() and close(): the wait looks again

    @property
    def location(self) -> Path:
        """The location as given (absolute, symlinks not resolved)."""
        return self._location

    @property
    def poll_interval(self) -> float:
        """Seconds between fingerprint polls."""
        return self._poll_interval

    def candidates(self) -> list[Candidate]:
        """Servable candidates now, best first (file mode: at most one), once settled (``debounce``).

        WeightsNotFoundError naming the location if nothing is servable, or if everything found is
        still changing after the settle timeout.
        """
        return self._settle.settled()

    def wait_for_change(self, previous: list[Candidate], stop: threading.Event) -> list[Candidate] | None:
        """Block until the settled candidates differ from `previous` (by fingerprint, in order); return them.

        Never returns an empty list: while nothing is servable it keeps waiting. Returns None once
        `stop` is set or the source is closed. `stop` is looked at whenever the source wakes (an event
        batch, the poll every ``poll_interval``, :meth:`interrupt`): whoever sets it calls
        :meth:`interrupt` to be answered at once. Never raises for files that vanish or cannot be
        resolved; those are skipped and logged.
        """
        wanted_change_from = _fingerprints(previous)
        reported_empty, last_pass = False, None
        while not (stop.is_set() or self._wakeups.closed):
            self._wakeups.clear()  # events from here on trigger another pass
            observation = self._settle.observe()
            if _fingerprints(observation.candidates) != last_pass:
                self._wakeups.recheck()  # something changed: re-arm if the watched directories moved silently
            last_pass = _fingerprints(observation.candidates)
            ready = observation.ready()
            if ready and _fingerprints(ready) != wanted_change_from:
                return ready
            if not observation.candidates and not reported_empty:
                logger.info("no servable weights at %s for now; waiting", self._location)
            reported_empty = not observation.candidates
            delay = observation.settles_in if observation.pending else self._poll_interval
            self._wakeups.sleep(min(delay, self._poll_interval), stop)
        return None

    def interrupt(self) -> None:
        """Wake a pending ``wait_for_change`` now: it looks at its `stop` event and at the weights."""
        self._wakeups.set()

    def close(self) -> None:
        """Stop the watcher thread (joins it, up to 2 s) and end pending waits. Idempotent."""
        self._wakeups.close()

    def __enter__(self) -> WeightsSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
