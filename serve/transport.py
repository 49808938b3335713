"""How rows travel from the API servers to the inference workers and back, and how workers batch them.

LitServe 0.2.19 moves every request through a ``multiprocessing.Manager`` process: four pickled round
trips per request, a blocking ``put`` on the event loop, one ``asyncio.to_thread`` hop per answer and
a worker that busy-polls with 1 ms timeouts (see the README's performance section). This module
replaces that transport, through LitServe's own slots (the request queue and ``MessageTransport``
handed to each inference worker, and a custom ``LitLoop``), with:

* one **request pipe** shared by all API servers (writers) and all workers (readers). A request is a
  binary frame: a fixed header and the float32 rows, no pickling. The pipe's size is the queue bound:
  when it is full the request is refused at once with 503 ``Overloaded`` instead of waiting.
* one **reply pipe per API server**, read by its event loop with ``add_reader`` (no thread hop). A
  worker answers all requests of a batch that came from one API server in **one** frame.
* a **batching loop** in each worker: block for the first request, take whatever else is already
  queued (up to ``max_batch_size`` rows), optionally linger ``batch_timeout`` for more, run one
  forward pass, answer. Under load batches grow by themselves; at one client there is no added wait.

Frames are ``<u32 length><body>``; writers hold a per-pipe lock for the whole frame, readers of the
shared request pipe hold a read lock per frame, so frames never interleave.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import logging
import multiprocessing as mp
import os
import select
import struct
import termios
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from litserve.loops.base import LitLoop
from litserve.transport.base import MessageTransport

from serve import metrics
from serve.errors import InferenceError, InvalidInput, Overloaded, RequestTimeout, WorkerLost

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")
_REQUEST = struct.Struct("<HQdII")  # consumer id, request id, enqueue time (monotonic), rows, columns
_REPLY = struct.Struct("<QBII")  # request id, status, rows (or message bytes), columns
_OK, _FAILED, _EXPIRED, _NOT_FINITE = 0, 1, 2, 3
_F_SETPIPE_SZ, _F_GETPIPE_SZ = 1031, 1032


@dataclass(frozen=True)
class Request:
    """One queued request as a worker sees it."""

    consumer: int
    uid: int
    enqueued: float
    values: np.ndarray


@dataclass(frozen=True)
class Prediction:
    """A worker's answer to one request: outputs (rows, columns) and the version that computed them."""

    outputs: np.ndarray
    version: str


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exact(fd: int, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], max(timeout, 0.0))[0])


