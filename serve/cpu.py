"""How many CPU cores this process may use, whether one would sit idle right now, and a brief spin.

Two processes poll briefly before they sleep, but only while the cores are not all wanted: an
inference worker that has just answered a lone request polls for the next one
(``SIMPLENN_WORKER_SPIN_US``), and an API server that has sent the only request in flight polls for its
answer (``SIMPLENN_API_SPIN_US``). A sleeping process on a virtual machine pays for its wake-up (an idle
virtual CPU halts, and comes back with cold caches: measured here, the same request costs the worker
~80 µs of CPU back to back and ~160-230 µs after a 0.3-1 ms sleep), which is most of the gap to an
in-process server at one connection. Under load the other processes keep every core busy and nothing
spins, so spinning takes no CPU from the HTTP servers. Under a CPU quota smaller than the cores (a
container's or pod's CPU limit) nothing spins either: a spin would spend the quota, and the kernel then
stops the whole container until its next period.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_CGROUP_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu"))  # a container's own view (v2, v1)


def cpus_from_quota(text: str) -> float | None:
    """The cores a cgroup v2 ``cpu.max`` allows (``"150000 100000"`` -> 1.5), None without a quota."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return int(fields[0]) / int(fields[1])


def cpu_cgroup_dirs(mountinfo: str, cgroups: str) -> list[Path]:
    """The directories of a process's CPU cgroups (v2, and v1's ``cpu`` controller), each followed by its
    ancestors up to the mount, from the texts of ``/proc/self/mountinfo`` and ``/proc/self/cgroup``. A
    limit set on a parent (a Kubernetes pod's, around its containers) binds the children too."""
    paths: dict[str, str] = {}
    for line in cgroups.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            if parts[0] == "0" and not parts[1]:
                paths["cgroup2"] = parts[2]
            elif "cpu" in parts[1].split(","):
                paths["cgroup"] = parts[2]
    dirs: list[Path] = []
    for line in mountinfo.splitlines():
        mount_fields, _, fs_fields = (part.split() for part in line.partition(" - "))
        if len(mount_fields) < 5 or len(fs_fields) < 3 or fs_fields[0] not in paths:
            continue
        if fs_fields[0] == "cgroup" and "cpu" not in fs_fields[2].split(","):
            continue
        mount = Path(mount_fields[4])
        inside = os.path.relpath(paths[fs_fields[0]], mount_fields[3])
        directory = mount if inside.startswith("..") else mount / inside  # outside the mount's view: its root
        while directory != mount and mount in directory.parents:
            dirs.append(directory)
            directory = directory.parent
        dirs.append(mount)
    return dirs


def quota_in(directory: Path) -> float | None:
    """The cores a cgroup directory's CPU quota allows (v2 ``cpu.max``, else v1 CFS), None without one."""
    try:
        return cpus_from_quota((directory / "cpu.max").read_text())
    except (OSError, ValueError):
        pass
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        return quota / int((directory / "cpu.cfs_period_us").read_text()) if quota > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None


def container_quota() -> float | None:
    """The tightest CPU quota on this process, in cores: its cgroup's or an ancestor's (a container's or
    pod's CPU limit, a systemd ``CPUQuota=``), None without one."""
    try:
        with open("/proc/self/mountinfo") as mountinfo, open("/proc/self/cgroup") as cgroups:
            dirs = cpu_cgroup_dirs(mountinfo.read(), cgroups.read())
    except OSError:
        dirs = []
    quotas = [quota for directory in (*dirs, *_CGROUP_ROOTS) if (quota := quota_in(directory)) is not None]
    return min(quotas, default=None)


def quota_leaves_room_to_spin(quota: float | None) -> bool:
    """False when a CPU quota (from :func:`container_quota`) allows fewer cores than this process may run
    on: a spin then spends the quota that requests need, and the kernel stops the whole container until
    its next period (measured at one connection under a 1.5-core quota: p99 18 ms with spins, 1 ms
    without)."""
    return quota is None or quota >= len(os.sched_getaffinity(0))


def usable_cpus(quota: float | None) -> int:
    """The cores this process may run on: its affinity, capped by a CPU quota (from :func:`container_quota`;
    at least 1)."""
    cpus = len(os.sched_getaffinity(0))
    return max(1, min(cpus, math.floor(quota))) if quota is not None else cpus


def runnable_others(loadavg: str) -> int:
    """Processes ready to run besides the caller, from ``/proc/loadavg`` (its 4th field is running/total)."""
    return int(loadavg.split()[3].split("/")[0]) - 1


def open_loadavg() -> int | None:
    """A descriptor on ``/proc/loadavg`` to read with :func:`room_to_spin`, None where there is none."""
    try:
        return os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def room_to_spin(cpus: int, loadavg_fd: int | None = None) -> bool:
    """True when no more processes than ``cpus`` want to run besides this one, so that a brief spin takes
    no core from work that is waiting. The count is the kernel's instant one (``/proc/loadavg``), which
    includes the other spinner and short-lived kernel threads: the stricter "fewer than ``cpus``" refused
    most spins at one connection (measured: 1.02x KServe's requests/s against 1.19x), and under load (16
    or 64 connections) both rules refuse alike.

    With ``loadavg_fd`` (from :func:`open_loadavg`) it costs one system call, ``pread`` (the kernel
    writes the file anew at each read from offset 0), instead of the seven of opening and reading it."""
    try:
        if loadavg_fd is None:
            with open("/proc/loadavg") as f:
                return runnable_others(f.read()) <= cpus
        return runnable_others(os.pread(loadavg_fd, 128, 0).decode()) <= cpus
    except (OSError, ValueError, IndexError):
        return False


class Spin:
    """A brief poll before a process sleeps: up to ``seconds``, and only if there is room to spin when it
    starts (:func:`room_to_spin`; under load nothing spins). Never under a CPU quota smaller than the cores
    (:func:`quota_leaves_room_to_spin`). Checking again at every round was measured
    worse: two spinning processes each saw the other and the client as wanting a core, and both slept."""

    def __init__(self, seconds: float) -> None:
        quota = container_quota()
        self.seconds = seconds if quota_leaves_room_to_spin(quota) else 0.0
        self.cpus = usable_cpus(quota)
        self.loadavg_fd = open_loadavg() if self.seconds else None

    def until(self, poll: Callable[[], T]) -> T | None:
        """``poll()``'s first truthy result, polled for up to ``seconds`` (no sleep); None after ``seconds``,
        at once when another process wants a core, or when spinning is off."""
        if not self.seconds or not room_to_spin(self.cpus, self.loadavg_fd):
            return None
        deadline = time.perf_counter() + self.seconds
        while not (result := poll()):
            if time.perf_counter() >= deadline:
                return None
            os.sched_yield()  # a process woken on this core runs now, not after the spin (p99 1.05 -> 0.84 ms)
        return result
