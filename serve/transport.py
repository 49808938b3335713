"""How rows travel from an API server to an inference worker and back (the data plane).

Design: **one UNIX stream connection per (API server, worker) pair**, as TorchServe's frontend holds one
socket per backend worker. Each API server listens on ``<state>/sockets/api-<i>.sock`` (the supervisor
creates the listening sockets before anything starts and keeps them, so a replaced API server
inherits its socket and a worker's reconnect waits in the backlog); each worker connects to every
API server once it serves a model. Why this and not a shared pipe or ``SOCK_SEQPACKET`` socket:

* nothing is shared by several writers or readers, so there is no cross-process lock for a dead
  process to keep and no stream whose framing a crash can tear for anyone but its own peer;
* the API server chooses the worker, so every request is owned by exactly one worker: when a worker
  dies its connections close and exactly its requests fail, at once, with 503 ``WorkerLost``;
* a worker that holds requests for ``SIMPLENN_HANG_TIMEOUT_S`` without answering any is killed
  (SIGKILL to the pid the kernel reports for the connection): its EOF then fails its requests.

What stays fast: requests are binary float32 frames (no pickling), frames queued during one event-loop
turn leave in one write per worker, a worker answers every request of a batch from one API server in
one frame, nobody busy-waits (only a brief spin, gated by :mod:`serve.cpu`, where one request
at a time is in flight), and batches grow by themselves under load (workers take whatever has
arrived). A request goes to the connected worker with the fewest rows in flight; with none connected
it waits (up to the request timeout) for one to connect. The queue bound is per API server and worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from litserve.transport.base import MessageTransport

from serve.channel import ChannelClosed, Connection, accept, frame, listen
from serve.cpu import Spin
from serve.errors import InferenceError, InvalidInput, Overloaded, RequestTimeout, WorkerLost

logger = logging.getLogger(__name__)

REQUEST = struct.Struct("<QdII")  # request id, enqueue time (CLOCK_MONOTONIC, shared by processes), rows, columns
REPLY = struct.Struct("<QBII")  # request id, status, rows (or message bytes), columns
OK, FAILED, EXPIRED, NOT_FINITE = 0, 1, 2, 3
QUEUE_FULL = "the request queue is full; retry shortly"  # a worker's bound and the parking's
_ERRORS = {FAILED: InferenceError, EXPIRED: RequestTimeout, NOT_FINITE: InvalidInput}


@dataclass(frozen=True)
class Prediction:
    """A worker's answer to one request: outputs (rows, columns) and the version that computed them."""

    outputs: np.ndarray
    version: str


def encode_request(uid: int, enqueued: float, values: np.ndarray) -> bytes:
    """One request's frame: header and float32 rows."""
    rows, cols = values.shape
    return frame(REQUEST.pack(uid, enqueued, rows, cols) + values.tobytes())


def decode_request(body: bytes) -> tuple[int, float, np.ndarray]:
    """(request id, enqueue time, rows) of one request frame's body."""
    uid, enqueued, rows, cols = REQUEST.unpack_from(body)
    return uid, enqueued, np.frombuffer(body, dtype=np.float32, offset=REQUEST.size).reshape(rows, cols)


def encode_replies(version: str, answers: list[tuple[int, int, np.ndarray | str]]) -> bytes:
    """One batch's (uid, status, outputs-or-message) records for one API server, as one frame."""
    version_bytes = version.encode()
    parts = [bytes([len(version_bytes)]), version_bytes]
    for uid, status, payload in answers:
        if isinstance(payload, str):
            message = payload.encode()
            parts += [REPLY.pack(uid, status, len(message), 0), message]
        else:
            outputs = np.ascontiguousarray(payload, dtype=np.float32)
            parts += [REPLY.pack(uid, status, outputs.shape[0], outputs.shape[1]), outputs.tobytes()]
    return frame(b"".join(parts))


def parse_replies(body: bytes) -> tuple[str, list[tuple[int, int, Any]]]:
    """Decode one reply frame's body into (version, [(uid, status, outputs or message)])."""
    length = body[0]
    version = body[1:1 + length].decode()
    offset, records = 1 + length, []
    while offset < len(body):
        uid, status, rows, cols = REPLY.unpack_from(body, offset)
        offset += REPLY.size
        if status == OK:
            size = rows * cols * 4
            payload: Any = np.frombuffer(body, dtype=np.float32, count=rows * cols, offset=offset).reshape(rows, cols)
        else:
            size = rows
            payload = body[offset:offset + size].decode()
        offset += size
        records.append((uid, status, payload))
    return version, records


