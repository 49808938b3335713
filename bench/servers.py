"""Server processes for the harness: start on a free loopback port, wait until ready, account
CPU time over the whole process tree, and stop the whole tree.

Each server runs in its own session (``start_new_session=True``), so its process group holds it
and every worker it forks; stopping sends SIGTERM to the group, waits, then SIGKILLs whatever is
left (including descendants that left the group). Output goes to a log file whose tail is shown
when a server fails to start.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ServerStartError(RuntimeError):
    """A server exited or did not become ready in time; the message has its log tail."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server. ``{host}``, ``{port}`` and ``{grpc_port}`` in argv and env values are filled in."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/health/ready"
    ready_timeout_s: float = 60.0


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class ProcStat(NamedTuple):
    """The parts of /proc/<pid>/stat the harness uses."""

    ppid: int
    pgrp: int
    ticks: int  # utime + stime + cutime + cstime (reaped children count in their parent)
    start: int  # start time in ticks since boot: tells a live process from a reused pid


def _read_proc_stats() -> dict[int, ProcStat]:
    """A ProcStat for every process in /proc, by pid."""
    stats: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:  # the process ended while we looked
            continue
        # Fields after "(comm)", numbered as in proc(5): state(3) ppid(4) pgrp(5) ...
        # utime(14) stime(15) cutime(16) cstime(17) ... starttime(22).
        fields = raw[raw.rindex(b")") + 2 :].split()
        stats[int(entry)] = ProcStat(
            ppid=int(fields[1]),
            pgrp=int(fields[2]),
            ticks=sum(int(x) for x in fields[11:15]),
            start=int(fields[19]),
        )
    return stats


def process_tree(root: int, stats: dict[int, ProcStat] | None = None) -> set[int]:
    """The pids in ``root``'s process group plus all of ``root``'s descendants."""
    stats = _read_proc_stats() if stats is None else stats
    tree = {pid for pid, st in stats.items() if st.pgrp == root}
    tree.add(root)
    grew = True
    while grew:
        children = {pid for pid, st in stats.items() if st.ppid in tree} - tree
        tree |= children
        grew = bool(children)
    return tree & stats.keys()


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of ``root``'s whole process tree, counting reaped children (cutime+cstime)."""
    stats = _read_proc_stats()
    return sum(stats[pid].ticks for pid in process_tree(root, stats)) / CLK_TCK


class RunningServer:
    """One server's process group: ``launch()``, ``wait_ready()``, and always ``stop()``."""

    def __init__(self, spec: ServerSpec, log_dir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.grpc_port = free_port()  # SIMPLENN_GRPC_PORT unless the spec says: parallel servers never share 8001
        self.log_path = log_dir / f"{spec.name}.log"
        self.startup_s: float | None = None
        self._began = 0.0
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "server not launched"
        return self._proc.pid

    def _fill(self, text: str) -> str:
        filled = text.replace("{host}", HOST).replace("{port}", str(self.port))
        return filled.replace("{grpc_port}", str(self.grpc_port))

    def launch(self) -> None:
        """Start the process in a new session (its own process group); do not wait."""
        argv = [self._fill(arg) for arg in self.spec.argv]
        env = {**os.environ, "SIMPLENN_GRPC_PORT": str(self.grpc_port),
               **{k: self._fill(v) for k, v in self.spec.env.items()}}
        self._began = time.monotonic()
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        """Poll ``GET ready_path`` until it answers 200; ServerStartError on exit or timeout."""
        while time.monotonic() - self._began < self.spec.ready_timeout_s:
            if not self.alive():
                code = self._proc.returncode if self._proc else None
                raise ServerStartError(
                    f"{self.spec.name} exited with code {code} before it was ready; log tail:\n{self.log_tail()}"
                )
            if self.request("GET", self.spec.ready_path)[0] == 200:
                self.startup_s = time.monotonic() - self._began
                return
            time.sleep(0.2)
        raise ServerStartError(
            f"{self.spec.name} not ready after {self.spec.ready_timeout_s:.0f} s"
            f" (GET {self.spec.ready_path}); log tail:\n{self.log_tail()}"
        )

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout_s: float = 5.0
    ) -> tuple[int | None, bytes]:
        """One HTTP request: (status, body), or (None, b"") when the server does not answer."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout_s)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            return None, b""
        finally:
            conn.close()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server's whole process tree."""
        return tree_cpu_seconds(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the process group, wait up to ``grace_s``, then SIGKILL every leftover."""
        if self._proc is None:
            return
        root = self._proc.pid
        before = _read_proc_stats()
        tree = {pid: before[pid].start for pid in process_tree(root, before) if pid != root}
        _signal_group(root, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=grace_s)
        _signal_group(root, signal.SIGKILL)
        now = _read_proc_stats()
        for pid, start in tree.items():  # descendants that left the group, if still the same
            if pid in now and now[pid].start == start:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self._proc.wait(timeout=grace_s)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a process group that may already be gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
