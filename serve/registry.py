"""The registry holds the live model of one inference worker and swaps it (TF Serving's "manager").

Readers take ``registry.current`` once per batch: one attribute read, so a batch never mixes versions,
and a batch in flight finishes on the model it started with while the next batch sees the new one.
A watcher thread follows the weights source, verifies each new candidate with the loader, and swaps
only a model that passed every check; a rejected file is remembered by fingerprint and not retried
until it changes. The previous good model is kept for rollback. Each worker writes its status to a
small JSON file that the API servers read.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve import metrics
from serve.errors import WeightsError
from serve.loader import LoadedModel, LoadOptions, load_model
from serve.source import Candidate, WeightsSource

logger = logging.getLogger(__name__)


@dataclass
class ReloadOutcome:
    """The last reload attempt of a worker, as shown in the status routes."""

    at: float
    result: str  # "ok" | "failed" | "rollback"
    version: str | None = None
    error: str | None = None
    reason: str | None = None


class ModelRegistry:
    """Live and previous model of one worker, plus the thread that keeps the live one current."""

    def __init__(self, options: LoadOptions, source: WeightsSource, worker_id: int,
                 status_dir: Path | None = None) -> None:
        self.options = options
        self.source = source
        self.worker_id = worker_id
        self.status_dir = status_dir
        self.current: LoadedModel | None = None
        self.previous: LoadedModel | None = None
        self.last_reload: ReloadOutcome | None = None
        self._serving: Candidate | None = None
        self._seen: list[Candidate] = []
        self._rejected: dict[tuple, WeightsError] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- loading -------------------------------------------------------------------------------
    def load_initial(self) -> LoadedModel:
        """Serve the best valid candidate now; raises the best candidate's ``WeightsError`` if none is valid."""
        candidates = self.source.candidates()
        self._seen = candidates
        if not self._try_candidates(candidates, initial=True):
            raise self._rejected[candidates[0].fingerprint]
        assert self.current is not None
        return self.current

    def _try_candidates(self, candidates: list[Candidate], initial: bool = False) -> bool:
        """Load the best candidate that is not known bad; swap it in. True if something valid is served."""
        for candidate in candidates:
            if self._serving is not None and candidate.fingerprint == self._serving.fingerprint:
                return True  # already serving the best valid candidate
            if candidate.fingerprint in self._rejected:
                continue
            started = time.monotonic()
            try:
                loaded = load_model(candidate.path, self.options, candidate.expected_sha256)
            except WeightsError as exc:
                self._rejected[candidate.fingerprint] = exc
                self._record(ReloadOutcome(time.time(), "failed", None, exc.message, exc.reason))
                metrics.RELOADS.labels(result="failed", reason=exc.reason).inc()
                logger.warning("worker %d rejected %s: %s", self.worker_id, candidate.path, exc.message)
                continue
            if self.current is not None and loaded.sha256 == self.current.sha256:
                self._serving = candidate  # same bytes under a new name or inode: nothing to swap
                return True
            self._swap(loaded, candidate)
            metrics.RELOAD_SECONDS.observe(time.monotonic() - started)
            metrics.RELOADS.labels(result="ok", reason="").inc()
            logger.info("worker %d now serves version %s from %s%s", self.worker_id, loaded.version,
                        candidate.path, " (startup)" if initial else "")
            return True
        return self.current is not None

    def _swap(self, loaded: LoadedModel, candidate: Candidate | None) -> None:
        with self._lock:
            if self.current is not None:
                self.previous = self.current
            self.current = loaded  # the swap: batches read this attribute once
            self._serving = candidate
        self._record(ReloadOutcome(time.time(), "ok", loaded.version))
        metrics.set_live_version(loaded.version, self.worker_id)

    def rollback(self) -> bool:
        """Serve the previous good version again (until the weights change). False if there is none."""
        with self._lock:
            if self.previous is None:
                return False
            self.current, self.previous = self.previous, self.current
            version = self.current.version
        self._record(ReloadOutcome(time.time(), "rollback", version))
        metrics.set_live_version(version, self.worker_id)
        logger.info("worker %d rolled back to version %s", self.worker_id, version)
        return True

    # -- watching ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the watcher thread (daemon)."""
        self._thread = threading.Thread(target=self._watch, name=f"weights-watcher-{self.worker_id}", daemon=True)
        self._thread.start()

    def rescan(self) -> None:
        """Look at the source now (admin reload, SIGHUP): known-bad files get one more try."""
        self._rejected.clear()
        self._serving = None
        self._wake.set()

    def stop(self) -> None:
        """Stop the watcher thread and the source."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.source.close()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                changed = self.source.wait_for_change(self._seen, self._wake)
                if self._stop.is_set():
                    return
                if changed is None:  # woken up: a rescan was asked for
                    self._wake.clear()
                    changed = self.source.candidates()
                self._seen = changed
                self._try_candidates(changed)
            except Exception as exc:  # a vanished directory, a race: log, keep serving, keep watching
                logger.warning("worker %d: weights watcher: %s", self.worker_id, exc)
                self._stop.wait(self.source.poll_interval)

    # -- status --------------------------------------------------------------------------------
    def _record(self, outcome: ReloadOutcome) -> None:
        self.last_reload = outcome
        if outcome.result == "ok":
            metrics.LAST_RELOAD.set(outcome.at)
        self.write_status()

    def status(self) -> dict[str, Any]:
        """This worker's view: live and previous version, the file, and the last reload."""
        current, previous = self.current, self.previous
        return {
            "worker": self.worker_id,
            "pid": os.getpid(),
            "version": current.version if current else None,
            "path": str(current.path) if current else None,
            "loaded_at": current.loaded_at if current else None,
            "previous_version": previous.version if previous else None,
            "last_reload": asdict(self.last_reload) if self.last_reload else None,
        }

    def write_status(self) -> None:
        """Atomically write ``worker-<id>.json`` in the status folder (if there is one)."""
        if self.status_dir is None:
            return
        target = self.status_dir / f"worker-{self.worker_id}.json"
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.status()))
        os.replace(tmp, target)


def read_worker_statuses(status_dir: Path) -> list[dict[str, Any]]:
    """All workers' status files, ordered by worker id (used by the API servers)."""
    statuses = []
    for path in sorted(status_dir.glob("worker-*.json")):
        try:
            statuses.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(statuses, key=lambda s: s.get("worker", 0))
