"""Client threads, the part of a load that the benches share: ``bench/faults.py``'s and ``bench/reload.py``'s
``Load`` (and through it ``bench/soak.py``) each run a few client threads against a server, and differ in how
each thread sends its requests and judges the answers."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

S = TypeVar("S")  # what one client records per request
T = TypeVar("T", bound="ClientThreads")


class ClientThreads(Generic[S]):
    """``clients`` daemon threads named ``<name>-<index>``, each running ``self._client(index)`` (a subclass's)
    until :attr:`stop_event` is set; thread ``index`` appends what it records to ``per_thread[index]``. A
    subclass may append threads of its own to :attr:`threads` before ``start()``; they start and stop with
    the clients. ``start()`` (or ``with``) starts them; ``stop()`` sets the event and joins each for up to
    ``join_timeout_s``."""

    def __init__(self, clients: int, name: str, join_timeout_s: float) -> None:
        self.join_timeout_s = join_timeout_s
        self.stop_event = threading.Event()
        self.per_thread: list[list[S]] = [[] for _ in range(clients)]
        self.threads = [threading.Thread(target=self._client, args=(i,), name=f"{name}-{i}", daemon=True)
                        for i in range(clients)]

    def start(self: T) -> T:
        """Start every thread; returns self."""
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Tell the threads to stop and wait for each (up to ``join_timeout_s``); safe to call again."""
        self.stop_event.set()
        for thread in self.threads:
            thread.join(self.join_timeout_s)

    def __enter__(self: T) -> T:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def collected(self) -> list[S]:
        """What every thread recorded so far, thread by thread (each thread's in the order it sent them)."""
        return [sample for per in self.per_thread for sample in list(per)]

    def _client(self, index: int) -> None:
        """One client's loop: send until :attr:`stop_event` is set, appending to ``per_thread[index]``."""
        raise NotImplementedError
