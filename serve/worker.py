"""An inference worker's side of the data plane: one connection to every API server, and the
batching loop that LitServe runs in the worker (our ``LitLoop``).

The loop blocks (``selectors``) until requests arrive from any API server (after an answer it first
polls for up to ``SIMPLENN_WORKER_SPIN_US`` while the cores are not all wanted, :mod:`serve.cpu`), takes every
request that has arrived (up to ``max_batch_size`` rows; a request that would overflow waits for the
next batch, a single oversized request runs alone), optionally lingers ``batch_timeout`` for more,
runs one forward pass on one model snapshot, and answers each API server once per batch. A lost API
server connection is re-made at once (the supervisor keeps the listening socket, so a replacement
API server finds it waiting). Replies to an API server that stops reading queue up to a bound, then
its connection is dropped rather than letting it stall the others.
"""

from __future__ import annotations

import logging
import selectors
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from litserve.loops.base import LitLoop

from serve import metrics
from serve.channel import ChannelClosed, Connection, connect, frame
from serve.cpu import Spin
from serve.transport import EXPIRED, FAILED, NOT_FINITE, OK, Layout, decode_request, encode_replies

logger = logging.getLogger(__name__)
_MAX_OUTBOX = 64 << 20
_RECONNECT_S = 0.2


@dataclass(frozen=True)
class Request:
    """One request as a worker sees it, with the connection to answer on."""

    conn: Connection
    uid: int
    enqueued: float
    values: np.ndarray


class ApiLinks:
    """This worker's connections to every API server, read through one selector."""

    def __init__(self, layout: Layout, worker_id: int, spin_s: float = 0.0) -> None:
        self.layout, self.worker_id, self.spin = layout, worker_id, Spin(spin_s)
        self.last_batch = 0  # requests in the last batch: a worker that batches several is busy, it never spins
        self.spun = False  # the last wait's requests were found by its spin
        self.selector = selectors.DefaultSelector()
        self.conns: dict[int, Connection | None] = {i: None for i in range(layout.api_servers)}
        self.ready: deque[Request] = deque()
        for index in self.conns:
            self._connect(index)

    def _connect(self, index: int) -> None:
        try:
            conn = connect(self.layout.api_path(index))
            conn.send(frame(orjson.dumps({"worker": self.worker_id})))
        except (OSError, ChannelClosed):
            return  # retried by wait()
        self.conns[index] = conn
        self.selector.register(conn.sock, selectors.EVENT_READ, index)

    def _drop(self, index: int) -> None:
        conn = self.conns[index]
        if conn is not None:
            self.selector.unregister(conn.sock)
            conn.close()
            self.conns[index] = None
        self._connect(index)

    def wait(self, timeout: float | None, spin: bool = False) -> bool:
        """Wait up to ``timeout`` (None: until something happens) for requests (or writability); True if
        requests arrived. With ``spin``, first poll briefly if there is room to spin (:class:`Spin`).
        While an API server's connection is missing, retry it every 0.2 s."""
        missing = [i for i, conn in self.conns.items() if conn is None]
        for index in missing:
            self._connect(index)
        if missing:
            timeout = _RECONNECT_S if timeout is None else min(timeout, _RECONNECT_S)
        before = len(self.ready)
        events = self.spin.until(lambda: self.selector.select(0)) if spin else None
        self.spun = bool(events)
        for key, mask in events or self.selector.select(timeout):
            index, conn = key.data, key.fileobj
            try:
                if mask & selectors.EVENT_WRITE:
                    self._flush(index)
                if mask & selectors.EVENT_READ:
                    owner = self.conns[index]
                    assert owner is not None
                    for body in owner.frames():
                        uid, enqueued, values = decode_request(body)
                        self.ready.append(Request(owner, uid, enqueued, values))
            except ChannelClosed:
                if self.conns[index] is not None and self.conns[index].sock is conn:
                    self._drop(index)
        return len(self.ready) > before

    def answer(self, conn: Connection, data: bytes) -> None:
        """Send one reply frame on ``conn`` if it is still this worker's connection to its API server."""
        index = next((i for i, c in self.conns.items() if c is conn), None)
        if index is None:
            return  # that API server is gone: nobody waits for this answer
        try:
            conn.send(data)
        except ChannelClosed:
            self._drop(index)
            return
        if conn.outbox:
            if len(conn.outbox) > _MAX_OUTBOX:
                logger.error("API server %d does not read its answers; dropping its connection", index)
                self._drop(index)
                return
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, index)

    def _flush(self, index: int) -> None:
        conn = self.conns[index]
        if conn is not None and conn.flush():
            self.selector.modify(conn.sock, selectors.EVENT_READ, index)


