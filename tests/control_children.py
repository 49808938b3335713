"""A child process's side of the control plane, in-process: the supervisor-side ``Peer`` and the child's own
end of a real socket pair (for the tests of serve.manager and serve.heartbeat)."""

from __future__ import annotations

import os
import socket
from typing import Any

from serve.channel import Connection
from serve.control import Peer, decode


class Child:
    """The supervisor's ``Peer`` for a child (``role`` ``worker`` or ``api``), and what the child receives."""

    def __init__(self, role: str, ident: int, pid: int = 0) -> None:
        ours, theirs = socket.socketpair()
        self.end = Connection(theirs)
        self.peer = Peer(Connection(ours), role=role, id=ident, pid=pid or os.getpid())

    def told(self) -> list[dict[str, Any]]:
        """Every message the supervisor sent this child since the last call."""
        return [decode(body) for body in self.end.frames()]

    def close(self) -> None:
        self.peer.conn.close()
        self.end.close()
