"""Where the weights come from and when they change (TF Serving's "source").

A :class:`WeightsSource` runs inside each inference worker. It lists the servable weights files at a
location and blocks until that list changes. It never opens a weights file (the loader does): it only
resolves paths, stats files and reads the small ``.sha256`` sidecars. No torch here.

Location rule
-------------
* **A file** (or a symlink to one, however deep): that file is the only candidate.
* **A directory**, with ONE rule:

  1. If it has *numbered version subdirectories* (``<dir>/1/``, ``<dir>/2/``, names made of digits
     only), they are the versions, highest integer first (TF Serving's layout). Each version directory
     must hold a single weights file; if it holds several, the one named ``model.*`` is used; if that
     is still ambiguous the version is skipped with a warning. Loose files in ``<dir>`` are then ignored.
  2. Otherwise the weights files directly in ``<dir>`` are the candidates, newest mtime first, the
     name breaking ties.

  Weights files are names ending in ``.pth``, ``.pt`` or ``.safetensors``. Hidden names (starting
  with ``.``), temporary names (``*.tmp``, ``*.part``, ``*~``) and empty files are never candidates.
  Symlinks are followed: a kubelet ConfigMap/Secret volume (``<dir>/model.pth`` ->
  ``..data/model.pth``, ``..data`` -> ``..2026_11_29_17_00_00.123/``, swapped by renaming a new
  ``..data_tmp`` symlink over ``..data``) works in both file and directory mode. Dangling symlinks,
  symlink loops and unreadable directories are skipped with a warning.

Candidates are returned best first; ``Candidate.path`` is the resolved real path.

Publisher contract
------------------
Write the weights to a temporary name (``model.pth.tmp``, a hidden name, or a hidden version directory
such as ``.4.tmp/``) on the same filesystem, then ``os.replace``/``rename`` it into place (or swap a
symlink the same way). An optional ``<weights file>.sha256`` sidecar (``sha256sum`` format: the hex
digest is the first whitespace-separated token) is looked up next to the name as listed, else next
to the resolved file; write it BEFORE renaming the weights file, or together with it (same version
directory, same kubelet swap). The loader rejects a file whose digest does not match the sidecar.

Change detection
----------------
A fingerprint poll every ``poll_interval`` seconds is the correctness backstop and works alone
(``use_events=False``, e.g. network filesystems). With ``use_events=True`` a daemon thread also
watches the directory with ``watchfiles`` (the parent directory and the resolved file's directory in
file mode, the directory recursively in directory mode) and every event triggers an immediate
re-check. Paths are re-resolved on every check, so swaps that never touch the served name are seen.

A candidate is only handed out once its fingerprint (real path, inode, size, mtime, ctime and the
sidecar's) has been the same in two observations at least ``debounce`` seconds apart, so files that
are still being written (a non-atomic publisher) are not served half-written. The list is handed out
once all candidates have settled; if something keeps changing for longer than a settle timeout
(``max(30 s, 20 * debounce)``), the settled ones are handed out without it, with a warning.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import watchfiles

from serve.errors import WeightsNotFoundError

__all__ = ["Candidate", "WeightsNotFoundError", "WeightsSource", "WEIGHTS_SUFFIXES"]

logger = logging.getLogger(__name__)

WEIGHTS_SUFFIXES = (".pth", ".pt", ".safetensors")
_TEMP_SUFFIXES = (".tmp", ".part", "~")
_SIDECAR_SUFFIX = ".sha256"
_SIDECAR_MAX_BYTES = 4096
_VERSION_NAME = re.compile(r"[0-9]+")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

_MIN_SETTLE_TIMEOUT_S = 30.0  # see the module docstring: when a never-settling file stops blocking others
_STOP_CHECK_S = 0.25          # how often a waiting wait_for_change looks at its stop event (idle cost)
_WATCH_STEP_MS = 50           # watchfiles: quiet time before a batch of events is reported
_WATCH_DEBOUNCE_MS = 200      # watchfiles: longest a batch of events is held back
_WATCH_REARM_CHECK_MS = 1000  # how often the watcher re-checks which directories it should watch
_CLOSE_JOIN_S = 2.0


@dataclass(frozen=True)
class Candidate:
    """One servable weights file, as seen at one moment."""

    path: Path  # resolved real path of the weights file (os.path.realpath)
    version_hint: str  # "3" for <dir>/3/model.pth, else the file name as listed; informational only
    fingerprint: tuple  # (realpath, st_ino, st_size, st_mtime_ns, st_ctime_ns, sidecar fingerprint or None)
    expected_sha256: str | None  # lower-case hex digest from "<file>.sha256", if that sidecar exists


@dataclass
class _Observation:
    """One scan of the location, with what the stability tracking says about it."""

    candidates: list[Candidate]  # everything servable right now, best first
    pending: set[tuple]  # fingerprints not yet unchanged for `debounce`
    settles_in: float  # seconds until every pending fingerprint could count as settled
    unsettled_for: float  # how long some candidate has continuously been pending
    problems: list[str]  # why entries were skipped, for error messages

    @property
    def settled(self) -> list[Candidate]:
        return [c for c in self.candidates if c.fingerprint not in self.pending]


class _Problems:
    """Collects why entries were skipped during one scan; each warning is logged once while it lasts."""

    def __init__(self, already_warned: set[str]) -> None:
        self.messages: list[str] = []
        self.warned: set[str] = set()
        self._already_warned = already_warned

    def warn(self, message: str) -> None:
        self.messages.append(message)
        self.warned.add(message)
        if message not in self._already_warned:
            logger.warning("%s", message)

    def debug(self, message: str) -> None:
        self.messages.append(message)
        logger.debug("%s", message)

    def os_error(self, path: Path, exc: OSError, what: str = "weights file") -> None:
        """Classify a resolve/stat/read failure of `path` and report it at the right level."""
        if isinstance(exc, FileNotFoundError):
            if os.path.islink(path) and not os.path.exists(path):
                self.warn(f"{what} {path} is a dangling symlink; skipped")
            else:
                self.debug(f"{what} {path} vanished while scanning; skipped")
        elif exc.errno == errno.ELOOP:
            self.warn(f"{what} {path} is a symlink loop; skipped")
        elif isinstance(exc, PermissionError):
            self.warn(f"{what} {path}: permission denied; skipped")
        else:
            self.warn(f"{what} {path}: {exc.strerror or exc}; skipped")


def _is_weights_name(name: str) -> bool:
    """A visible, non-temporary name with a weights suffix."""
    lower = name.lower()
    return not name.startswith(".") and not lower.endswith(_TEMP_SUFFIXES) and lower.endswith(WEIGHTS_SUFFIXES)


def _resolve(path: Path) -> tuple[str, os.stat_result]:
    """Real path and stat of `path`, following every symlink; raises OSError (loops: ELOOP)."""
    real = os.path.realpath(path, strict=True)
    return real, os.stat(real)


def _stat_fingerprint(real: str, st: os.stat_result) -> tuple:
    return (real, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read_sidecar(path: Path) -> tuple[tuple, str]:
    """Fingerprint and digest of a ``sha256sum``-style sidecar; OSError if unreadable, ValueError if malformed."""
    real, st = _resolve(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"sha256 sidecar {path} is not a regular file; weights skipped")
    with open(real, "rb") as f:
        tokens = f.read(_SIDECAR_MAX_BYTES).split()
    # sha256sum prefixes the line with a backslash when it escapes the file name
    digest = tokens[0].decode("ascii", "replace").lstrip("\\").lower() if tokens else ""
    if not _SHA256_HEX.fullmatch(digest):
        raise ValueError(f"sha256 sidecar {path} does not start with a sha256 hex digest; weights skipped")
    return _stat_fingerprint(real, st), digest


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
        self._debounce = float(debounce)
        self._settle_timeout = max(_MIN_SETTLE_TIMEOUT_S, 20 * self._debounce)
        self._lock = threading.Lock()  # guards the stability tracking below
        self._first_seen: dict[tuple, float] = {}
        self._unsettled_since: float | None = None
        self._warned: set[str] = set()
        self._closed = threading.Event()
        self._wakeup = threading.Event()  # set by the watcher thread on every batch of events
        self._watch_armed = threading.Event()  # set once the watcher has reported for the first time
        self._thread: threading.Thread | None = None
        if use_events:
            self._thread = threading.Thread(target=self._watch_loop, name=f"weights-source[{self._location}]",
                                            daemon=True)
            self._thread.start()

    @property
    def location(self) -> Path:
        """The location as given (absolute, symlinks not resolved)."""
        return self._location

    @property
    def poll_interval(self) -> float:
        """Seconds between fingerprint polls."""
        return self._poll_interval

    def candidates(self) -> list[Candidate]:
        """Servable candidates now, best first (file mode: at most one).

        Waits for the files found to settle (``debounce`` seconds the first time a file is seen).
        Raises WeightsNotFoundError naming the location if nothing is servable, or if everything found
        is still changing after the settle timeout.
        """
        while True:
            observation = self._observe()
            ready = self._ready(observation)
            if ready:
                return ready
            if ready is not None:
                raise WeightsNotFoundError(self._not_found_message(observation))
            time.sleep(observation.settles_in)

    def wait_for_change(self, previous: list[Candidate], stop: threading.Event) -> list[Candidate] | None:
        """Block until the settled candidates differ from `previous` (by fingerprint, in order); return them.

        Never returns an empty list: while nothing is servable it keeps waiting. Returns None as soon
        as `stop` is set (checked every 250 ms) or the source is closed. Never raises for files that
        vanish or cannot be resolved; those are skipped and logged.
        """
        wanted_change_from = _fingerprints(previous)
        reported_empty = False
        while not (stop.is_set() or self._closed.is_set()):
            self._wakeup.clear()  # events from here on trigger another pass
            observation = self._observe()
            ready = self._ready(observation)
            if ready and _fingerprints(ready) != wanted_change_from:
                return ready
            if not observation.candidates and not reported_empty:
                logger.info("no servable weights at %s for now; waiting", self._location)
            reported_empty = not observation.candidates
            delay = observation.settles_in if observation.pending else self._poll_interval
            self._sleep(min(delay, self._poll_interval), stop)
        return None

    def close(self) -> None:
        """Stop the watcher thread (joins it, up to 2 s) and end pending waits. Idempotent."""
        self._closed.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_CLOSE_JOIN_S)
            if thread.is_alive():
                logger.warning("weights watcher thread for %s did not stop within %.0f s",
                               self._location, _CLOSE_JOIN_S)

    def __enter__(self) -> WeightsSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- observing --------------------------------------------------------------------------------

    def _observe(self) -> _Observation:
        """Scan now and update which fingerprints have stayed unchanged for `debounce`."""
        with self._lock:
            problems = _Problems(self._warned)
            found = self._scan(problems)
            now = time.monotonic()
            self._first_seen = {c.fingerprint: self._first_seen.get(c.fingerprint, now) for c in found}
            pending = {fp for fp, t in self._first_seen.items() if now - t < self._debounce}
            if not pending:
                self._unsettled_since = None
            elif self._unsettled_since is None:
                self._unsettled_since = now
            unsettled_for = 0.0 if self._unsettled_since is None else now - self._unsettled_since
            if unsettled_for >= self._settle_timeout:
                names = ", ".join(sorted(fp[0] for fp in pending))
                problems.warn(f"weights at {self._location} still changing after {self._settle_timeout:.0f} s "
                              f"({names}); not served until they settle")
            self._warned = problems.warned
            settles_in = max((self._first_seen[fp] + self._debounce - now for fp in pending), default=0.0)
            return _Observation(found, pending, max(settles_in, 0.001), unsettled_for, problems.messages)

    def _ready(self, observation: _Observation) -> list[Candidate] | None:
        """The list to hand out now ([] if nothing is servable), or None while files are settling."""
        if not observation.pending:
            return observation.candidates
        if observation.unsettled_for >= self._settle_timeout:
            return observation.settled
        return None

    def _not_found_message(self, observation: _Observation) -> str:
        if observation.pending:
            why = "everything found is still being written"
        else:
            why = "; ".join(observation.problems) or "no weights files found"
        return (f"no servable weights at {self._location}: {why} (expected a {'/'.join(WEIGHTS_SUFFIXES)} "
                f"file, a directory of numbered version directories, or a directory of weights files)")

    # -- scanning ---------------------------------------------------------------------------------

    def _scan(self, problems: _Problems) -> list[Candidate]:
        """All servable candidates at the location right now, best first, one per real path."""
        location = self._location
        if os.path.isdir(location):
            entries, by_mtime = self._directory_entries(location, problems)
        elif os.path.lexists(location):
            entries, by_mtime = [(location, location.name)], False
        else:
            problems.debug(f"{location} does not exist")
            entries, by_mtime = [], False
        found = [c for entry, hint in entries if (c := self._candidate(entry, hint, problems)) is not None]
        if by_mtime:
            found.sort(key=lambda c: (-c.fingerprint[3], c.version_hint))
        unique: dict[Path, Candidate] = {}
        for candidate in found:
            unique.setdefault(candidate.path, candidate)
        return list(unique.values())

    def _directory_entries(self, directory: Path, problems: _Problems) -> tuple[list[tuple[Path, str]], bool]:
        """(entry path, version hint) pairs per the directory rule, and whether to order them by mtime."""
        names = self._list_dir(directory, problems)
        versions = sorted(((int(n), n) for n in names
                           if _VERSION_NAME.fullmatch(n) and os.path.isdir(directory / n)), reverse=True)
        if not versions:
            return [(directory / n, n) for n in names if _is_weights_name(n)], True
        entries = []
        for _, name in versions:
            weights = self._version_file(directory / name, problems)
            if weights is not None:
                entries.append((weights, name))
        return entries, False

    def _version_file(self, version_dir: Path, problems: _Problems) -> Path | None:
        """The single weights file of a version directory (preferring model.*), or None."""
        names = [n for n in self._list_dir(version_dir, problems) if _is_weights_name(n)]
        chosen = names if len(names) <= 1 else [n for n in names if n.startswith("model.")]
        if len(chosen) == 1:
            return version_dir / chosen[0]
        if not names:
            problems.debug(f"version directory {version_dir} holds no weights file")
        else:
            problems.warn(f"version directory {version_dir} holds several weights files ({', '.join(names)}) "
                          f"and not exactly one named model.*; skipped")
        return None

    @staticmethod
    def _list_dir(directory: Path, problems: _Problems) -> list[str]:
        try:
            return sorted(os.listdir(directory))
        except OSError as exc:
            problems.os_error(directory, exc, "directory")
            return []

    @staticmethod
    def _candidate(entry: Path, hint: str, problems: _Problems) -> Candidate | None:
        """Resolve and stat one entry (and its sidecar); None, with the reason reported, if not servable."""
        try:
            real, st = _resolve(entry)
        except OSError as exc:
            problems.os_error(entry, exc)
            return None
        if not stat.S_ISREG(st.st_mode):
            problems.debug(f"{entry} is not a regular file; skipped")
            return None
        if st.st_size == 0:
            problems.debug(f"{entry} is empty; skipped")
            return None
        sidecar_fingerprint, digest = None, None
        sidecar = next((p for p in (Path(f"{entry}{_SIDECAR_SUFFIX}"), Path(f"{real}{_SIDECAR_SUFFIX}"))
                        if os.path.lexists(p)), None)
        if sidecar is not None:
            try:
                sidecar_fingerprint, digest = _read_sidecar(sidecar)
            except OSError as exc:
                problems.os_error(sidecar, exc, "sha256 sidecar")
                return None
            except ValueError as exc:
                problems.warn(str(exc))
                return None
        return Candidate(Path(real), hint, _stat_fingerprint(real, st) + (sidecar_fingerprint,), digest)

    # -- event watching (an accelerator only: the poll is the backstop) ---------------------------

    def _watch_targets(self) -> tuple[tuple[tuple[str, str, int, int], ...], bool]:
        """Directories to watch, with their identity (path, real path, device, inode), and recursiveness."""
        location = self._location
        if os.path.isdir(location):
            directories, recursive = [location], True
        else:
            directories, recursive = [location.parent, Path(os.path.realpath(location)).parent], False
        identities = []
        for directory in dict.fromkeys(directories):
            try:
                st = os.stat(directory)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                identities.append((str(directory), os.path.realpath(directory), st.st_dev, st.st_ino))
        return tuple(identities), recursive

    def _watch_loop(self) -> None:
        """Daemon thread: set `_wakeup` on every batch of filesystem events; re-arm when the targets move."""
        error_logged = False
        while not self._closed.is_set():
            try:
                targets = self._watch_targets()
                identities, recursive = targets
                if not identities:
                    self._closed.wait(self._poll_interval)
                    continue
                for changes in watchfiles.watch(
                        *(identity[0] for identity in identities), watch_filter=None,
                        debounce=_WATCH_DEBOUNCE_MS, step=_WATCH_STEP_MS, stop_event=self._closed,
                        rust_timeout=_WATCH_REARM_CHECK_MS, yield_on_timeout=True, recursive=recursive,
                        raise_interrupt=False, ignore_permission_denied=True):
                    self._watch_armed.set()
                    if changes:
                        self._wakeup.set()
                    if self._watch_targets() != targets:
                        logger.debug("watched directories for %s moved; re-arming", self._location)
                        self._wakeup.set()
                        break
            except Exception as exc:  # events are an optimisation: log, keep polling, retry later
                log = logger.debug if error_logged else logger.warning
                log("cannot watch %s for events (%s); relying on polling", self._location, exc)
                error_logged = True
                self._closed.wait(self._poll_interval)

    def _sleep(self, timeout: float, stop: threading.Event) -> None:
        """Wait up to `timeout`, returning early on an event batch, `stop`, or close()."""
        deadline = time.monotonic() + timeout
        while not (stop.is_set() or self._closed.is_set()):
            left = deadline - time.monotonic()
            if left <= 0 or self._wakeup.wait(min(left, _STOP_CHECK_S)):
                return
