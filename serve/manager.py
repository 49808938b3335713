"""The one decider of which version the server serves (TF Serving's ``AspiredVersionsManager`` with
its availability-preserving policy), in the supervisor.

The weights source proposes candidates (:class:`SourceFollower`); the manager pins the best one
(:mod:`serve.versions`) and asks every worker to ``load`` it (verify and keep it aside). Only when
every worker has loaded it does the manager tell them all to ``serve`` it: one switch, within
milliseconds across workers, and a file that any worker rejects is never served anywhere. The
previous version stays pinned for rollback. A replacement worker says ``hello`` and is told to serve
the current version, so a rollback holds across restarts. Every change is pushed to the API servers.
Runs on the control hub's thread only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from serve import metrics
from serve.control import Hub, Peer
from serve.errors import WeightsError, WeightsNotFoundError
from serve.heartbeat import Heartbeat
from serve.source import Candidate, WeightsSource
from serve.versions import Version, VersionStore

logger = logging.getLogger(__name__)


class StartupGate:
    """Set once every worker serves the first version, or with the reason none could be served."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: str | None = None

    def fail(self, error: str) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()


class Fleet:
    """The children on the control channel, what each worker serves, and the state the API servers show."""

    def __init__(self) -> None:
        self.workers: dict[int, Peer] = {}
        self.apis: dict[int, Peer] = {}
        self.served_pids: set[int] = set()  # children that have served (read by the supervisor's thread)
        self.last_reload: dict[str, Any] | None = None
        self.draining = False
        self.versions: tuple[str | None, str | None, str | None] = (None, None, None)  # served, previous, origin
        self.in_features: int | None = None  # the model's input width, as the first worker reports it

    def join(self, peer: Peer) -> None:
        (self.apis if peer.role == "api" else self.workers)[peer.id] = peer
        if peer.role == "api":
            self.served_pids.add(peer.pid)
            peer.send(self.state())

    def leave(self, peer: Peer) -> bool:
        """Forget a closed child; True if it was the current one of its id."""
        group = self.apis if peer.role == "api" else self.workers
        if group.get(peer.id) is peer:
            del group[peer.id]
            return True
        return False

    def serving(self, peer: Peer, version: str, loaded_at: float | None) -> None:
        peer.info.update(version=version, loaded_at=loaded_at)
        self.served_pids.add(peer.pid)

    def count_serving(self, version: str) -> int:
        return sum(1 for p in self.workers.values() if p.info.get("version") == version)

    def tell_workers(self, message: dict[str, Any]) -> None:
        for peer in self.workers.values():
            peer.send(message)

    @staticmethod
    def kill(peer: Peer | None) -> None:
        """SIGKILL a child (its replacement then starts over)."""
        if peer is not None:
            try:
                os.kill(peer.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def record(self, result: str, version: str | None, error: str | None = None, reason: str | None = None) -> None:
        self.last_reload = {"at": time.time(), "result": result, "version": version, "error": error,
                            "reason": reason}
        if result == "ok":
            metrics.LAST_RELOAD.set(self.last_reload["at"])
        self.publish()

    def state(self) -> dict[str, Any]:
        """The server's state as the API servers show it."""
        workers = [{"worker": p.id, "pid": p.pid, "version": p.info.get("version"),
                    "loaded_at": p.info.get("loaded_at")} for p in sorted(self.workers.values(), key=lambda p: p.id)]
        served, previous, origin = self.versions
        return {"t": "state", "draining": self.draining, "version": served, "previous_version": previous,
                "path": origin, "versions": sorted({w["version"] for w in workers if w["version"]}),
                "workers": workers, "last_reload": self.last_reload}

    def set_versions(self, served: Version, previous: Version | None) -> None:
        """What the API servers show as served and previous (pushed with the next :meth:`publish`)."""
        self.versions = (served.id, previous.id if previous else None, served.origin)

    def set_draining(self) -> None:
        """Readiness turns 503 on every API server."""
        self.draining = True
        self.publish()

    def publish(self) -> None:
        """Push the state to every API server."""
        state = self.state()
        for peer in self.apis.values():
            peer.send(state)


class Picker:
    """Which candidate to offer next: the best one that is not known bad, pinned (TF Serving's source
    adapter). Files that failed (here or in a worker) are remembered by fingerprint until a rescan."""

    def __init__(self, store: VersionStore, fleet: Fleet) -> None:
        self.store, self.fleet = store, fleet
        self.known_bad: dict[tuple, str] = {}  # fingerprint -> why it was rejected
        self.seen: list[Candidate] = []

    def pick(self, served: Version | None) -> Version | None:
        """The best candidate, pinned (possibly ``served``'s bytes under a new name), or None when ``served`` is
        still the best or nothing is servable."""
        for candidate in self.seen:
            if candidate.fingerprint in self.known_bad:
                continue
            if served is not None and candidate.fingerprint == served.fingerprint:
                return None
            try:
                version = self.store.pin(candidate)
            except WeightsError as exc:
                self.reject(candidate.fingerprint, exc.message, exc.reason)
                continue
            return version
        return None

    def first_error(self) -> str:
        """Why the best candidate cannot be served (for a startup that found nothing servable)."""
        first = self.seen[0].fingerprint if self.seen else None
        return self.known_bad.get(first, "no servable weights")

    def reject(self, fingerprint: tuple, error: str, reason: str) -> None:
        self.known_bad[fingerprint] = error
        metrics.RELOADS.labels(result="failed", reason=reason).inc()
        logger.warning("rejected: %s", error)
        self.fleet.record("failed", None, error, reason)


@dataclasses.dataclass(eq=False)
class Rollout:
    """A version on its way to every worker (two-phase): the workers that still have to load it, and those
    that have. It is served when every worker still there has loaded it."""

    version: Version
    waiting: set[int]
    loaded_by: set[int] = dataclasses.field(default_factory=set)

    def loaded(self, worker: int) -> None:
        self.waiting.discard(worker)
        self.loaded_by.add(worker)

    def complete(self) -> bool:
        """No worker is left to answer, and at least one loaded it."""
        return not self.waiting and bool(self.loaded_by)


class VersionSwitch:
    """Which version is served, which came before, and which is being rolled out, and the moves between them:
    a rollout (two-phase: every worker loads the version, then all serve it; a worker that does not load it
    within the load timeout is replaced), its commit, and the rollback. What to roll out, and when, is decided
    by :class:`VersionManager` (:meth:`reconsider`, called again after every commit)."""

    def __init__(self, store: VersionStore, load_timeout: float) -> None:
        self.store, self.load_timeout = store, load_timeout
        self.fleet = Fleet()
        self.hub: Hub | None = None  # the loop that runs the load timeout (set once the hub exists)
        self.served: Version | None = None
        self.previous: Version | None = None
        self.rollout: Rollout | None = None

    def reconsider(self) -> None:
        """Roll out what should be served next, if anything (:class:`VersionManager` decides)."""

    def _start_rollout(self, version: Version) -> None:
        """Tell every worker to load ``version`` (to serve it at once if nothing is served yet: the first
        version has nothing to keep serving meanwhile); the load timeout runs for a later one."""
        self.rollout = rollout = Rollout(version, set(self.fleet.workers))
        self.fleet.tell_workers(version.command("serve" if self.served is None else "load"))
        if self.served is not None and self.hub is not None:
            self.hub.call_later(self.load_timeout, lambda: self._load_timed_out(rollout))

    def _load_timed_out(self, rollout: Rollout) -> None:
        if self.rollout is not rollout:
            return
        for worker in list(rollout.waiting):
            logger.error("worker %d did not load version %s within %.0f s; replacing it", worker,
                         rollout.version.id, self.load_timeout)
            self.fleet.kill(self.fleet.workers.get(worker))
        rollout.waiting.clear()
        self._maybe_commit()

    def _maybe_commit(self) -> None:
        if self.rollout is not None and self.served is not None and self.rollout.complete():
            self._commit(broadcast=True)

    def _commit(self, broadcast: bool) -> None:
        assert self.rollout is not None
        self.previous = self.served or self.previous
        self.served, self.rollout = self.rollout.version, None
        self.fleet.set_versions(self.served, self.previous)
        metrics.RELOADS.labels(result="ok", reason="").inc()
        logger.info("serving version %s from %s", self.served.id, self.served.origin)
        if broadcast:
            self.fleet.tell_workers(self.served.command("serve"))
        self.fleet.record("ok", self.served.id)
        self.store.keep_only(self.served, self.previous)
        self.reconsider()

    def rollback(self) -> bool:
        """Serve the previous version again, on every worker, until the weights change."""
        if self.previous is None or self.rollout is not None:
            return False
        self.served, self.previous = self.previous, self.served
        self.fleet.set_versions(self.served, self.previous)
        self.fleet.tell_workers(self.served.command("serve"))
        self.fleet.record("rollback", self.served.id)
        logger.info("rolled back to version %s", self.served.id)
        return True


class VersionManager(VersionSwitch):
    """The one decider (the hub's handler, through :class:`ControlRouter`): what the workers say, and which
    candidate to roll out. Which version is served, and the rollouts themselves: :class:`VersionSwitch`."""

    def __init__(self, store: VersionStore, workers: int, load_timeout: float) -> None:
        super().__init__(store, load_timeout)
        self.expected_workers = workers
        self.picker = Picker(store, self.fleet)
        self.startup = StartupGate()
        self.rescan_requested = threading.Event()
        self.wake_source: Callable[[], None] = lambda: None  # the source's interrupt(): rescan at once

    # -- what the workers say (through ControlRouter) -------------------------------------------
    def worker_joined(self, peer: Peer) -> None:
        """A (new or replacement) worker asks what to serve: the version its peers serve."""
        if self.served is not None:
            peer.send(self.served.command("serve"))
        if self.rollout is not None:
            peer.send(self.rollout.version.command("serve" if self.served is None else "load"))
            self.rollout.waiting.add(peer.id)

    def worker_left(self, peer: Peer) -> None:
        if self.rollout is not None:
            self.rollout.waiting.discard(peer.id)
            self._maybe_commit()

    def loaded(self, peer: Peer, version: str) -> None:
        if self.rollout is not None and version == self.rollout.version.id:
            self.rollout.loaded(peer.id)
            self._maybe_commit()

    def serving(self, peer: Peer, version: str) -> None:
        if self.served is None and self.rollout is not None and version == self.rollout.version.id:
            self._commit(broadcast=False)
        if self.served is not None and self.fleet.count_serving(self.served.id) >= self.expected_workers:
            self.startup.event.set()

    def rejected(self, peer: Peer, version: str | None, error: str, reason: str) -> None:
        if version is None:  # the worker cannot serve at all (no such device, no such model class)
            self.startup.fail(error)
            logger.error("worker %d: %s", peer.id, error)
        elif self.rollout is not None and version == self.rollout.version.id:
            fingerprint, self.rollout = self.rollout.version.fingerprint, None
            self.picker.reject(fingerprint, error, reason)
            self.reconsider()
        elif self.served is not None and version == self.served.id:
            logger.error("worker %d cannot serve version %s that its peers serve (%s); replacing it",
                         peer.id, version, error)
            self.fleet.kill(peer)

    # -- decisions ------------------------------------------------------------------------------
    def on_candidates(self, candidates: list[Candidate]) -> None:
        """The source's current candidates, best first: serve the best one that is not known bad."""
        self.picker.seen = candidates
        self.reconsider()

    def reconsider(self) -> None:
        """Roll out the best candidate if it is not what is served (decided again after each rollout)."""
        if self.rollout is not None:
            return
        version = self.picker.pick(self.served)
        if version is None:
            if self.served is None:
                self.startup.fail(self.picker.first_error())
        elif self.served is not None and version.sha256 == self.served.sha256:  # the same bytes, renamed:
            self.served = dataclasses.replace(self.served, fingerprint=version.fingerprint)  # not read again
        else:
            self._start_rollout(version)

    def rescan(self) -> None:
        """Look at the weights now (admin reload, SIGHUP): files known to be bad get one more try."""
        self.picker.known_bad.clear()
        self.rescan_requested.set()
        self.wake_source()


class ControlRouter:
    """The control hub's handler: keeps the fleet's records and passes what matters to the manager (and
    the API servers' pongs to the heartbeat)."""

    def __init__(self, manager: VersionManager, heartbeat: Heartbeat | None = None) -> None:
        self.manager, self.fleet, self.heartbeat = manager, manager.fleet, heartbeat

    def on_hello(self, peer: Peer) -> None:
        self.fleet.join(peer)
        if peer.role == "worker":
            self.manager.worker_joined(peer)
            self.fleet.publish()

    def on_closed(self, peer: Peer) -> None:
        if self.fleet.leave(peer) and peer.role == "worker":
            self.manager.worker_left(peer)
            self.fleet.publish()

    def on_message(self, peer: Peer, message: dict[str, Any]) -> None:
        kind, version = message.get("t"), message.get("version")
        if kind == "pong":
            if self.heartbeat is not None:
                self.heartbeat.pong(peer, int(message["n"]))
        elif kind == "rescan":
            self.manager.rescan()
        elif kind == "rollback":
            self.manager.rollback()
        elif kind == "model":
            self.fleet.in_features = int(message["in_features"])
        elif kind == "loaded":
            self.manager.loaded(peer, str(version))
        elif kind == "serving":
            self.fleet.serving(peer, str(version), message.get("loaded_at"))
            self.manager.serving(peer, str(version))
            self.fleet.publish()
        elif kind == "rejected":
            self.manager.rejected(peer, version, str(message.get("error")), str(message.get("reason")))


class SourceFollower:
    """The weights source's thread: hands every change of the candidates to the manager."""

    def __init__(self, source: WeightsSource, manager: VersionManager, hub: Hub) -> None:
        self.source, self.manager, self.hub = source, manager, hub
        manager.wake_source = source.interrupt

    def start(self, initial: list[Candidate]) -> None:
        threading.Thread(target=self._follow, args=(initial,), name="weights-source", daemon=True).start()

    def _follow(self, seen: list[Candidate]) -> None:
        wake = self.manager.rescan_requested
        while True:
            try:
                changed = self.source.wait_for_change(seen, wake)
                if changed is None:  # a rescan was asked for
                    wake.clear()
                    changed = self.source.candidates()
            except WeightsNotFoundError as exc:
                logger.warning("weights rescan: %s", exc.message)
                continue
            except Exception as exc:  # a vanished directory, a race: log, keep serving, keep watching
                logger.warning("weights source: %s", exc)
                time.sleep(self.source.poll_interval)
                continue
            seen = changed
            self.hub.call_soon(lambda found=changed: self.manager.on_candidates(found))
