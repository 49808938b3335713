"""Servers as processes, for the harness and the tests: start on a free loopback port, wait until
ready, find the server's processes in /proc, account CPU time and memory (PSS) over the whole process
tree, and stop the whole tree.

Each server runs in its own session (``start_new_session=True``), so its process group holds it
and every worker it forks; stopping sends SIGTERM (to the group, or to the main process alone for a
drain as docker and Kubernetes do it), waits, then SIGKILLs the group and every descendant that left
it. Output goes to a log file whose tail is shown when a server fails to start. Every server gets a
free gRPC port of its own (``SIMPLENN_GRPC_PORT``), so servers started side by side never share 8001.

:class:`ProcessGroup` starts, logs and stops one such process; :func:`http_request` sends one
request; :class:`RunningServer` is a server from a :class:`ServerSpec` on top of both: its ports,
readiness, and the CPU time and memory of its process tree. This is the one home of these helpers:
``bench/run.py``, ``bench/faults.py``, ``bench/reload.py``, ``bench/soak.py`` and the tests
(``tests/conftest.py``'s ``ServerProcess``) all use them.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ServerStartError(RuntimeError):
    """A server exited or did not become ready in time; the message has its log tail."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server. ``{host}``, ``{port}`` and ``{grpc_port}`` in the name, argv and env
    values are filled in (the log file is ``<log_dir>/<name>.log``)."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/health/ready"
    ready_timeout_s: float = 60.0
    ready_body: bytes | None = None  # set: ready when a POST of this JSON body to ready_path answers 200


def serve_spec(name: str, env: Mapping[str, str] | None = None, args: Sequence[str] = (),
               ready_timeout_s: float = 60.0) -> ServerSpec:
    """``python -m serve`` (this checkout) on ``{host}:{port}`` with gRPC on ``{grpc_port}`` and unbuffered
    output; ``env`` adds to and overrides that."""
    return ServerSpec(name, [sys.executable, "-m", "serve", *args],
                      {"SIMPLENN_HOST": "{host}", "SIMPLENN_PORT": "{port}", "SIMPLENN_GRPC_PORT": "{grpc_port}",
                       "PYTHONUNBUFFERED": "1", **(env or {})},
                      ready_timeout_s=ready_timeout_s)


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# -- processes, from /proc ------------------------------------------------------------------------------


class ProcStat(NamedTuple):
    """The parts of /proc/<pid>/stat the harness uses."""

    state: str  # R, S, D, T, Z, ...: Z is a zombie (ended, not yet reaped by its parent)
    ppid: int
    pgrp: int
    ticks: int  # utime + stime + cutime + cstime (reaped children count in their parent)
    start: int  # start time in ticks since boot: tells a live process from a reused pid


def proc_stat(pid: int) -> ProcStat | None:
    """The ProcStat of one process, None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:  # no such process, or it ended while we looked
        return None
    # Fields after "(comm)", numbered as in proc(5): state(3) ppid(4) pgrp(5) ...
    # utime(14) stime(15) cutime(16) cstime(17) ... starttime(22).
    fields = raw[raw.rindex(b")") + 2 :].split()
    return ProcStat(
        state=fields[0].decode(),
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        ticks=sum(int(x) for x in fields[11:15]),
        start=int(fields[19]),
    )


def _read_proc_stats() -> dict[int, ProcStat]:
    """A ProcStat for every process in /proc, by pid."""
    stats: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := proc_stat(int(entry))) is not None:
            stats[int(entry)] = st
    return stats


def cmdline(pid: int) -> bytes | None:
    """A process's command line (arguments separated by NUL bytes), None when it does not exist."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a SIGKILLed child stays a zombie until it is reaped)."""
    st = proc_stat(pid)
    return st is not None and st.state != "Z"


def process_tree(root: int, stats: dict[int, ProcStat] | None = None) -> set[int]:
    """``root`` and the pids in its process group plus all of their descendants (zombies included:
    filter with :func:`alive`)."""
    stats = _read_proc_stats() if stats is None else stats
    tree = {pid for pid, st in stats.items() if st.pgrp == root}
    tree.add(root)
    grew = True
    while grew:
        children = {pid for pid, st in stats.items() if st.ppid in tree} - tree
        tree |= children
        grew = bool(children)
    return tree & stats.keys()


