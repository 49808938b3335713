"""The supervisor's heartbeat: finds an API server that is alive but hung, and kills it.

A SIGSTOPped API server, or one whose event loop is blocked, does not exit, so the process sentinels
the supervisor waits on say nothing; it keeps its HTTP keep-alive connections and the requests on
them would wait forever, while the kernel gives new connections to the other API servers and the
probes stay green. So the control hub sends every API server ``{"t": "ping", "n": k}`` every
``SIMPLENN_HANG_TIMEOUT_S / 3`` seconds (at least 1 s), and the API server answers
``{"t": "pong", "n": k}`` from its event loop (:class:`serve.status.ServerView`): a blocked loop does
not answer. An API server that leaves a ping unanswered for the hang timeout is SIGKILLed; its
connections close, so the requests on them fail at once (connection errors, safe to retry), and the
supervisor replaces it as it replaces any dead child. It is killed about the hang timeout after its
loop stopped, at most the hang timeout plus two intervals. Idle cost: one small message each way per
interval and API server, on the hub's thread and timers (no thread, no poll of its own).

Inference workers are not pinged. A worker's control channel is read by a thread of its own that also
loads new versions (for up to ``SIMPLENN_WORKER_START_TIMEOUT_S``, longer than the hang timeout by
default), so its answer would say nothing about the batching loop, and a long load would look like a
hang. Whether the batching loop answers is judged where it matters, by each API server's watchdog
(:mod:`serve.transport`): a worker that holds requests for the hang timeout without answering is
killed and its requests get 503. A worker that hangs while idle costs nothing until a request reaches
it; that request then gets its 503 after the hang timeout and the worker is replaced.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from serve.control import Hub, Peer

logger = logging.getLogger(__name__)
MIN_INTERVAL_S = 1.0  # never ping more often than this, however short the hang timeout


def ping_interval(hang_timeout: float) -> float:
    """Seconds between two pings to an API server: a third of the hang timeout, at least 1 s."""
    return max(MIN_INTERVAL_S, hang_timeout / 3)


@dataclass
class Pulse:
    """One API server's pings: how many were sent, and those not answered yet (number, when sent)."""

    sent: int = 0
    unanswered: deque[tuple[int, float]] = field(default_factory=deque)
    killed: bool = False

    def ping(self, now: float) -> int:
        """Record a ping sent at ``now``; returns its number."""
        self.sent += 1
        self.unanswered.append((self.sent, now))
        return self.sent

    def pong(self, number: int) -> None:
        """Ping ``number`` was answered, and so were those before it (one connection keeps the order)."""
        while self.unanswered and self.unanswered[0][0] <= number:
            self.unanswered.popleft()

    def silent_for(self, now: float) -> float:
        """How long the oldest unanswered ping has waited at ``now`` (0 when every ping was answered)."""
        return now - self.unanswered[0][1] if self.unanswered else 0.0


class Heartbeat:
    """Pings the API servers from the control hub's thread and kills one that stops answering."""

    def __init__(self, peers: Callable[[], Iterable[Peer]], kill: Callable[[Peer], None],
                 hang_timeout: float) -> None:
        """``peers()``: the connected API servers now; ``kill(peer)``: SIGKILL that child."""
        self.peers, self.kill, self.hang_timeout = peers, kill, hang_timeout
        self.interval = ping_interval(hang_timeout)
        self.pulses: dict[Peer, Pulse] = {}
        self._hub: Hub | None = None

    def start(self, hub: Hub) -> None:
        """Ping every ``interval`` seconds on ``hub``'s thread, from now on."""
        self._hub = hub
        hub.call_soon(self._beat)

    def _beat(self) -> None:
        self.tick(time.monotonic())
        assert self._hub is not None
        self._hub.call_later(self.interval, self._beat)

    def tick(self, now: float) -> None:
        """One round: kill each API server that left a ping unanswered for the hang timeout, ping the others."""
        self.pulses = {peer: self.pulses.get(peer) or Pulse() for peer in self.peers()}
        for peer, pulse in self.pulses.items():
            if pulse.killed:
                continue
            silent = pulse.silent_for(now)
            if silent >= self.hang_timeout:
                pulse.killed = True
                logger.error("API server %d (pid %d) did not answer a ping for %.1f s (hang timeout %g s): it is "
                             "hung; killing it", peer.id, peer.pid, silent, self.hang_timeout)
                self.kill(peer)
            else:
                peer.send({"t": "ping", "n": pulse.ping(now)})

    def pong(self, peer: Peer, number: int) -> None:
        """``peer`` answered ping ``number``."""
        pulse = self.pulses.get(peer)
        if pulse is not None:
            pulse.pong(number)
