"""Framed messages over one UNIX stream connection between two processes (both planes use it).

Every connection joins exactly two processes (an API server and a worker, or the supervisor and one
child), so nothing is shared by several writers or readers: no cross-process lock exists that a dead
process could keep, and a frame torn by a crash dies with its connection (the peer sees EOF and
discards the partial frame). This is TorchServe's layout (one socket per frontend/backend pair).

:class:`WakePipe` is the one wake-up for loops that wait on descriptors.

A frame is ``<u32 little-endian length><body>``. :class:`Connection` is non-blocking, for event loops
(``asyncio`` in an API server, ``selectors`` in a worker and in the supervisor): bytes go out through
an outbox that is flushed when the socket is writable, and come in through :meth:`Connection.frames`.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import struct
import threading
from pathlib import Path

LENGTH = struct.Struct("<I")
MAX_FRAME = 1 << 30
_RECV = 256 << 10


class ChannelClosed(Exception):
    """The peer closed the connection (or it broke): its frames in flight are lost."""


def frame(body: bytes) -> bytes:
    """``body`` with its length prefix."""
    return LENGTH.pack(len(body)) + body


class Connection:
    """One end of a framed stream connection, non-blocking."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.outbox = bytearray()
        self._inbox = bytearray()
        self._buffer = bytearray(_RECV)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> None:
        """Queue framed ``data`` and write what the socket takes now; the rest waits for :meth:`flush`."""
        self.outbox += data
        self.flush()

    def flush(self) -> bool:
        """Write queued bytes; True when nothing is left. Raises ``ChannelClosed`` if the peer is gone."""
        while self.outbox:
            try:
                sent = self.sock.send(self.outbox)
            except BlockingIOError:
                return False
            except OSError as exc:
                raise ChannelClosed(str(exc)) from None
            del self.outbox[:sent]
        return True

    def frames(self) -> list[bytes]:
        """Read what is available and return the complete frames; ``ChannelClosed`` at EOF.

        Reads into this connection's own buffer (no allocation per read) and copies each frame out once."""
        try:
            size = self.sock.recv_into(self._buffer)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None
        if not size:
            raise ChannelClosed("closed by peer")
        data: bytes | memoryview = memoryview(self._buffer)[:size]
        if self._inbox:  # the start of a frame came with an earlier read
            self._inbox += data
            data, self._inbox = bytes(self._inbox), bytearray()
        offset, found = 0, []
        while len(data) - offset >= LENGTH.size:
            (length,) = LENGTH.unpack_from(data, offset)
            if length > MAX_FRAME:
                raise ChannelClosed(f"frame of {length} bytes is over the limit")
            end = offset + LENGTH.size + length
            if end > len(data):
                break
            found.append(bytes(data[offset + LENGTH.size:end]))
            offset = end
        if offset < len(data):
            self._inbox += data[offset:]
        return found

    def peer_pid(self) -> int:
        """The peer process's pid as the kernel tells it (``SO_PEERCRED``), not as the peer claims."""
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def listen(path: Path, backlog: int = 128) -> socket.socket:
    """A listening UNIX socket at ``path`` (replacing a stale one), only for this user."""
    if len(os.fsencode(path)) >= 104:
        raise ValueError(f"socket path {path} is too long for a UNIX socket; use a shorter SIMPLENN_STATE_DIR")
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))
    os.chmod(path, 0o600)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def accept(listener: socket.socket) -> Connection | None:
    """Accept one pending connection from a process of this user; None if none is pending."""
    try:
        sock, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
            return None
        raise
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    if struct.unpack("3i", creds)[1] != os.getuid():  # another user on this machine: never a peer of ours
        sock.close()
        return None
    return Connection(sock)


def connect(path: Path) -> Connection:
    """Connect to the listening socket at ``path`` (blocking connect, then non-blocking use)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(path))
    except OSError:
        sock.close()
        raise
    return Connection(sock)


class WakePipe:
    """A self-pipe, the wake-up of every loop that waits on descriptors (the supervisor's hub and its
    watch over the children, the weights watcher): :meth:`poke` (any thread) makes :meth:`fileno`
    readable until :meth:`drain`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # not closed while being written
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        return self._read

    def poke(self) -> None:
        with self._lock:
            if self._write >= 0:
                try:
                    os.write(self._write, b"\0")
                except BlockingIOError:  # full: readable already
                    pass

    def drain(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def wait(self, timeout: float) -> None:
        """Block up to `timeout` seconds, or until poked (a poke stays readable until :meth:`drain`)."""
        poller = select.poll()
        poller.register(self._read, select.POLLIN)
        poller.poll(timeout * 1000)

    def close(self) -> None:
        """Close both ends; only once nobody waits on :meth:`fileno` any more. Idempotent."""
        with self._lock:
            for fd in (self._read, self._write):
                if fd >= 0:
                    os.close(fd)
            self._read = self._write = -1