def take_batch(links: ApiLinks, max_rows: int, linger: float, wait: float | None = None) -> list[Request]:
    """The batching rule: block up to ``wait`` (None: as long as it takes) for a first request, then take
    what has arrived, up to ``max_rows`` rows, lingering up to ``linger`` for more. After a batch of one
    request the next wait starts with a brief spin (:class:`serve.cpu.Spin`); after several, never. A
    request that such a spin found is the one expected: without ``linger`` it runs at once, with no
    second look for more (one system call less on a lone client's path)."""
    spun = False
    if not links.ready:
        if not links.wait(wait, spin=links.last_batch == 1):
            return []
        spun = links.spun
    batch: list[Request] = []
    rows, deadline = 0, time.monotonic() + linger
    while True:
        while links.ready and (not batch or rows + len(links.ready[0].values) <= max_rows):
            request = links.ready.popleft()
            batch.append(request)
            rows += len(request.values)
        if links.ready or rows >= max_rows or (spun and linger <= 0) \
                or not links.wait(max(0.0, deadline - time.monotonic())):
            links.last_batch = len(batch)
            return batch


class BatchingLoop(LitLoop):
    """The inference worker's loop: take a batch, one forward pass, answer each API server once."""

    def __call__(self, lit_api: Any, device: str, worker_id: int, request_queue: Any, transport: Any,
                 workers_setup_status: Any, callback_runner: Any) -> None:
        links = ApiLinks(transport.layout, worker_id, lit_api.settings.worker_spin_us / 1e6)
        with lit_api.inference():
            while True:
                batch = take_batch(links, lit_api.max_batch_size, lit_api.batch_timeout)
                if batch:
                    run_batch(lit_api, batch, transport.request_timeout, links.answer)


def run_batch(lit_api: Any, batch: list[Request], timeout: float, answer: Callable[[Connection, bytes], None]) -> None:
    """Predict one batch and ``answer`` one reply frame per connection, then record the batch's metrics
    (after the answers, off their path). Expired requests are answered without computing; a model fault
    fails this batch's requests with 500 and the worker lives on."""
    now = time.monotonic()
    live: list[Request] = []
    answers: dict[Connection, list[tuple[int, int, Any]]] = {}
    waits = [now - request.enqueued for request in batch]
    for request, waited in zip(batch, waits):
        if waited <= timeout:
            live.append(request)
        else:
            answers.setdefault(request.conn, []).append(
                (request.uid, EXPIRED, "request waited in the queue past the timeout"))
    version = ""
    if live:
        started = time.perf_counter()
        try:
            outputs, version = lit_api.predict(lit_api.batch([r.values for r in live]))
            pieces = lit_api.unbatch(outputs, [len(r.values) for r in live])
            finite = np.isfinite(outputs).all()  # the whole batch at once; each request's only if not
            results = [(r.uid, OK, piece) if finite or np.isfinite(piece).all() else
                       (r.uid, NOT_FINITE, "the model's output for this input is not a finite number")
                       for r, piece in zip(live, pieces)]
        except Exception as exc:
            logger.exception("forward pass failed")
            results = [(r.uid, FAILED, f"inference failed: {type(exc).__name__}") for r in live]
        elapsed = time.perf_counter() - started
        for request, result in zip(live, results):
            answers.setdefault(request.conn, []).append(result)
    for conn, records in answers.items():
        answer(conn, encode_replies(version, records))
    for waited in waits:
        metrics.QUEUE_SECONDS.observe(waited)
    if live:
        rows = sum(len(r.values) for r in live)
        metrics.INFERENCE_SECONDS.observe(elapsed)
        metrics.BATCH_ROWS.observe(rows)
        metrics.ROWS.inc(rows)