class Layout:
    """Where the channels live: the control socket and one listening socket per API server."""

    def __init__(self, state_dir: Path, api_servers: int) -> None:
        self.control = state_dir / "control.sock"
        self.folder = state_dir / "sockets"
        self.api_servers = api_servers
        self.listeners: list[socket.socket] = []

    def api_path(self, index: int) -> Path:
        return self.folder / f"api-{index}.sock"

    def listen(self) -> None:
        """In the supervisor, before any child starts: the API servers' listening sockets."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.listeners = [listen(self.api_path(i)) for i in range(self.api_servers)]

    def __getstate__(self) -> dict[str, Any]:  # spawned workers connect by path
        return {**self.__dict__, "listeners": []}


class WorkerLink:
    """An API server's connection to one worker, with the requests that worker holds."""

    def __init__(self, conn: Connection, worker: int, pid: int) -> None:
        self.conn, self.worker, self.pid = conn, worker, pid
        self.pending: dict[int, tuple[asyncio.Future, int, int]] = {}  # uid -> (future, rows, bytes)
        self.rows = 0
        self.bytes = 0
        self.stalled_since = 0.0  # when it last answered or last became busy
        self.killed = False

    def add(self, uid: int, future: asyncio.Future, rows: int, data: bytes, now: float) -> None:
        if not self.pending:
            self.stalled_since = now
        self.pending[uid] = (future, rows, len(data))
        self.rows += rows
        self.bytes += len(data)
        if len(self.conn.outbox) == 0:  # frames queued during one event-loop turn leave in one write
            asyncio.get_running_loop().call_soon(self.flush)
        self.conn.outbox += data

    def flush(self) -> None:
        try:
            if not self.conn.flush():
                loop = asyncio.get_running_loop()
                loop.add_writer(self.conn.fileno(), self._writable)
        except ChannelClosed:
            pass  # its EOF fails the requests

    def _writable(self) -> None:
        try:
            done = self.conn.flush()
        except ChannelClosed:
            done = True
        if done:
            asyncio.get_running_loop().remove_writer(self.conn.fileno())

    def settle(self, uid: int) -> asyncio.Future | None:
        entry = self.pending.pop(uid, None)
        if entry is None:
            return None
        self.rows -= entry[1]
        self.bytes -= entry[2]
        return entry[0]

    def fail(self) -> None:
        """The worker is gone: every request it holds fails (503, safe to retry)."""
        if self.pending:
            logger.error("worker %d (pid %d) is gone; failing its %d requests", self.worker, self.pid,
                         len(self.pending))
        for future, _, _ in self.pending.values():
            if not future.done():
                future.set_exception(WorkerLost("the inference worker stopped; retry"))

    def kill(self, reason: str) -> None:
        """SIGKILL the worker (a hang); its EOF then fails its requests and the supervisor replaces it."""
        if not self.killed:
            self.killed = True
            logger.error("worker %d (pid %d) %s; killing it", self.worker, self.pid, reason)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Watchdog:
    """Kills a worker that has held requests for the hang timeout without answering any: one timer, armed
    only while requests are held, due when the first held link could pass the timeout."""

    def __init__(self, hang_timeout: float, links: Callable[[], Iterable[WorkerLink]]) -> None:
        self.hang_timeout, self.links = hang_timeout, links
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """A request went to a worker: a check is due within the hang timeout."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.hang_timeout, self._check)

    def _check(self) -> None:
        self._timer = None
        now, next_check = time.monotonic(), None
        for link in self.links():
            if not link.pending or link.killed:
                continue
            due = link.stalled_since + self.hang_timeout
            if due <= now:
                link.kill(f"held {len(link.pending)} requests for {self.hang_timeout:g} s without answering")
            else:
                next_check = due if next_check is None else min(next_check, due)
        if next_check is not None:
            self._timer = asyncio.get_running_loop().call_later(next_check - now, self._check)


class Parking:
    """Requests that arrived while no worker was connected, in order, within the queue bound; the first
    worker to connect takes them."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: deque[tuple[int, asyncio.Future, np.ndarray]] = deque()

    def __len__(self) -> int:
        return len(self.entries)

    def park(self, uid: int, future: asyncio.Future, values: np.ndarray) -> None:
        """Keep a request for the next worker; ``Overloaded`` when the parked bytes would pass the bound."""
        if sum(v.nbytes for _, _, v in self.entries) + values.nbytes > self.max_bytes:
            raise Overloaded(QUEUE_FULL)
        self.entries.append((uid, future, values))

    def drop(self, uid: int) -> None:
        """Forget a parked request (it timed out or was cancelled)."""
        if self.entries:
            self.entries = deque(entry for entry in self.entries if entry[0] != uid)

    def take(self) -> Iterator[tuple[int, asyncio.Future, np.ndarray]]:
        """The parked requests, oldest first, each removed as it is taken."""
        while self.entries:
            yield self.entries.popleft()


