"""The supervisor: the main process's side of the process model (TorchServe's frontend, Triton's stub
monitor). It owns the control hub and the version manager, starts the weights source, and keeps every
child alive: an inference worker or API server that exits is replaced at once (with a growing delay
while replacements keep dying young), event-driven, by waiting on the processes' sentinels from the
main thread, which is also the only thread that forks. An API server that is alive but hung (stopped,
or its event loop blocked) is SIGKILLed by the heartbeat (:mod:`serve.heartbeat`), and so replaced
too. It stops replacing children once the server drains. How a child is started is LitServe's
business (:mod:`serve.litserve_adapter` passes the two starters in).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from multiprocessing import connection
from typing import Any

from serve import metrics
from serve.channel import WakePipe
from serve.control import Hub
from serve.errors import WeightsNotFoundError
from serve.heartbeat import Heartbeat
from serve.manager import ControlRouter, Fleet, SourceFollower, VersionManager
from serve.settings import Settings
from serve.source import WeightsSource
from serve.transport import Layout
from serve.versions import VersionStore

logger = logging.getLogger(__name__)
_YOUNG_S = 30.0  # a child that dies this young without having served counts towards the restart back-off
_MAX_BACKOFF_S = 10.0


class StartupError(Exception):
    """The server could not start (bad weights, bad model class, no device); one line of reason."""


class Children:
    """One kind of child (workers or API servers): the processes by index, and how to replace one."""

    def __init__(self, kind: str, start: Callable[[int], Any], processes: list[Any] | dict[int, Any],
                 became_healthy: Callable[[Any], bool]) -> None:
        self.kind, self.start, self.processes, self.became_healthy = kind, start, processes, became_healthy
        self.started_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.due: dict[int, float] = {}  # index -> when to replace it

    def indexes(self) -> range:
        return range(len(self.processes))

    def died(self, index: int) -> None:
        old = self.processes[index]
        old.join(1)  # the sentinel fires as its files close, a moment before it can be reaped
        failed = not self.became_healthy(old) and time.monotonic() - self.started_at.get(index, 0.0) < _YOUNG_S
        self.failures[index] = self.failures.get(index, 0) + 1 if failed else 0
        delay = min(_MAX_BACKOFF_S, 0.5 * 2 ** (self.failures[index] - 2)) if self.failures[index] > 1 else 0.0
        logger.error("%s %d (pid %s) exited with %s; replacing it%s", self.kind, index, old.pid, old.exitcode,
                     f" in {delay:.1f} s" if delay else "")
        metrics.mark_process_dead(old.pid)
        self.due[index] = time.monotonic() + delay

    def replace_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self.due.items()):
            if when <= now:
                del self.due[index]
                self.processes[index] = self.start(index)
                self.started_at[index] = time.monotonic()


class ChildWatch:
    """The main thread's watch over every group of children: it waits on their processes' sentinels, tells a
    group which of its children died and starts the replacements that are due, until :meth:`stop`."""

    def __init__(self) -> None:
        self.groups: list[Children] = []
        self._stopping = threading.Event()
        self._wake = WakePipe()

    def run(self) -> None:
        """Watch (event-driven: sentinels, the next replacement's due time, a stop) until :meth:`stop`."""
        while not self._stopping.is_set():
            watched = {group.processes[i].sentinel: (group, i) for group in self.groups for i in group.indexes()
                       if i not in group.due}
            due = [when for group in self.groups for when in group.due.values()]
            delay = max(0.0, min(due) - time.monotonic()) if due else None
            for ready in connection.wait([*watched, self._wake], delay):
                if ready is self._wake:
                    self._wake.drain()
                elif not self._stopping.is_set():
                    group, index = watched[ready]
                    group.died(index)
            if not self._stopping.is_set():
                for group in self.groups:
                    group.replace_due()

    def stop(self) -> None:
        """End :meth:`run` at once (any thread); no child is replaced from then on."""
        self._stopping.set()
        self._wake.poke()

    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping.is_set()


class Supervisor:
    """Control plane and process supervision of one server (LitServe's ``_shutdown_event`` slot)."""

    def __init__(self, settings: Settings, layout: Layout) -> None:
        self.settings, self.layout = settings, layout
        self.manager = VersionManager(VersionStore(layout.folder.parent / "versions", settings.max_weights_bytes),
                                      settings.workers, settings.worker_start_timeout_s)
        self.hub: Hub | None = None
        self.draining = False
        self.children = ChildWatch()

    def start_control(self) -> None:
        """Before any child starts: list the weights (``StartupError`` if none), open the channels."""
        source = WeightsSource(self.settings.weights, poll_interval=self.settings.poll_interval_s,
                               debounce=self.settings.reload_debounce_s, use_events=self.settings.watch_events)
        try:
            candidates = source.candidates()
        except WeightsNotFoundError as exc:
            source.close()
            raise StartupError(exc.message) from None
        self.layout.listen()
        heartbeat = Heartbeat(self.manager.fleet.apis.values, Fleet.kill, self.settings.hang_timeout_s)
        self.hub = self.manager.hub = Hub(self.layout.control, ControlRouter(self.manager, heartbeat))
        self.hub.start()
        heartbeat.start(self.hub)
        self.hub.call_soon(lambda: self.manager.on_candidates(candidates))
        SourceFollower(source, self.manager, self.hub).start(candidates)

    def wait_started(self, workers: list[Any]) -> None:
        """Block until every worker serves the first version; ``StartupError`` with the reason if not."""
        gate = self.manager.startup
        while not gate.event.wait(0.2):
            if any(not w.is_alive() for w in workers) and not gate.event.is_set():
                gate.fail(gate.error or "an inference worker failed to start")
        if gate.error is not None:
            for worker in workers:
                worker.kill()
            raise StartupError(gate.error)

    def supervise(self, kind: str, start: Callable[[int], Any], processes: list[Any] | dict[int, Any]) -> None:
        """Keep the children in ``processes`` (replaced in place) alive with ``start(index)``; a child that
        dies before it ever served (a crash loop) is replaced after a growing delay."""
        group = Children(kind, start, processes, lambda process: process.pid in self.manager.fleet.served_pids)
        now = time.monotonic()
        group.started_at = {i: now for i in group.indexes()}
        self.children.groups.append(group)

    # -- LitServe's `_shutdown_event` interface: the main thread supervises inside wait() ----------
    def wait(self, timeout: float | None = None) -> bool:
        """Supervise the children until :meth:`set` (LitServe's main thread waits here, with no ``timeout``)."""
        self.children.run()
        return True

    def set(self) -> None:
        """Stop supervising; LitServe then shuts every child down."""
        self.children.stop()

    def is_set(self) -> bool:
        return self.children.stopped()

    def rescan(self) -> None:
        """Re-scan the weights (SIGHUP)."""
        if self.hub is not None:
            self.hub.call_soon(self.manager.rescan)

    def drain(self) -> None:
        """Readiness turns 503 everywhere; replacements stop; after ``drain_s`` the server stops."""
        if self.hub is not None:
            self.hub.call_soon(self.manager.fleet.set_draining)
        timer = threading.Timer(self.settings.drain_s, self.set)
        timer.daemon = True
        timer.start()
