"""How many CPU cores this process may use, and whether one would sit idle right now.

An inference worker that has just answered spins briefly for the next request before it sleeps
(``SIMPLENN_WORKER_SPIN_US``), but only while a core would otherwise be idle: a sleeping process on a
virtual machine pays for its wake-up in cold caches (measured here: the same request costs the worker
~80 µs of CPU back to back and ~160-230 µs after a 0.3-1 ms sleep), which is most of the gap to an
in-process server at one connection. Under load the other processes keep every core busy and the
worker never spins, so spinning takes no CPU from the HTTP servers.
"""

from __future__ import annotations

import math
import os
import selectors
import time
from pathlib import Path

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # cgroup v1: microseconds, -1 without a quota
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cpus_from_quota(text: str) -> float | None:
    """The cores a cgroup v2 ``cpu.max`` allows (``"150000 100000"`` -> 1.5), None without a quota."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return int(fields[0]) / int(fields[1])


def container_quota() -> float | None:
    """The cores the container's CPU quota allows (cgroup v2, else v1), None without one."""
    try:
        return cpus_from_quota(_CGROUP_CPU_MAX.read_text())
    except (OSError, ValueError):
        pass
    try:
        quota = int(_CGROUP_V1_QUOTA.read_text())
        return quota / int(_CGROUP_V1_PERIOD.read_text()) if quota > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None


def usable_cpus() -> int:
    """The cores this process may run on: its affinity, capped by its container's CPU quota (at least 1)."""
    cpus = len(os.sched_getaffinity(0))
    quota = container_quota()
    return max(1, min(cpus, math.floor(quota))) if quota is not None else cpus


def runnable_others(loadavg: str) -> int:
    """Processes ready to run besides the caller, from ``/proc/loadavg`` (its 4th field is running/total)."""
    return int(loadavg.split()[3].split("/")[0]) - 1


def core_would_idle(cpus: int) -> bool:
    """True when fewer processes than ``cpus`` want to run besides this one (a spin would use idle time)."""
    try:
        with open("/proc/loadavg") as f:
            return runnable_others(f.read()) < cpus
    except (OSError, ValueError, IndexError):
        return False


class Spin:
    """A worker's brief poll before it sleeps: up to ``seconds``, only while a core would otherwise idle."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.cpus = seconds, usable_cpus()

    def poll(self, selector: selectors.BaseSelector) -> list[tuple[selectors.SelectorKey, int]]:
        """The selector's events if some come within ``seconds`` (polled, no sleep), else [] at once when a
        spin would take a core another process wants, or after ``seconds``."""
        if not self.seconds or not core_would_idle(self.cpus):
            return []
        deadline = time.perf_counter() + self.seconds
        while time.perf_counter() < deadline:
            if events := selector.select(0):
                return events
        return []
