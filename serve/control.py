"""The control plane: one framed JSON connection between the supervisor and each of its children.

The supervisor (main process) listens on ``<state>/control.sock``; every inference worker and API
server connects once and says ``hello``. Through that one channel the manager tells workers what to
load and serve and tells API servers the server's state; workers report what they loaded or
rejected, API servers pass on admin commands. A child's death closes its connection, which the
supervisor sees at once. Messages (``t`` is the type):

* worker -> supervisor: ``hello`` {role, id}, ``loaded`` / ``serving`` {version}, ``rejected`` {version,
  error, reason}
* supervisor -> worker: ``load`` (verify and keep aside) / ``serve`` (load if needed, then serve) with
  {version, sha256, path, origin}
* API server -> supervisor: ``hello`` {role, id}, ``rescan``, ``rollback``, ``pong`` {n}
* supervisor -> API server: ``state`` {the snapshot shown by the status routes, plus ``draining``},
  ``ping`` {n}: every ``SIMPLENN_HANG_TIMEOUT_S / 3`` s (at least 1 s), answered by ``pong`` with the
  same ``n`` from the API server's event loop; one that leaves a ping unanswered for the hang timeout
  is killed (:mod:`serve.heartbeat`). Workers are not pinged.

:class:`Hub` is the supervisor's side: one thread, one ``selectors`` loop, no polling.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from serve.channel import ChannelClosed, Connection, WakePipe, accept, frame, listen

logger = logging.getLogger(__name__)


def encode(message: dict[str, Any]) -> bytes:
    """One control message as a frame."""
    return frame(orjson.dumps(message))


def decode(body: bytes) -> dict[str, Any]:
    """One frame's control message."""
    return orjson.loads(body)


@dataclass(eq=False)
class Peer:
    """A connected child: its role (``worker`` or ``api``), its id, and its pid as the kernel reports it."""

    conn: Connection
    role: str = ""
    id: int = -1
    pid: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def send(self, message: dict[str, Any]) -> None:
        """Send one message; a peer that is gone is noticed by the hub through its EOF."""
        try:
            self.conn.send(encode(message))
        except ChannelClosed:
            pass


class Handler(Protocol):
    def on_hello(self, peer: Peer) -> None: ...
    def on_message(self, peer: Peer, message: dict[str, Any]) -> None: ...
    def on_closed(self, peer: Peer) -> None: ...


class Schedule:
    """What a loop thread runs besides its I/O: calls queued from any thread, each of which wakes the loop (the
    loop watches :attr:`wake`), and timers set on the loop's thread, earliest first."""

    def __init__(self) -> None:
        self.wake = WakePipe()
        self._calls: list[Callable[[], None]] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` and wake the loop (thread-safe)."""
        with self._lock:
            self._calls.append(fn)
        self.wake.poke()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Have ``fn`` run ``delay`` seconds from now (call from the loop's thread)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._order), fn))

    def timeout(self) -> float | None:
        """How long the loop may block: until the next timer is due (None: there is no timer)."""
        return max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None

    def woken(self) -> None:
        """The loop woke for queued calls: read the wake-up bytes (they are run by :meth:`run_due`)."""
        self.wake.drain()

    def run_due(self, run: Callable[[Callable[[], None]], None]) -> None:
        """Pass every timer that is due to ``run`` (one that a timer sets and is due already too), then every
        queued call."""
        while self._timers and self._timers[0][0] <= time.monotonic():
            run(heapq.heappop(self._timers)[2])
        with self._lock:
            calls, self._calls = self._calls, []
        for call in calls:
            run(call)

    def close(self) -> None:
        """Close the wake-up pipe."""
        self.wake.close()


class Hub:
    """The supervisor's control loop: accepts children, reads their messages, runs timers and calls (its
    :class:`Schedule`)."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.listener = listen(path)
        self.handler = handler
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ, None)
        self._schedule = Schedule()
        self._selector.register(self._schedule.wake, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="control-hub", daemon=True)
        os.register_at_fork(after_in_child=self._close_in_child)

    def start(self) -> None:
        self._thread.start()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the hub's thread (thread-safe)."""
        self._schedule.call_soon(fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the hub's thread after ``delay`` seconds (call from the hub's thread)."""
        self._schedule.call_later(delay, fn)

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select(self._schedule.timeout()):
                try:
                    self._ready(key)
                except Exception:
                    logger.exception("control hub")
            self._schedule.run_due(self._guarded)

    @staticmethod
    def _guarded(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            logger.exception("control hub")

    def _ready(self, key: selectors.SelectorKey) -> None:
        if key.fileobj is self._schedule.wake:
            self._schedule.woken()
        elif key.fileobj is self.listener:
            conn = accept(self.listener)
            if conn is not None:
                self._selector.register(conn.sock, selectors.EVENT_READ, Peer(conn))
        else:
            self._readable(key.data)

    def _readable(self, peer: Peer) -> None:
        try:
            messages = [decode(body) for body in peer.conn.frames()]
        except (ChannelClosed, ValueError):
            self._selector.unregister(peer.conn.sock)
            peer.conn.close()
            if peer.role:
                self.handler.on_closed(peer)
            return
        for message in messages:
            if message.get("t") == "hello" and not peer.role:
                peer.role, peer.id, peer.pid = str(message["role"]), int(message["id"]), peer.conn.peer_pid()
                self.handler.on_hello(peer)
            elif peer.role:
                self.handler.on_message(peer, message)

    def _close_in_child(self) -> None:
        """A forked API server must not hold the supervisor's sockets (they would outlive it)."""
        for key in list(self._selector.get_map().values()):
            try:
                key.fileobj.close()  # type: ignore[union-attr]
            except OSError:
                pass
        self._schedule.close()


class ControlClient:
    """A child's end of the control channel (blocking use, from one thread)."""

    def __init__(self, path: Path, role: str, ident: int) -> None:
        self.conn = Connection(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        self.conn.sock.setblocking(True)
        self.conn.sock.connect(os.fspath(path))
        self.conn.sock.setblocking(False)
        self._pending: list[dict[str, Any]] = []
        self.send({"t": "hello", "role": role, "id": ident})

    def fileno(self) -> int:
        return self.conn.fileno()

    def send(self, message: dict[str, Any]) -> None:
        """Send one message (waits while the socket is full: control messages are small and rare)."""
        self.conn.send(encode(message))
        while not self.conn.flush():
            selectors.select.select([], [self.conn.sock], [], 1.0)

    def receive(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message, waiting up to ``timeout`` (None: forever); ``ChannelClosed`` when the
        supervisor is gone."""
        while not self._pending:
            if not selectors.select.select([self.conn.sock], [], [], timeout)[0]:
                return None
            self._pending.extend(decode(body) for body in self.conn.frames())
        return self._pending.pop(0)

    def received(self) -> list[dict[str, Any]]:
        """Every message that has arrived, without waiting (for event loops)."""
        messages = self._pending + [decode(body) for body in self.conn.frames()]
        self._pending = []
        return messages