class Dispatcher:
    """An API server's workers: which one takes a request, requests waiting for a worker, and the
    watchdog that kills a worker holding requests past the hang timeout."""

    def __init__(self, max_queue_bytes: int, hang_timeout: float) -> None:
        self.max_queue_bytes = max_queue_bytes
        self.links: dict[Connection, WorkerLink] = {}
        self.parked = Parking(max_queue_bytes)
        self.no_worker_since = time.monotonic()
        self.watchdog = Watchdog(hang_timeout, self.links.values)
        self._turn = 0

    def submit(self, uid: int, future: asyncio.Future, values: np.ndarray) -> WorkerLink | None:
        """Send rows to the connected worker with the fewest rows in flight (returned), or park them until
        one connects (None). ``Overloaded`` when that worker's (or the parking's) bytes would pass the
        queue bound."""
        link = self._choose()
        if link is not None:
            self._send(link, uid, future, values)
        else:
            self.parked.park(uid, future, values)
        return link

    def alone(self, link: WorkerLink) -> bool:
        """True when ``link`` holds one request and nothing else is in flight in this API server."""
        return len(link.pending) == 1 and not self.parked and all(
            not other.pending for other in self.links.values() if other is not link)

    def forget(self, uid: int) -> None:
        """Drop a request that was answered, failed or timed out."""
        for link in self.links.values():
            if uid in link.pending:
                link.settle(uid)
        self.parked.drop(uid)

    def _choose(self) -> WorkerLink | None:
        """The live worker with the fewest rows in flight; ties take turns, so that every worker gets
        traffic (and a stopped one is found by the watchdog) even under light load."""
        links = [link for link in self.links.values() if not link.killed]
        if len(links) <= 1:
            return links[0] if links else None
        self._turn += 1
        start = self._turn % len(links)
        return min(links[start:] + links[:start], key=lambda link: link.rows)

    def _send(self, link: WorkerLink, uid: int, future: asyncio.Future, values: np.ndarray) -> None:
        data = encode_request(uid, time.monotonic(), values)
        if link.bytes and link.bytes + len(data) > self.max_queue_bytes:
            raise Overloaded(QUEUE_FULL)
        link.add(uid, future, len(values), data, time.monotonic())
        self.watchdog.arm()

    def connected(self, link: WorkerLink) -> None:
        """A worker connected: it takes the parked requests."""
        self.links[link.conn] = link
        for uid, future, values in self.parked.take():
            if not future.done():
                try:
                    self._send(link, uid, future, values)
                except Overloaded as exc:
                    future.set_exception(exc)

    def lost(self, conn: Connection) -> None:
        """A worker's connection closed: it died, so exactly its requests fail (503, safe to retry)."""
        link = self.links.pop(conn, None)
        if link is None:
            return
        if not self.links:
            self.no_worker_since = time.monotonic()
        link.fail()

    def can_serve(self) -> bool:
        """A worker is connected and not being killed for a hang."""
        return any(not link.killed for link in self.links.values())

    def stalled_for(self) -> float:
        """How long requests have waited on workers that do not answer, or how long there has been no
        worker at all (0 while progress is made)."""
        now = time.monotonic()
        if not self.links:
            return now - self.no_worker_since
        return max((now - link.stalled_since for link in self.links.values() if link.pending), default=0.0)


