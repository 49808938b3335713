"""What an API server knows about the whole server, for health, status and admin routes.

The supervisor pushes its state (served and previous version, each worker's version, the last reload,
draining) over the control channel whenever it changes; the API server's own connections say whether
a worker can take a request now (:class:`serve.transport.Transport`). Nothing is polled, and nothing is
read from files per request. The supervisor's pings are answered from this event loop, so an API server
whose loop is stopped or blocked is killed and replaced (:mod:`serve.heartbeat`).

* **ready**: not draining, and a worker is connected to this API server and not being killed for a hang.
* **live**: this API server has not been stuck for longer than the hang timeout plus a worker start:
  requests held by workers that do not answer, or no worker at all. Then only a pod restart helps.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from serve.channel import ChannelClosed
from serve.control import ControlClient
from serve.transport import Layout, Transport

logger = logging.getLogger(__name__)


class ServerView:
    """An API server's view: the supervisor's last state and this process's worker connections."""

    def __init__(self, model_name: str, layout: Layout, transport: Transport, stuck_after: float) -> None:
        self.model_name = model_name
        self.layout = layout
        self.transport = transport
        self.stuck_after = stuck_after
        self.state: dict[str, Any] = {}
        self.client: ControlClient | None = None

    def start(self, index: int) -> None:
        """In API server ``index``'s event loop: connect to the supervisor and follow its state."""
        self.client = ControlClient(self.layout.control, "api", index)
        asyncio.get_running_loop().add_reader(self.client.fileno(), self._on_control)

    def _on_control(self) -> None:
        assert self.client is not None
        try:
            messages = self.client.received()
        except ChannelClosed:  # the supervisor is gone; this process dies with it
            asyncio.get_running_loop().remove_reader(self.client.fileno())
            self.state = {**self.state, "draining": True}
            return
        for message in messages:
            if message.get("t") == "state":
                self.state = message
            elif message.get("t") == "ping":  # answered from this loop: a blocked loop does not answer
                self._send({"t": "pong", "n": message["n"]})

    def _send(self, message: dict[str, Any]) -> None:
        """Send one message to the supervisor; a supervisor that is gone is noticed by its EOF."""
        assert self.client is not None
        try:
            self.client.send(message)
        except ChannelClosed:
            pass

    def ready(self) -> bool:
        """True when this API server can have a request answered now."""
        return bool(self.state) and not self.state["draining"] and self.transport.workers.can_serve()

    def stuck_for(self) -> float | None:
        """Seconds this API server has been stuck past the limit, or None while it is alive."""
        stalled = self.transport.workers.stalled_for()
        return stalled if stalled > self.stuck_after else None

    def status(self) -> dict[str, Any]:
        """The status route's body: live version (one, except during a swap), each worker, last reload."""
        state = self.state
        versions = state.get("versions", [])
        return {"name": self.model_name, "ready": self.ready(),
                "version": state.get("version") if len(versions) <= 1 else None,
                "versions": versions, "previous_version": state.get("previous_version"),
                "path": state.get("path"), "workers": state.get("workers", []),
                "last_reload": state.get("last_reload")}

    def command(self, kind: str) -> None:
        """Pass an admin command (``rescan`` or ``rollback``) to the supervisor."""
        assert self.client is not None
        self.client.send({"t": kind})