class _Pipe:
    """A one-way OS pipe with a cross-process write lock; picklable into spawned workers."""

    def __init__(self, ctx: Any, size: int | None = None) -> None:
        self.reader, self.writer = ctx.Pipe(duplex=False)  # type: tuple[Connection, Connection]
        self.write_lock = ctx.Lock()
        self.capacity = 65536
        if size:
            try:
                fcntl.fcntl(self.writer.fileno(), _F_SETPIPE_SZ, size)
            except OSError:
                logger.debug("could not resize pipe to %d bytes", size)
            self.capacity = fcntl.fcntl(self.writer.fileno(), _F_GETPIPE_SZ)

    def pending_bytes(self) -> int:
        """Bytes written but not yet read."""
        buf = fcntl.ioctl(self.reader.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return struct.unpack("i", buf)[0]

    def write_frames(self, frames: bytes) -> None:
        """Write whole frames at once (other writers wait for them)."""
        with self.write_lock:
            _write_all(self.writer.fileno(), frames)

    def write_frame(self, body: bytes) -> None:
        """Write one frame."""
        self.write_frames(_frame(body))


def _frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


class RequestQueue(_Pipe):
    """The shared request pipe: API servers put frames, workers take batches."""

    def __init__(self, ctx: Any, max_bytes: int) -> None:
        super().__init__(ctx, max_bytes)
        self.read_lock = ctx.Lock()
        self._carry: Request | None = None
        self._outbox: list[bytes] = []  # frames waiting for this event-loop turn's single write
        self._outbox_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_outbox": [], "_outbox_bytes": 0}

    # -- API server side -------------------------------------------------------------------------
    def put(self, consumer: int, uid: int, values: np.ndarray) -> None:
        """Queue one request's rows (float32, C-contiguous); ``Overloaded`` if the queue is full.

        Frames queued during one event-loop iteration go out in one write (one worker wake-up).
        """
        rows, cols = values.shape
        frame = _frame(_REQUEST.pack(consumer, uid, time.monotonic(), rows, cols) + values.tobytes())
        queued = self.pending_bytes() + self._outbox_bytes
        if queued and queued + len(frame) > self.capacity:
            raise Overloaded("the request queue is full; retry shortly")
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        frames, self._outbox, self._outbox_bytes = self._outbox, [], 0
        self.write_frames(b"".join(frames))

    # -- worker side -----------------------------------------------------------------------------
    def _read_frame_nowait(self) -> Request | None:
        fd = self.reader.fileno()
        with self.read_lock:
            if not _readable(fd, 0):
                return None
            (length,) = _LENGTH.unpack(_read_exact(fd, _LENGTH.size))
            body = _read_exact(fd, length)
        consumer, uid, enqueued, rows, cols = _REQUEST.unpack_from(body)
        values = np.frombuffer(body, dtype=np.float32, offset=_REQUEST.size).reshape(rows, cols)
        return Request(consumer, uid, enqueued, values)

    def _next(self, timeout: float) -> Request | None:
        deadline = time.monotonic() + timeout
        while True:
            request = self._read_frame_nowait()
            if request is not None:
                return request
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            _readable(self.reader.fileno(), remaining)

    def take_batch(self, max_rows: int, linger: float, wait: float = 1.0) -> list[Request]:
        """Block up to ``wait`` for a first request, then take what is queued, up to ``max_rows`` rows.

        With ``linger`` > 0, wait that long after the queue runs dry for more rows. A request that
        would overflow ``max_rows`` is kept for the next batch (a single oversized request runs alone).
        """
        first = self._carry or self._next(wait)
        self._carry = None
        if first is None:
            return []
        batch, rows = [first], len(first.values)
        deadline = time.monotonic() + linger
        while rows < max_rows:
            request = self._read_frame_nowait()
            if request is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not _readable(self.reader.fileno(), remaining):
                    break
                continue
            if rows + len(request.values) > max_rows:
                self._carry = request
                break
            batch.append(request)
            rows += len(request.values)
        return batch


class ReplyChannel(_Pipe):
    """One API server's reply pipe: workers write batched answers, the API server's event loop reads."""

    def send(self, version: str, answers: list[tuple[int, int, np.ndarray | str]]) -> None:
        """Send (uid, status, outputs-or-message) records for one batch in one frame."""
        version_bytes = version.encode()
        parts = [bytes([len(version_bytes)]), version_bytes]
        for uid, status, payload in answers:
            if isinstance(payload, str):
                message = payload.encode()
                parts += [_REPLY.pack(uid, status, len(message), 0), message]
            else:
                outputs = np.ascontiguousarray(payload, dtype=np.float32)
                parts += [_REPLY.pack(uid, status, outputs.shape[0], outputs.shape[1]), outputs.tobytes()]
        try:
            self.write_frame(b"".join(parts))
        except OSError as exc:  # the API server is gone (shutdown, crash): nobody waits for this answer
            if exc.errno != errno.EPIPE:
                raise


def parse_replies(body: bytes) -> tuple[str, list[tuple[int, int, Any]]]:
    """Decode one reply frame into (version, [(uid, status, outputs or message)])."""
    length = body[0]
    version = body[1:1 + length].decode()
    offset, records = 1 + length, []
    while offset < len(body):
        uid, status, rows, cols = _REPLY.unpack_from(body, offset)
        offset += _REPLY.size
        if status == _OK:
            size = rows * cols * 4
            payload: Any = np.frombuffer(body, dtype=np.float32, count=rows * cols, offset=offset).reshape(rows, cols)
        else:
            size = rows
            payload = body[offset:offset + size].decode()
        offset += size
        records.append((uid, status, payload))
    return version, records


class Transport(MessageTransport):
    """The channels between API servers and workers, in LitServe's transport slot.

    In an API server, LitServe's lifespan task calls :meth:`areceive` with the server's consumer id;
    that registers the reply pipe with the event loop, after which :meth:`infer` works.
    """

    def __init__(self, num_consumers: int, max_queue_bytes: int, request_timeout: float) -> None:
        ctx = mp.get_context("spawn")
        self.requests = RequestQueue(ctx, max_queue_bytes)
        self.replies = [ReplyChannel(ctx, 1 << 20) for _ in range(num_consumers)]
        self.request_timeout = request_timeout
        self.worker_restarts = ctx.Value("i", 0, lock=False)  # bumped by the supervisor on each restart
        self.consumer: int | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._uids = itertools.count(1)
        self._buffer = bytearray()
        self._closed: asyncio.Future | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pending={}, _uids=None, _buffer=bytearray(), _closed=None)
        return state

    # -- API server side -------------------------------------------------------------------------
    async def areceive(self, consumer_id: int | None = None, timeout: float | None = None) -> None:
        """Register this API server's reply pipe with the running event loop, then park until closed."""
        loop = asyncio.get_running_loop()
        self.consumer = int(consumer_id or 0)
        self._pending, self._uids, self._buffer = {}, itertools.count(1), bytearray()
        fd = self.replies[self.consumer].reader.fileno()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable, fd)
        self._closed = loop.create_future()
        watcher = loop.create_task(self._fail_pending_on_worker_restart())
        try:
            await self._closed
        finally:
            watcher.cancel()
            loop.remove_reader(fd)

    async def _fail_pending_on_worker_restart(self) -> None:
        """When a worker dies, its requests will never be answered: fail every pending one with 503 at once
        (predictions are safe to retry) instead of letting them wait for the timeout."""
        seen = self.worker_restarts.value
        while True:
            await asyncio.sleep(0.1)
            if self.worker_restarts.value != seen:
                seen = self.worker_restarts.value
                pending, self._pending = self._pending, {}
                for future in pending.values():
                    if not future.done():
                        future.set_exception(WorkerLost("the inference worker stopped; retry"))

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            return
        if not data:
            return
        buffer = self._buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if len(buffer) - offset - _LENGTH.size < length:
                break
            body = bytes(buffer[offset + _LENGTH.size: offset + _LENGTH.size + length])
            offset += _LENGTH.size + length
            self._deliver(body)
        del buffer[:offset]

    def _deliver(self, body: bytes) -> None:
        version, records = parse_replies(body)
        for uid, status, payload in records:
            future = self._pending.pop(uid, None)
            if future is None or future.done():
                continue
            if status == _OK:
                future.set_result(Prediction(payload, version))
            elif status == _EXPIRED:
                future.set_exception(RequestTimeout(payload))
            elif status == _NOT_FINITE:
                future.set_exception(InvalidInput(payload))
            else:
                future.set_exception(InferenceError(payload))

    async def infer(self, values: np.ndarray) -> Prediction:
        """Queue validated rows and wait for the worker's answer (or time out with 504)."""
        if self.consumer is None:
            raise RuntimeError("transport not started in this process")
        loop = asyncio.get_running_loop()
        uid = next(self._uids)
        future = loop.create_future()
        self._pending[uid] = future
        timer = loop.call_later(self.request_timeout, _expire, future,
                                f"no answer within {self.request_timeout:g} s")
        try:
            self.requests.put(self.consumer, uid, np.ascontiguousarray(values, dtype=np.float32))
            return await future
        finally:
            timer.cancel()
            self._pending.pop(uid, None)

    def send(self, item: Any, consumer_id: int) -> None:
        """Unused: workers answer through :class:`ReplyChannel` in batches."""
        raise NotImplementedError("serve.transport answers through ReplyChannel.send")

    def close(self, **kwargs: Any) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)


