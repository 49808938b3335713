"""Hot-reload measurements against the real server, under a bounded concurrent load.

Starts ``python -m serve`` on a free 127.0.0.1 port with ``SIMPLENN_WEIGHTS`` pointing at a temporary
copy of the weights (default reload settings unless flags say otherwise), runs ``--clients`` client
threads sending single-row ``/predict`` requests at a capped total ``--rate``, and measures:

1. **reload time**: from the atomic rename (``os.replace`` of a new state_dict written with
   ``torch.save``) to the first answer that carries the new ``model_version``, and to the moment
   after which every answer carries it; p50/p99 over ``--swaps`` swaps (a pause between swaps);
2. **latency during swaps vs steady state**: p99 of requests sent from each rename until
   ``--window-after-s`` after its first new-version answer, against p99 of a swap-free
   ``--steady-s`` period before, as a ratio;
3. **RSS** of every server process (main, LitServe's manager, inference worker(s), API servers,
   resource tracker; from /proc) before and after ``--rss-swaps`` back-to-back swaps, with growth;
4. **errors**: any answer that is not 200, no answer, an unknown version, or an output that differs
   from the in-process model of the version the answer names. Must be 0.

Prints a table and writes ``bench/results/reload-<UTC time>.json``. The whole run is bounded by
``--max-seconds`` (the RSS phase stops early, and says so, when it would run past it). Exit status 1
when there were errors or a swap was never served. ``bench/soak.py`` reuses the helpers here.

    .venv/bin/python bench/reload.py                 # 25 swaps, 500 RSS swaps, about 5 minutes
    .venv/bin/python bench/reload.py --fast          # 20 swaps, 100 RSS swaps, about 1.5 minutes
    .venv/bin/python bench/reload.py --workers 2 --clients 16 --rate 800
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # as a script: import models

from bench.clients import ClientThreads  # noqa: E402
from bench.servers import HOST, RunningServer, cmdline, process_tree, serve_spec  # noqa: E402
from models.simple_nn import SimpleNN  # noqa: E402
from serve.versions import version_of  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHIPPED_WEIGHTS = ROOT / "weights" / "model.pth"
FEATURES = 10


# -- weights --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """A weights file's version id (first 12 hex digits of its sha256, as the server names it) and
    the parameters to compute its expected outputs here."""

    version: str
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    @classmethod
    def of(cls, data: bytes, state: dict[str, torch.Tensor]) -> Version:
        p = {k: v.detach().numpy().astype(np.float32) for k, v in state.items()}
        return cls(version_of(data)[0], p["fc1.weight"], p["fc1.bias"], p["fc2.weight"],
                   p["fc2.bias"])

    def expected(self, row: np.ndarray) -> float:
        hidden = np.maximum(row @ self.w1.T + self.b1, 0)
        return float((hidden @ self.w2.T + self.b2)[0])


def load_version(path: Path) -> Version:
    data = path.read_bytes()
    return Version.of(data, torch.load(path, map_location="cpu", weights_only=True))


def publish(path: Path, seed: int) -> tuple[float, Version]:
    """Write a new SimpleNN state_dict (weights drawn from ``seed``) next to ``path`` with torch.save,
    then rename it over ``path``. Returns (monotonic time of the rename, its Version)."""
    torch.manual_seed(seed)
    state = SimpleNN().state_dict()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden + .tmp: never a candidate itself
    torch.save(state, tmp)
    version = Version.of(tmp.read_bytes(), state)
    renamed = time.monotonic()
    os.replace(tmp, path)
    return renamed, version


class Publisher:
    """New weights over one live file, one seed after the other (``next()``), and every version so far by id
    (``versions``, which a :class:`Load` reads to judge answers): the file's own version to begin with."""

    def __init__(self, weights: Path, seed: int) -> None:
        self.weights, self.seed = weights, seed
        initial = load_version(weights)
        self.versions: dict[str, Version] = {initial.version: initial}

    def next(self) -> tuple[float, Version]:
        """:func:`publish` the next seed's weights: (monotonic time of the rename, its Version)."""
        self.seed += 1
        renamed, version = publish(self.weights, self.seed)
        self.versions[version.version] = version
        return renamed, version