def children(parent: int) -> dict[int, bytes]:
    """The live (not zombie) children of ``parent``, with their command lines."""
    found: dict[int, bytes] = {}
    for pid, st in _read_proc_stats().items():
        if st.ppid == parent and st.state != "Z" and (cmd := cmdline(pid)) is not None:
            found[pid] = cmd
    return found


def worker_pids(main_pid: int) -> set[int]:
    """A server's inference workers: spawned children of its main process (``spawn_main`` in the command line)."""
    return {pid for pid, cmd in children(main_pid).items() if b"spawn_main" in cmd}


def api_server_pids(main_pid: int) -> set[int]:
    """A server's API servers: forked children of its main process (the main process's command line)."""
    main_cmd = cmdline(main_pid)
    return {pid for pid, cmd in children(main_pid).items() if cmd == main_cmd}


def pss_bytes(pid: int) -> int | None:
    """A process's proportional set size (its private memory plus its share of shared pages), from
    /proc/<pid>/smaps_rollup; None when it is gone or unreadable."""
    memory = memory_bytes(pid)
    return None if memory is None else memory[0]


def memory_bytes(pid: int) -> tuple[int, int] | None:
    """(PSS, RSS) of a process from /proc/<pid>/smaps_rollup; None when it is gone or unreadable."""
    found: dict[bytes, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith((b"Pss:", b"Rss:")):
                    found[line[:3]] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return (found[b"Pss"], found[b"Rss"]) if len(found) == 2 else None


def role_memory(main_pid: int) -> dict[str, dict[str, float]]:
    """A project server's memory by process role (supervisor, API servers, inference workers, other
    children such as multiprocessing's resource tracker): processes, PSS and RSS summed, in MiB."""
    workers, apis = worker_pids(main_pid), api_server_pids(main_pid)
    roles: dict[str, dict[str, float]] = {}
    for pid in process_tree(main_pid):
        role = ("supervisor" if pid == main_pid else "inference workers" if pid in workers
                else "API servers" if pid in apis else "other")
        memory = memory_bytes(pid) if alive(pid) else None
        if memory is not None:
            entry = roles.setdefault(role, {"processes": 0, "pss_mib": 0.0, "rss_mib": 0.0})
            entry["processes"] += 1
            entry["pss_mib"] += memory[0] / 2**20
            entry["rss_mib"] += memory[1] / 2**20
    return roles


def tree_pss_bytes(root: int) -> int:
    """The PSS of ``root``'s whole live process tree, summed: shared pages count once in all."""
    stats = _read_proc_stats()
    return sum(pss_bytes(pid) or 0 for pid in process_tree(root, stats) if stats[pid].state != "Z")


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of ``root``'s whole process tree, counting reaped children (cutime+cstime)."""
    stats = _read_proc_stats()
    return sum(stats[pid].ticks for pid in process_tree(root, stats)) / CLK_TCK


# -- one process group: start, log, stop -------------------------------------------------------------------


class ProcessGroup:
    """One process started in a session of its own (so its process group holds it and every process it
    forks), its output in a log file: ``start()``, and always ``stop()``.

    ``stop()`` waits ``stop_grace_s`` after SIGTERM, which goes to the whole group, or to the main process
    alone when ``term_group`` is false; then it SIGKILLs the group and every descendant that left it.
    """

    stop_grace_s = 5.0
    term_group = True

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.launched_at = 0.0  # monotonic time of start()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The main process's pid (AssertionError before ``start()``)."""
        assert self.proc is not None, "process not started"
        return self.proc.pid

    def start(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        """Start ``argv`` with exactly ``env`` in a new session, in the repository root; do not wait."""
        self.launched_at = time.monotonic()
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                list(argv),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
            )

    def alive(self) -> bool:
        """The main process was started and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout_s: float = 60) -> int:
        """The main process's exit status; subprocess.TimeoutExpired when it runs on."""
        assert self.proc is not None, "process not started"
        return self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        """The whole log so far."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log, or ``(no log)`` when it cannot be read."""
        try:
            text = self.log()
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM, wait up to ``grace_s`` (default ``stop_grace_s``), then SIGKILL the process group and every
        descendant that left it. Returns the main process's exit status; safe to call again."""
        if self.proc is None:
            return None
        proc, root = self.proc, self.proc.pid
        before = _read_proc_stats()
        tree = {pid: before[pid].start for pid in process_tree(root, before) if pid != root}
        # Once the main process is reaped its pid may be reused: signal its group only while a member is left.
        group = proc.poll() is None or any(st.pgrp == root for st in before.values())
        if proc.poll() is None and not self.term_group:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        elif group:
            _signal_group(root, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=self.stop_grace_s if grace_s is None else grace_s)
        if group:
            _signal_group(root, signal.SIGKILL)
        _kill_if_same(tree)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        return proc.returncode


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a process group that may already be gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_if_same(started: Mapping[int, int]) -> None:
    """SIGKILL each pid of ``started`` (pid -> start time) that is still the process that had that start time
    (descendants that left the process group)."""
    now = _read_proc_stats()
    for pid, start in started.items():
        if pid in now and now[pid].start == start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


# -- requests ---------------------------------------------------------------------------------------------


def http_request(
    port: int, method: str, path: str, body: bytes | None = None, timeout_s: float = 5.0,
    headers: Mapping[str, str] | None = None,
) -> tuple[int | None, bytes]:
    """One HTTP request to ``127.0.0.1:port`` on a connection of its own: (status, body), or (None, b"") when
    the server does not answer. A body goes with ``headers``, by default ``Content-Type: application/json``."""
    if headers is None:
        headers = {"Content-Type": "application/json"} if body is not None else {}
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        conn.close()


# -- one server ---------------------------------------------------------------------------------------------


class RunningServer(ProcessGroup):
    """One server from a :class:`ServerSpec` (a :class:`ProcessGroup`): ``launch()``, ``wait_ready()``, and
    always ``stop()``; then ``request()`` it and measure its process tree (``cpu_seconds()``, ``pss_bytes()``).

    ``url`` is ``http://127.0.0.1:<port>``; ``grpc_port`` is a free port given as ``SIMPLENN_GRPC_PORT``
    unless the spec sets a number of its own.
    """

    def __init__(self, spec: ServerSpec, log_dir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        explicit = spec.env.get("SIMPLENN_GRPC_PORT", "{grpc_port}")
        self.grpc_port = free_port() if "{" in explicit else int(explicit)
        self.url = f"http://{HOST}:{self.port}"
        self.startup_s: float | None = None  # launch to the first ready answer
        super().__init__(log_dir / f"{self._fill(spec.name)}.log")

    @property
    def grpc_target(self) -> str:
        """``127.0.0.1:<grpc_port>``."""
        return f"{HOST}:{self.grpc_port}"

    def _fill(self, text: str) -> str:
        filled = text.replace("{host}", HOST).replace("{port}", str(self.port))
        return filled.replace("{grpc_port}", str(self.grpc_port))

    def launch(self) -> None:
        """Start the spec's command (placeholders filled) in a new session; do not wait."""
        self.start([self._fill(arg) for arg in self.spec.argv],
                   {**os.environ, "SIMPLENN_GRPC_PORT": str(self.grpc_port),
                    **{k: self._fill(v) for k, v in self.spec.env.items()}})

    def wait_ready(self, timeout_s: float | None = None) -> RunningServer:
        """Poll ``GET ready_path`` (a POST of ``ready_body`` when the spec has one) until it answers 200: for
        ``timeout_s`` from now, or by default until the spec's ready timeout after the launch. ServerStartError
        on exit or timeout. ``startup_s`` is the time from the launch to the first ready answer."""
        if timeout_s is None:
            timeout_s, deadline = self.spec.ready_timeout_s, self.launched_at + self.spec.ready_timeout_s
        else:
            deadline = time.monotonic() + timeout_s
        method = "GET" if self.spec.ready_body is None else "POST"
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise ServerStartError(
                    f"{self.spec.name} exited with code {code} before it was ready; log tail:\n{self.log_tail()}"
                )
            if self.request(method, self.spec.ready_path, self.spec.ready_body, timeout_s=1.0)[0] == 200:
                if self.startup_s is None:
                    self.startup_s = time.monotonic() - self.launched_at
                return self
            time.sleep(0.1)
        raise ServerStartError(
            f"{self.spec.name} not ready after {timeout_s:.0f} s"
            f" ({method} {self.spec.ready_path}); log tail:\n{self.log_tail()}"
        )

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout_s: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int | None, bytes]:
        """One HTTP request to this server (:func:`http_request`): (status, body), or (None, b"")."""
        return http_request(self.port, method, path, body, timeout_s, headers)

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server's whole process tree."""
        return tree_cpu_seconds(self.pid)

    def pss_bytes(self) -> int:
        """Memory (PSS) of the server's whole process tree now."""
        return tree_pss_bytes(self.pid)