def _expire(future: asyncio.Future, message: str) -> None:
    if not future.done():
        future.set_exception(RequestTimeout(message))


class BatchingLoop(LitLoop):
    """The inference worker's loop: take a batch, one forward pass, answer each API server once."""

    def __call__(self, lit_api: Any, device: str, worker_id: int, request_queue: RequestQueue,
                 transport: Transport, workers_setup_status: dict, callback_runner: Any) -> None:
        max_rows = lit_api.max_batch_size
        linger = lit_api.batch_timeout
        timeout = transport.request_timeout
        while True:
            batch = request_queue.take_batch(max_rows, linger)
            if batch:
                self.run_batch(lit_api, batch, transport, timeout)

    @staticmethod
    def run_batch(lit_api: Any, batch: list[Request], transport: Transport, timeout: float) -> None:
        """Predict one batch and send every answer; expired requests are answered without computing."""
        now = time.monotonic()
        live: list[Request] = []
        answers: dict[int, list[tuple[int, int, Any]]] = {}
        for request in batch:
            waited = now - request.enqueued
            metrics.QUEUE_SECONDS.observe(waited)
            if waited <= timeout:
                live.append(request)
            else:
                answers.setdefault(request.consumer, []).append(
                    (request.uid, _EXPIRED, "request waited in the queue past the timeout"))
        version = ""
        if live:
            started = time.perf_counter()
            try:
                outputs, version = lit_api.predict(lit_api.batch([r.values for r in live]))
                pieces = lit_api.unbatch(outputs, [len(r.values) for r in live])
                results = [(r.uid, _OK, piece) if np.isfinite(piece).all() else
                           (r.uid, _NOT_FINITE, "the model's output for this input is not a finite number")
                           for r, piece in zip(live, pieces)]
            except Exception as exc:  # a model fault: every request of the batch gets a 500, the worker lives
                logger.exception("forward pass failed")
                results = [(r.uid, _FAILED, f"inference failed: {type(exc).__name__}") for r in live]
            metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
            rows = sum(len(r.values) for r in live)
            metrics.BATCH_ROWS.observe(rows)
            metrics.ROWS.inc(rows)
            for request, result in zip(live, results):
                answers.setdefault(request.consumer, []).append(result)
        for consumer, records in answers.items():
            transport.replies[consumer].send(version, records)