# -- the server and its processes -----------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class Server(RunningServer):
    """``python -m serve`` on ``weights`` (``bench.servers.RunningServer``, launched at once), logging to
    ``<workdir>/server.log``. ``stop()`` SIGTERMs the main process alone, as docker and Kubernetes do (it
    drains and stops its children), waits up to 30 s, then SIGKILLs the process group and anything that
    left it."""

    stop_grace_s = 30.0
    term_group = False

    def __init__(self, workdir: Path, weights: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        spec = serve_spec("server", {"SIMPLENN_WEIGHTS": str(weights), "SIMPLENN_STATE_DIR": str(workdir / "state"),
                                     **(env or {})}, args or (), ready_timeout_s=120)
        super().__init__(spec, workdir)
        self.launch()

    def processes(self) -> dict[int, str]:
        """Every live server process, by pid, with a role: main, api, worker-N, manager, resource-tracker."""
        log_pids: dict[int, str] = {}
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    msg, pid = str(entry.get("msg", "")), entry.get("pid")
                    if msg.startswith("Started server process") and pid:
                        log_pids[int(pid)] = "api"
                    elif (found := re.match(r"worker (\d+) now serves", msg)) and pid:
                        log_pids[int(pid)] = f"worker-{found.group(1)}"
        roles: dict[int, str] = {}
        for pid in sorted(process_tree(self.pid)):
            raw = cmdline(pid)
            if raw is None:
                continue
            command = raw.replace(b"\0", b" ").decode(errors="replace")
            if pid == self.proc.pid:
                role = "main"
            elif pid in log_pids:
                role = log_pids[pid]
            elif "resource_tracker" in command:
                role = "resource-tracker"
            elif "multiprocessing.spawn" in command:
                role = "worker"
            else:
                role = "manager"  # LitServe's multiprocessing manager (forked, like the API servers)
            roles[pid] = role
        # API servers in pid order get numbers: api-1, api-2, ...
        for number, pid in enumerate(sorted(p for p, r in roles.items() if r == "api"), start=1):
            roles[pid] = f"api-{number}"
        return roles

    def snapshot(self) -> dict[str, dict[str, int | None]]:
        """RSS (KiB) and open file descriptors of every server process, keyed ``role (pid)``."""
        return {f"{role} ({pid})": {"pid": pid, "rss_kib": rss_kib(pid), "fds": open_fds(pid)}
                for pid, role in sorted(self.processes().items(), key=lambda item: _role_order(item[1]))}


def _role_order(role: str) -> tuple[int, str]:
    order = ["main", "manager", "worker", "api", "resource-tracker"]
    return next((i for i, prefix in enumerate(order) if role.startswith(prefix)), len(order)), role


def start_server(prefix: str, args: argparse.Namespace, env: dict[str, str]) -> tuple[Path, Path, Server]:
    """A scratch folder (``<prefix>...`` in the temporary directory), a copy of ``args.weights`` in it
    (``live/model.pth``), and a :class:`Server` launched on that copy with ``env`` and ``args.server_args``:
    (folder, weights, server). The caller waits for it to be ready and always stops it."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    weights = workdir / "live" / "model.pth"
    weights.parent.mkdir()
    shutil.copyfile(args.weights, weights)
    return workdir, weights, Server(workdir, weights, env, args.server_args.split() if args.server_args else None)


def start_load(server: Server, weights: Path, args: argparse.Namespace, seed: int) -> tuple[Publisher, Load]:
    """Once ``server`` is ready: half a second for every API server to be up, then a :class:`Publisher` on
    ``weights`` from ``seed`` and the started :class:`Load` of ``args.clients`` and ``args.rate`` judging by
    its versions."""
    time.sleep(0.5)  # all API servers up
    publisher = Publisher(weights, seed)
    return publisher, Load(server.port, args.clients, args.rate, publisher.versions).start()


# -- the load ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    sent: float  # monotonic
    latency: float  # seconds
    status: int  # HTTP status, 0 for no answer
    version: str | None
    problem: str | None  # why this answer counts as an error, None when it is good


class Load(ClientThreads[Sample]):
    """``clients`` threads (:class:`~bench.clients.ClientThreads`), each with one keep-alive connection,
    sending ``{"input": row}`` to /predict at ``rate / clients`` requests per second each (``rate`` 0: as fast
    as answers come), each answer judged by :func:`exchange`. ``first_seen``: version -> monotonic time of
    its first good answer."""

    def __init__(self, port: int, clients: int, rate: float, versions: dict[str, Version]) -> None:
        self.port = port
        self.clients = clients
        self.interval = clients / rate if rate > 0 else 0.0
        self.versions = versions  # every version published so far, by id (read by the threads)
        self.first_seen: dict[str, float] = {}  # version -> monotonic time of its first good answer
        rng = np.random.default_rng(7)
        self.rows = rng.standard_normal((clients, FEATURES)).astype(np.float32)
        super().__init__(clients, "client", join_timeout_s=35)

    def _client(self, index: int) -> None:
        row = self.rows[index]
        body = json.dumps({"input": row.tolist()}).encode()
        samples = self.per_thread[index]
        conn: http.client.HTTPConnection | None = None
        pacer = Pacer(self.interval, self.stop_event)
        while not self.stop_event.is_set():
            if not pacer.wait():
                break
            if conn is None:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
            sent = time.monotonic()
            status, version, problem, reusable = exchange(conn, body, row, self.versions)
            if not reusable:
                conn.close()
                conn = None
            done = time.monotonic()
            if version is not None and problem is None:
                self.first_seen.setdefault(version, done)
            samples.append(Sample(sent, done - sent, status, version, problem))
        if conn is not None:
            conn.close()

    def all_samples(self) -> list[Sample]:
        """Every request so far, client by client."""
        return self.collected()

    def wait_for(self, version: str, timeout: float) -> float | None:
        """Monotonic time of the first answer carrying ``version``, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.first_seen.get(version)
            if seen is not None:
                return seen
            time.sleep(0.002)
        return None


class Pacer:
    """One client's send times, ``interval`` seconds apart (0: no pacing); a client that falls behind sends
    at once, catching up at most one interval's worth."""

    def __init__(self, interval: float, stop_event: threading.Event) -> None:
        self.interval, self.stop_event = interval, stop_event
        self.next_send = time.monotonic()

    def wait(self) -> bool:
        """Wait until the next send time; False when ``stop_event`` was set meanwhile."""
        if not self.interval:
            return True
        delay = self.next_send - time.monotonic()
        if delay > 0 and self.stop_event.wait(delay):
            return False
        self.next_send = max(self.next_send + self.interval, time.monotonic() - self.interval)
        return True


def exchange(conn: http.client.HTTPConnection, body: bytes, row: np.ndarray,
             versions: Mapping[str, Version]) -> tuple[int, str | None, str | None, bool]:
    """POST ``body`` (``{"input": row}``) to /predict on ``conn`` and judge the answer: (HTTP status, 0 for
    none; the version it names; why it is an error, None when it is good; whether ``conn`` may be used
    again). An error is a status other than 200, no answer, an unknown version, or an output that differs
    from ``versions[version]``'s for ``row``."""
    status, version = 0, None
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        status = response.status
        if status != 200:
            return status, version, f"HTTP {status}: {payload[:200]!r}", True
        answer = json.loads(payload)
        version = answer["model_version"]
        known = versions.get(version)
        if known is None:
            return status, version, f"unknown version {version}", True
        expected = known.expected(row)
        if not abs(answer["output"] - expected) <= 1e-5 + 1e-5 * abs(expected):
            return status, version, f"version {version}: output {answer['output']} != {expected}", True
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        return status, version, f"no answer: {type(exc).__name__}: {exc}", False
    return status, version, None, True


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def latency_summary(samples: list[Sample]) -> dict[str, Any]:
    ms = [s.latency * 1000 for s in samples if s.problem is None]
    return {"requests": len(samples), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "p999_ms": percentile(ms, 99.9), "max_ms": max(ms) if ms else None}


def error_summary(samples: list[Sample]) -> dict[str, Any]:
    problems = [s.problem for s in samples if s.problem is not None]
    kinds: dict[str, int] = {}
    for problem in problems:
        kind = problem.split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"requests": len(samples), "ok": len(samples) - len(problems), "errors": len(problems),
            "by_kind": kinds, "examples": problems[:5]}