class WorkerReader:
    """An API server's reading side of its workers' connections: accepts a worker, reads its hello and
    its answers (each settles the waiting request's future), and turns its EOF into the loss of exactly
    its requests. :meth:`poll` reads one connection briefly outside the event loop (a :class:`Spin`)."""

    def __init__(self, workers: Dispatcher, spin: Spin) -> None:
        self.workers, self.spin = workers, spin

    def accept(self, listener: socket.socket) -> None:
        """Event-loop callback: a worker connects; read it from now on."""
        conn = accept(listener)
        if conn is not None:
            asyncio.get_running_loop().add_reader(conn.fileno(), self.readable, conn)

    def readable(self, conn: Connection) -> None:
        """Event-loop callback: a worker's hello, its answers, or its EOF."""
        try:
            bodies = conn.frames()
        except ChannelClosed:
            loop = asyncio.get_running_loop()
            loop.remove_reader(conn.fileno())
            loop.remove_writer(conn.fileno())
            conn.close()
            self.workers.lost(conn)
            return
        for body in bodies:
            link = self.workers.links.get(conn)
            if link is None:  # the first frame is the worker's hello
                self.workers.connected(WorkerLink(conn, int(orjson.loads(body)["worker"]), conn.peer_pid()))
            else:
                deliver(link, body)

    def poll(self, link: WorkerLink) -> None:
        """Send the only request in flight now (not at the end of the event loop's turn) and poll ``link``
        briefly for its answer, before the event loop sleeps (:class:`serve.cpu.Spin`): a process that
        sleeps while a core idles pays for its wake-up."""
        link.flush()

        def answers() -> list[bytes] | None:
            try:
                return link.conn.frames()
            except ChannelClosed:
                return None  # the event loop's reader sees the EOF too, and fails the requests

        for body in self.spin.until(answers) or ():
            deliver(link, body)


def deliver(link: WorkerLink, body: bytes) -> None:
    """Settle the futures of the requests one reply frame answers."""
    link.stalled_since = time.monotonic()
    version, records = parse_replies(body)
    for uid, status, payload in records:
        future = link.settle(uid)
        if future is None or future.done():
            continue
        if status == OK:
            future.set_result(Prediction(payload, version))
        else:
            future.set_exception(_ERRORS.get(status, InferenceError)(payload))


class Transport(MessageTransport):
    """The API server's side of the data plane, in LitServe's transport slot.

    In API server ``i``, LitServe's lifespan task calls :meth:`areceive` with ``i``; from then on the
    event loop accepts workers' connections and reads their answers, and :meth:`infer` works.
    """

    def __init__(self, layout: Layout, max_queue_bytes: int, request_timeout: float, hang_timeout: float,
                 spin_s: float = 0.0) -> None:
        self.layout = layout
        self.request_timeout = request_timeout
        self.workers = Dispatcher(max_queue_bytes, hang_timeout)
        self.spin_s = spin_s
        self.reader: WorkerReader | None = None  # made by the API server that serves (its spin holds a descriptor)
        # clients that can be sending to this API server, by protocol: the adapter counts uvicorn's HTTP
        # connections, the gRPC server the peers of its recent RPCs (serve.grpc_protocol.RecentClients)
        self.client_counts: dict[str, Callable[[], int]] = {}
        self._uids = itertools.count(1)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "workers": None, "_uids": None, "reader": None, "client_counts": {}}

    async def areceive(self, consumer_id: int | None = None, timeout: float | None = None) -> None:
        """Start serving as API server ``consumer_id`` (first call), then park: answers arrive by callbacks."""
        if self.reader is None:
            self.reader = WorkerReader(self.workers, Spin(self.spin_s))
            listener = self.layout.listeners[int(consumer_id or 0)]
            for other in self.layout.listeners:
                if other is not listener:
                    other.close()
            self._uids = itertools.count(1)
            self.workers.no_worker_since = time.monotonic()
            asyncio.get_running_loop().add_reader(listener.fileno(), self.reader.accept, listener)
        await asyncio.Event().wait()

    async def infer(self, values: np.ndarray) -> Prediction:
        """Send validated rows to a worker and wait for its answer (503 if it dies, 504 past the timeout).
        The only request in flight, for the only client, is polled for briefly before the loop sleeps."""
        loop = asyncio.get_running_loop()
        uid = next(self._uids)  # type: ignore[arg-type]
        future = loop.create_future()
        timer = None
        try:
            link = self.workers.submit(uid, future, np.ascontiguousarray(values, dtype=np.float32))
            if link is not None and self.reader is not None and self.workers.alone(link) \
                    and self.clients() <= 1:  # another client's request may be arriving
                self.reader.poll(link)
            if not future.done():  # answered during the poll: no timer to set and cancel
                timer = loop.call_later(self.request_timeout, _expire, future,
                                        f"no answer within {self.request_timeout:g} s")
            return await future
        except BaseException:  # timed out, cancelled or refused: drop what a worker or the parking still holds
            self.workers.forget(uid)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def clients(self) -> int:
        """Client connections that can be sending requests to this API server (HTTP and gRPC)."""
        return sum(count() for count in self.client_counts.values())

    def send(self, item: Any, consumer_id: int) -> None:
        """Unused: workers answer over their own connections."""
        raise NotImplementedError("serve.transport answers over per-worker connections")


def _expire(future: asyncio.Future, message: str) -> None:
    if not future.done():
        future.set_exception(RequestTimeout(message))
