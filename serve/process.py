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
per pause in an API server or worker under load, the longest stalls in the 64-connection tail. An
inference worker then gives back the library pages only its start-up touched
(:func:`release_startup_pages`): importing torch reads ~70 MiB of its shared libraries (operator
registration) that serving SimpleNN never touches again.
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


_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (clean file pages just leave memory)


def release_startup_pages() -> int:
    """Ask Linux to reclaim the read-only, file-backed pages this process maps alone (shared libraries'
    code and constants), once start-up is over; the few that serving needs come back on first use, from
    the page cache. Returns how many mappings were advised (0 where ``MADV_PAGEOUT`` is unknown)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except (OSError, AttributeError):
        return 0
    advised = 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and "w" not in fields[1]:
            start, end = (int(part, 16) for part in fields[0].split("-"))
            if madvise(start, end - start, _MADV_PAGEOUT) == 0:
                advised += 1
            elif not advised:
                return 0  # the first one refused: an older kernel, nothing to gain
    return advised