# -- the measurement --------------------------------------------------------------------------------------


@dataclass
class Swap:
    version: str
    renamed: float
    first_answer: float | None = None
    all_answers: float | None = None

    @property
    def first_s(self) -> float | None:
        return None if self.first_answer is None else self.first_answer - self.renamed

    @property
    def all_s(self) -> float | None:
        return None if self.all_answers is None else self.all_answers - self.renamed


def settle_times(swaps: list[Swap], samples: list[Sample], last_end: float) -> None:
    """For each swap: when the last answer with another version came back (every later one is new),
    looking until the next swap's rename (``last_end`` for the last swap)."""
    done = sorted(((s.sent + s.latency, s.version) for s in samples if s.version), key=lambda item: item[0])
    times = [t for t, _ in done]
    for index, swap in enumerate(swaps):
        if swap.first_answer is None:
            continue
        end = swaps[index + 1].renamed if index + 1 < len(swaps) else last_end
        start = int(np.searchsorted(times, swap.renamed))
        last_old = swap.first_answer
        for t, version in done[start:]:
            if t >= end:
                break
            if version != swap.version:
                last_old = max(last_old, t)
        swap.all_answers = last_old


@dataclass
class Deadline:
    seconds: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)


def rss_table(before: dict[str, dict], after: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for key in list(before) + [k for k in after if k not in before]:
        b, a = before.get(key, {}).get("rss_kib"), after.get(key, {}).get("rss_kib")
        rows.append({"process": key, "before_mib": None if b is None else round(b / 1024, 1),
                     "after_mib": None if a is None else round(a / 1024, 1),
                     "growth_pct": None if not (a and b) else round(100 * (a - b) / b, 2),
                     "note": "" if (a and b) else ("gone" if b else "new")})
    return rows


@dataclass
class RssRun:
    """The RSS phase: snapshots before and after ``swaps`` back-to-back swaps (``unserved`` of them never
    served), whether ``--max-seconds`` cut it short, the total RSS every fifth of the way, and its seconds."""

    before: dict[str, dict]
    after: dict[str, dict] = field(default_factory=dict)
    swaps: int = 0
    unserved: int = 0
    capped: bool = False
    trend: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def timed_swaps(publisher: Publisher, load: Load, args: argparse.Namespace) -> list[Swap]:
    """``args.swaps`` swaps, each waited for (up to ``args.swap_timeout_s``) and followed by ``args.gap_s``."""
    swaps: list[Swap] = []
    print(f"{args.swaps} swaps, {args.gap_s:.1f} s apart ...", flush=True)
    for _ in range(args.swaps):
        renamed, version = publisher.next()
        swap = Swap(version.version, renamed)
        swaps.append(swap)
        swap.first_answer = load.wait_for(version.version, args.swap_timeout_s)
        if swap.first_answer is None:
            print(f"  version {version.version} not served after {args.swap_timeout_s:.0f} s", flush=True)
        time.sleep(args.gap_s)
    return swaps


def rss_swaps(server: Server, publisher: Publisher, load: Load, args: argparse.Namespace,
              deadline: Deadline) -> RssRun:
    """RSS before and after ``args.rss_swaps`` back-to-back swaps (fewer when ``deadline`` runs out)."""
    run = RssRun(server.snapshot())
    started = time.monotonic()
    print(f"{args.rss_swaps} back-to-back swaps for RSS ...", flush=True)
    for index in range(args.rss_swaps):
        if deadline.left() < args.swap_timeout_s + 10:
            run.capped = True
            print(f"  stopping after {index} swaps: --max-seconds {args.max_seconds:.0f} reached", flush=True)
            break
        _, version = publisher.next()
        if load.wait_for(version.version, args.swap_timeout_s) is None:
            run.unserved += 1
        run.swaps += 1
        if run.swaps % max(1, args.rss_swaps // 5) == 0:
            total = sum(v["rss_kib"] or 0 for v in server.snapshot().values())
            run.trend.append({"swaps": run.swaps, "total_rss_mib": round(total / 1024, 1),
                              "seconds": round(time.monotonic() - started, 1)})
            print(f"  {run.swaps} swaps, total RSS {total / 1024:.1f} MiB", flush=True)
    run.seconds = time.monotonic() - started
    time.sleep(1.0)
    run.after = server.snapshot()
    return run


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The whole run (see the module's docstring): the result as :func:`write_json` writes it, with the
    server's log under ``server_log``."""
    deadline = Deadline(args.max_seconds)
    env = {"SIMPLENN_LOG_LEVEL": "info", "SIMPLENN_WORKERS": str(args.workers)}
    if args.poll_interval is not None:
        env["SIMPLENN_POLL_INTERVAL_S"] = str(args.poll_interval)
    if args.debounce is not None:
        env["SIMPLENN_RELOAD_DEBOUNCE_S"] = str(args.debounce)
    workdir, weights, server = start_server("simplenn-reload-", args, env)
    load: Load | None = None
    try:
        startup = server.wait_ready().startup_s
        publisher, load = start_load(server, weights, args, seed=1000)
        time.sleep(args.warmup_s)
        print(f"server up in {startup:.1f} s (pid {server.pid}); steady state for {args.steady_s:.0f} s ...",
              flush=True)
        steady_from = time.monotonic()
        time.sleep(args.steady_s)
        steady_to = time.monotonic()
        swaps = timed_swaps(publisher, load, args)  # 1 + 2: reload time and latency around swaps
        time.sleep(1.0)
        timed_end = time.monotonic()
        rss = rss_swaps(server, publisher, load, args, deadline)  # 3: RSS before and after many swaps
        load.stop()
        samples = load.all_samples()
        alive = server.alive()
    finally:
        if load is not None:
            load.stop()
        code = server.stop()
    settle_times(swaps, samples, timed_end)
    result = {
        "kind": "reload",
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "server": {"startup_s": round(startup, 2), "alive_at_end": alive, "exit_code": code,
                   "processes_at_end": rss.after and list(rss.after)},
        "reload": reload_part(swaps),
        "latency": latency_part(samples, swaps, (steady_from, steady_to), timed_end, args),
        "rss": rss_part(rss),
        "requests": error_summary(samples) | {
            "seconds": round(samples[-1].sent - samples[0].sent, 1) if samples else 0},
    }
    result["server_log"] = server.log_path.read_text(errors="replace")  # written next to the JSON, then dropped
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def reload_part(swaps: list[Swap]) -> dict[str, Any]:
    """The result's ``reload``: swaps served, and the times from rename to the first and to every answer."""
    first = [s.first_s for s in swaps if s.first_s is not None]
    every = [s.all_s for s in swaps if s.all_s is not None]
    return {
        "swaps": len(swaps), "served": len(first), "not_served": len(swaps) - len(first),
        "first_answer_ms": {"p50": _ms(percentile(first, 50)), "p99": _ms(percentile(first, 99)),
                            "min": _ms(min(first, default=None)), "max": _ms(max(first, default=None))},
        "every_answer_ms": {"p50": _ms(percentile(every, 50)), "p99": _ms(percentile(every, 99)),
                            "max": _ms(max(every, default=None))},
        "per_swap_ms": [_ms(s.first_s) for s in swaps],
    }


def latency_part(samples: list[Sample], swaps: list[Swap], steady_span: tuple[float, float], timed_end: float,
                 args: argparse.Namespace) -> dict[str, Any]:
    """The result's ``latency``: requests around swaps against steady ones. Steady state is the swap-free
    ``steady_span``, plus the quiet part between one swap's window and the next rename (interleaved, so
    drift in the machine's other load hits both sides alike); ``timed_end`` ends the last swap's."""
    steady = [s for s in samples if steady_span[0] <= s.sent < steady_span[1]]
    windows: list[Sample] = []
    for index, swap in enumerate(swaps):
        end = (swap.first_answer or swap.renamed + args.swap_timeout_s) + args.window_after_s
        windows.extend(s for s in samples if swap.renamed <= s.sent < end)
        quiet_to = swaps[index + 1].renamed if index + 1 < len(swaps) else timed_end
        steady.extend(s for s in samples if end <= s.sent < quiet_to)
    steady_lat, swap_lat = latency_summary(steady), latency_summary(windows)
    ratio = (swap_lat["p99_ms"] / steady_lat["p99_ms"]) if steady_lat["p99_ms"] and swap_lat["p99_ms"] else None
    ratio999 = (swap_lat["p999_ms"] / steady_lat["p999_ms"]) if steady_lat["p999_ms"] and swap_lat["p999_ms"] else None
    return {"steady": steady_lat, "during_swaps": swap_lat, "p99_ratio": _round(ratio, 2),
            "p999_ratio": _round(ratio999, 2),
            "window": f"from each rename to {args.window_after_s:.1f} s after its first new-version answer",
            "steady_is": f"the {args.steady_s:.0f} s before the first swap and the time between windows"}


def rss_part(rss: RssRun) -> dict[str, Any]:
    """The result's ``rss``: per process and in total, before and after the RSS phase, with growth."""
    total_before = sum(v["rss_kib"] or 0 for v in rss.before.values())
    total_after = sum(v["rss_kib"] or 0 for v in rss.after.values())
    return {"swaps": rss.swaps, "not_served": rss.unserved, "capped_by_max_seconds": rss.capped,
            "seconds": round(rss.seconds, 1), "per_process": rss_table(rss.before, rss.after),
            "total_before_mib": round(total_before / 1024, 1), "total_after_mib": round(total_after / 1024, 1),
            "total_growth_pct": (round(100 * (total_after - total_before) / total_before, 2)
                                 if total_before else None),
            "trend": rss.trend, "before": rss.before, "after": rss.after}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.1f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def print_report(result: dict[str, Any]) -> None:
    r, lat, rss, req = result["reload"], result["latency"], result["rss"], result["requests"]
    s = result["settings"]
    print()
    print(f"hot reload: {s['clients']} clients at {s['rate']:.0f} req/s total, {s['workers']} worker(s), "
          f"{req['requests']:,} requests in {req['seconds']:.0f} s")

    def line(label: str, p50: Any, p99: Any, p999: Any, top: Any, note: str = "") -> None:
        print(f"{label:44}{_fmt(p50, ' ms'):>11}{_fmt(p99, ' ms'):>11}{_fmt(p999, ' ms'):>11}{_fmt(top, ' ms'):>11}"
              f"{note}")

    print(f"{'':44}{'p50':>11}{'p99':>11}{'p99.9':>11}{'max':>11}")
    first, every = r["first_answer_ms"], r["every_answer_ms"]
    line("rename -> first answer with the new version", first["p50"], first["p99"], None, first["max"],
         f"   ({r['served']}/{r['swaps']} swaps served)")
    line("rename -> every answer with the new version", every["p50"], every["p99"], None, every["max"])
    for label, key in (("request latency, steady", "steady"), ("request latency, around swaps", "during_swaps")):
        part = lat[key]
        line(label, part["p50_ms"], part["p99_ms"], part["p999_ms"], part["max_ms"],
             f"   ({part['requests']:,} requests)")
    print(f"{'around swaps / steady':44}{'':>11}{_fmt(lat['p99_ratio']):>11}{_fmt(lat['p999_ratio']):>11}")
    print()
    capped = " (capped by --max-seconds)" if rss["capped_by_max_seconds"] else ""
    print(f"RSS before and after {rss['swaps']} back-to-back swaps in {rss['seconds']:.0f} s{capped}:")
    print(f"  {'process (pid)':28}{'before':>12}{'after':>12}{'growth':>10}")
    for row in rss["per_process"]:
        print(f"  {row['process']:28}{_fmt(row['before_mib'], ' MiB'):>12}{_fmt(row['after_mib'], ' MiB'):>12}"
              f"{_fmt(row['growth_pct'], ' %'):>10} {row['note']}")
    print(f"  {'total':28}{_fmt(rss['total_before_mib'], ' MiB'):>12}{_fmt(rss['total_after_mib'], ' MiB'):>12}"
          f"{_fmt(rss['total_growth_pct'], ' %'):>10}")
    print()
    print(f"requests: {req['ok']:,} ok, {req['errors']} errors {req['by_kind'] or ''}")
    for example in req["examples"]:
        print(f"  e.g. {example}")


def write_json(result: dict[str, Any], out_dir: Path, prefix: str) -> Path:
    """``<prefix>-<UTC time>.json``, and the server's log beside it as ``.log`` (from ``result["server_log"]``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{prefix}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    log = result.pop("server_log", None)
    if log is not None:
        path.with_suffix(".log").write_text(log)
        result["server_log_file"] = path.with_suffix(".log").name
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C does: the ``finally`` blocks stop the server."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--swaps", type=int, default=25, help="swaps timed for reload time and latency (>= 20)")
    parser.add_argument("--rss-swaps", type=int, default=500, help="back-to-back swaps between the RSS readings")
    parser.add_argument("--fast", action="store_true", help="quick run: 20 swaps, 100 RSS swaps, 8 s steady state")
    parser.add_argument("--clients", type=int, default=8, help="client threads (one keep-alive connection each)")
    parser.add_argument("--rate", type=float, default=400, help="total requests per second cap (0: closed loop)")
    parser.add_argument("--workers", type=int, default=1, help="SIMPLENN_WORKERS")
    parser.add_argument("--poll-interval", type=float, default=None, help="SIMPLENN_POLL_INTERVAL_S (server default)")
    parser.add_argument("--debounce", type=float, default=None, help="SIMPLENN_RELOAD_DEBOUNCE_S (server default)")
    parser.add_argument("--server-args", default="", help="extra CLI flags for python -m serve")
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS, help="initial weights (copied)")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="load before measuring")
    parser.add_argument("--steady-s", type=float, default=15.0, help="swap-free period for the steady-state p99")
    parser.add_argument("--gap-s", type=float, default=1.0, help="pause after each timed swap is served")
    parser.add_argument("--window-after-s", type=float, default=0.5,
                        help="a swap's latency window ends this long after its first new-version answer")
    parser.add_argument("--swap-timeout-s", type=float, default=15.0, help="give up waiting for a version after")
    parser.add_argument("--max-seconds", "--duration", type=float, default=290.0,
                        help="cap on the whole run (the RSS phase stops early)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    args = parser.parse_args(argv)
    if args.fast:
        args.swaps, args.rss_swaps, args.steady_s = min(args.swaps, 20), min(args.rss_swaps, 100), 8.0
    torch.set_num_threads(1)
    with sigterm_as_interrupt():
        result = measure(args)
    print_report(result)
    path = write_json(result, args.out, "reload")
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    failed = result["requests"]["errors"] or result["reload"]["not_served"] or result["rss"]["not_served"]
    return 1 if failed or not result["server"]["alive_at_end"] else 0


if __name__ == "__main__":
    sys.exit(main())
