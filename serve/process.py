"""Process hygiene for the supervisor's children: stop signals are the supervisor's business, and no
child outlives it.

Only the main process reacts to SIGTERM/SIGINT/SIGHUP (see ``serve.server``). Forked children
(LitServe's manager, the uvicorn API servers) ignore them until uvicorn installs its own handlers
(the supervisor stops API servers with SIGTERM once draining is over); inference workers move to
their own process group, so a signal to the whole group (Ctrl-C in a terminal, ``kill -- -PGID``)
reaches only the supervisor, which then stops them in order. Every child asks the kernel to kill it
if the supervisor dies (``PR_SET_PDEATHSIG``), so a crashed or SIGKILLed supervisor leaves no orphans.

Every process also freezes its start-up heap (:func:`freeze_heap`): without it a full garbage
collection walks every object FastAPI, pydantic, uvicorn (or torch) ever made, which measured 40-120 ms
per pause in an API server or worker under load, the longest stalls in the 64-connection tail.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal

_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _after_fork_in_child() -> None:
    for stop_signal in _STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    die_with_parent()


def supervise_forked_children() -> None:
    """Call once in the main process, before LitServe forks its manager and API servers."""
    os.register_at_fork(after_in_child=_after_fork_in_child)


def detach_worker() -> None:
    """In a spawned inference worker: own process group, no terminal signals, die with the supervisor."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    die_with_parent()


def freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's reach (``gc.freeze()``), at the end of a
    process's start-up: modules, routes, the model. Later full collections then scan only what requests
    create, so they take microseconds instead of a pause of tens of milliseconds; and objects shared
    with a forked child stay unwritten by its collections (their pages stay shared: less memory)."""
    gc.collect()
    gc.freeze()
