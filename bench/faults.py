"""Faults under load: SIGKILL and SIGSTOP the server's own processes while clients send requests, and
count what the clients saw.

Each scenario starts ``python -m serve`` on a free 127.0.0.1 port (``bench/servers.py``) with a
temporary copy of the weights. :class:`Load` runs a few client threads, one keep-alive httpx client
each, that send 1- to 64-row ``POST /predict`` requests drawn from a fixed pool and record every
answer: status, version, whether the outputs equal the in-process reference model's, latency. A
request that got no HTTP answer at all is a connection error (expected for requests on an API server
that was killed) or a client timeout (a hang: never expected), counted apart from HTTP answers.

Scenarios (``--scenarios``):

* ``worker``: SIGKILL an inference worker ``--kills`` times, once per ``--workers`` count: each time
  every worker serves, wait a random 0.2-1 s (``--gap``), SIGKILL a random worker;
* ``api``: SIGKILL a random API server ``--api-kills`` times (``SIMPLENN_API_SERVERS=2``);
* ``hang``: SIGSTOP a random worker ``--stops`` times per ``--workers`` count, with
  ``SIMPLENN_HANG_TIMEOUT_S=--hang-timeout``: the API server must SIGKILL it after about that long
  (its requests get 503) and a new worker must serve;
* ``api-hang``: SIGSTOP a random API server (of 2) ``--stops`` times with the same hang timeout: the
  supervisor's heartbeat must SIGKILL it after about that long (the requests on its connections fail
  as connection errors) and a new one must start;
* ``rollback``: 2 workers; publish a second version, ``POST /admin/rollback``, then SIGKILL one
  worker, then both at once: every answer must carry the rolled-back version.

A wedge is a kill (or stop) after which no request sent later gets a 200 within ``--wedge-s``
seconds. The report is a Markdown table, one row per scenario; the exit status is 1 on a wedge, a
wrong answer, an HTTP status other than 200 and 503, a client timeout, or a pool of processes that
did not come back.

    .venv/bin/python bench/faults.py                               # the full figures: ~11 minutes on 2 cores
    .venv/bin/python bench/faults.py --kills 5 --api-kills 5 --stops 1   # about 2 minutes

``tests/test_faults.py`` runs short versions of the same scenarios with this module's helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # as a script: import bench, models

from bench.clients import ClientThreads  # noqa: E402
from bench.servers import (  # noqa: E402
    RunningServer,
    ServerStartError,
    alive,
    api_server_pids,
    serve_spec,
    worker_pids,
)
from serve.versions import file_version  # noqa: E402

FEATURES = 10
SHIPPED_WEIGHTS = ROOT / "weights" / "model.pth"
MODEL_STATUS = "/v1/models/simplenn"


class FaultError(RuntimeError):
    """A scenario could not go on (a pool of processes did not come back); the message says which."""


# -- the server's status -----------------------------------------------------------------------------------


def status(url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """``GET /v1/models/simplenn``, or None when it does not answer 200."""
    try:
        response = httpx.get(url + MODEL_STATUS, timeout=timeout)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """The first truthy value of ``predicate()`` within ``timeout`` seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def serving_workers(url: str, main_pid: int, version: str | None = None) -> dict[int, str]:
    """pid -> version of each worker that the status route lists as serving (``version`` if given) and
    that is a live child of the main process."""
    body = status(url)
    if body is None:
        return {}
    live = worker_pids(main_pid)
    return {w["pid"]: w["version"] for w in body.get("workers", [])
            if w.get("version") and w["pid"] in live and (version is None or w["version"] == version)}


def full_pool(url: str, main_pid: int, workers: int, version: str | None = None,
              exclude: Iterable[int] = ()) -> dict[int, str] | None:
    """The serving workers when there are exactly ``workers`` of them, all on one version (``version`` if
    given), none of them in ``exclude`` and no other worker process alive; else None."""
    serving = serving_workers(url, main_pid, version)
    excluded = set(exclude)
    if (len(serving) == workers and len(set(serving.values())) == 1 and not excluded & serving.keys()
            and worker_pids(main_pid) == serving.keys()):
        return serving
    return None


# -- the load -------------------------------------------------------------------------------------------------


class Pool:
    """Request bodies of 1 to ``max_rows`` rows (a few single-row ``{"input": ...}`` ones) and, per
    version, the outputs the reference model gives for each."""

    def __init__(self, size: int = 48, max_rows: int = 64, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        sizes = [1, 1, 1, 2, max_rows] + [int(n) for n in rng.integers(1, max_rows + 1, size - 5)]
        self.inputs = [rng.standard_normal((rows, FEATURES)).astype(np.float32) for rows in sizes]
        self.single = [i < 2 for i in range(len(sizes))]  # the first two use {"input": row}
        self.bodies = [json.dumps({"input": x[0].tolist()} if single else {"inputs": x.tolist()}).encode()
                       for x, single in zip(self.inputs, self.single)]
        self.expected: dict[str, list[np.ndarray]] = {}

    def add_version(self, version: str, reference: Callable[[np.ndarray], np.ndarray]) -> None:
        """Accept answers of ``version``: ``reference(rows)`` is the (rows,) output the in-process model gives."""
        self.expected[version] = [np.asarray(reference(x), dtype=np.float64).reshape(-1) for x in self.inputs]


def close_enough(actual: np.ndarray, expected: np.ndarray) -> bool:
    """Outputs equal to float32 noise (rtol 1e-6, and atol 1e-6 for outputs near zero)."""
    return actual.shape == expected.shape and bool(np.allclose(actual, expected, rtol=1e-6, atol=1e-6))


@dataclass(frozen=True)
class Sample:
    """One request as the client saw it."""

    sent: float  # monotonic
    done: float
    rows: int
    status: int | None  # None: no HTTP answer (see error)
    version: str | None = None  # of a 200
    problem: str | None = None  # a wrong answer: unknown version, wrong outputs, a 503 without Retry-After
    error: str | None = None  # no HTTP answer: "timeout" or the exception's class name

    @property
    def latency(self) -> float:
        return self.done - self.sent


class Load(ClientThreads[Sample]):
    """``threads`` client threads (:class:`~bench.clients.ClientThreads`) sending pool requests to
    ``url``/predict, each pausing ``pause_s`` between requests, with a ``timeout_s`` client timeout; every
    answer becomes a :class:`Sample` (:func:`post`).

    Closed-loop clients stall while the server holds their requests; ``ping_every_s`` adds open-loop
    traffic as well: every that many seconds one single-row request on a fresh connection, whatever the
    earlier ones are doing (:attr:`pings`)."""

    def __init__(self, url: str, pool: Pool, threads: int = 3, timeout_s: float = 10.0, pause_s: float = 0.01,
                 seed: int = 0, matches: Callable[[np.ndarray, np.ndarray], bool] = close_enough,
                 ping_every_s: float = 0.0) -> None:
        self.url, self.pool, self.timeout_s, self.pause_s, self.matches = url, pool, timeout_s, pause_s, matches
        self.seed = seed
        super().__init__(threads, "load", join_timeout_s=timeout_s + 5)
        self.pings: list[Sample] = []
        if ping_every_s > 0:
            self.threads.append(threading.Thread(target=self._pinger, args=(ping_every_s,), name="pinger",
                                                 daemon=True))
        self._ping_threads: list[threading.Thread] = []

    def stop(self) -> None:
        """Stop the client threads and the pinger, and wait for the pings in flight."""
        super().stop()
        for thread in list(self._ping_threads):
            thread.join(self.join_timeout_s)

    @property
    def samples(self) -> list[Sample]:
        """Every request so far (the pings included), in the order they were sent."""
        return sorted(self.collected() + list(self.pings), key=lambda s: s.sent)

    def first_ok_after(self, since: float, timeout: float) -> float | None:
        """Monotonic time of the first 200 answer to a request sent at or after ``since``, waiting up to
        ``timeout`` seconds from now for one; None if none came."""

        def find() -> float | None:
            done = [s.done for s in list(self.pings) if s.sent >= since and s.status == 200]
            for per in self.per_thread:
                for sample in reversed(per):  # each thread's samples are in the order they were sent
                    if sample.sent < since:
                        break
                    if sample.status == 200:
                        done.append(sample.done)
            return min(done, default=None)

        return wait_for(find, timeout, interval=0.01)

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        samples = self.per_thread[index]
        with self._http_client() as client:
            while not self.stop_event.is_set():
                samples.append(post(client, self.url, self.pool, rng.randrange(len(self.pool.bodies)), self.matches))
                if self.pause_s:
                    self.stop_event.wait(self.pause_s)

    def _pinger(self, every_s: float) -> None:
        while not self.stop_event.wait(every_s):
            thread = threading.Thread(target=self._ping, name="ping", daemon=True)
            self._ping_threads.append(thread)
            thread.start()

    def _ping(self) -> None:
        with self._http_client() as client:
            self.pings.append(post(client, self.url, self.pool, 0, self.matches))  # pool entry 0 is a single row

    def _http_client(self) -> httpx.Client:
        return httpx.Client(timeout=self.timeout_s, headers={"Content-Type": "application/json"})


def post(client: httpx.Client, url: str, pool: Pool, i: int,
         matches: Callable[[np.ndarray, np.ndarray], bool] = close_enough) -> Sample:
    """Send pool entry ``i`` to ``url``/predict on ``client`` and judge the answer (:func:`judge`); a request
    without an HTTP answer is a Sample with ``error`` "timeout" or the exception's class name."""
    rows = len(pool.inputs[i])
    sent = time.monotonic()
    try:
        response = client.post(url + "/predict", content=pool.bodies[i])
    except httpx.TimeoutException:
        return Sample(sent, time.monotonic(), rows, None, error="timeout")
    except httpx.HTTPError as exc:
        return Sample(sent, time.monotonic(), rows, None, error=type(exc).__name__)
    return judge(pool, i, sent, time.monotonic(), response, matches)


def judge(pool: Pool, i: int, sent: float, done: float, response: httpx.Response,
          matches: Callable[[np.ndarray, np.ndarray], bool] = close_enough) -> Sample:
    """The Sample of an HTTP answer to pool entry ``i``: a 503 must have Retry-After; a 200 must name a version
    the pool expects and carry its outputs (``matches(actual, expected)``); any other status is a problem."""
    rows, code = len(pool.inputs[i]), response.status_code
    if code == 503:
        problem = None if response.headers.get("retry-after") else "503 without Retry-After"
        return Sample(sent, done, rows, code, problem=problem)
    if code != 200:
        return Sample(sent, done, rows, code, problem=f"HTTP {code}: {response.text[:200]}")
    try:
        body = response.json()
        version = body["model_version"]
        actual = np.asarray([body["output"]] if pool.single[i] else body["outputs"], dtype=np.float64)
    except (ValueError, KeyError, TypeError) as exc:
        return Sample(sent, done, rows, code, problem=f"bad body ({exc}): {response.text[:200]}")
    expected = pool.expected.get(version)
    if expected is None:
        return Sample(sent, done, rows, code, version, problem=f"version {version} not expected")
    if not matches(actual, expected[i]):
        return Sample(sent, done, rows, code, version, problem=f"version {version}: outputs differ from the "
                                                               f"reference for pool entry {i}")
    return Sample(sent, done, rows, code, version)


@dataclass
class Counts:
    """What the clients saw, in the report's columns."""

    requests: int = 0
    ok: int = 0
    unavailable: int = 0  # 503
    other: Counter = field(default_factory=Counter)  # other HTTP statuses
    connection_errors: int = 0
    timeouts: int = 0
    problems: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, samples: Iterable[Sample]) -> Counts:
        counts = cls()
        for s in samples:
            counts.requests += 1
            if s.status == 200:
                counts.ok += 1
            elif s.status == 503:
                counts.unavailable += 1
            elif s.status is not None:
                counts.other[s.status] += 1
            elif s.error == "timeout":
                counts.timeouts += 1
            else:
                counts.connection_errors += 1
            if s.problem:
                counts.problems.append(s.problem)
        return counts


# -- the faults ------------------------------------------------------------------------------------------------


@dataclass
class Kill:
    """One signal to one process."""

    pid: int
    at: float  # monotonic time of the signal
    recovered_s: float | None = None  # until the first 200 to a request sent after it; None: none came
    replaced_s: float | None = None  # until the pool was complete again; None: it did not come back
    died_s: float | None = None  # SIGSTOP only: until the stopped process was gone


def _recover(load: Load, kill: Kill, wedge_s: float, give_up_s: float) -> None:
    """Fill ``kill.recovered_s``: past ``wedge_s`` keep waiting up to ``give_up_s`` to measure the wedge."""
    ok = load.first_ok_after(kill.at, wedge_s) or load.first_ok_after(kill.at, max(0.0, give_up_s - wedge_s))
    kill.recovered_s = None if ok is None else ok - kill.at


def kill_workers(url: str, main_pid: int, load: Load, kills: int, workers: int, rng: random.Random,
                 version: str | None = None, gap: tuple[float, float] = (0.2, 1.0), wedge_s: float = 8.0,
                 pool_timeout_s: float = 30.0, victims: int = 1) -> list[Kill]:
    """``kills`` times: once ``workers`` workers serve one version (``version`` if given), wait a random
    ``gap``, SIGKILL ``victims`` random workers at once, and measure until a request sent afterwards gets
    a 200 and until the pool is complete again. Stops early if the pool does not come back."""
    killed: set[int] = set()
    records: list[Kill] = []
    pool = wait_for(lambda: full_pool(url, main_pid, workers, version), pool_timeout_s)
    for _ in range(kills):
        if pool is None:
            break
        time.sleep(rng.uniform(*gap))
        batch = [Kill(pid, 0.0) for pid in rng.sample(sorted(pool), victims)]
        for kill in batch:
            kill.at = time.monotonic()
            os.kill(kill.pid, signal.SIGKILL)
            killed.add(kill.pid)
        records += batch
        for kill in batch:
            _recover(load, kill, wedge_s, pool_timeout_s)
        pool = wait_for(lambda: full_pool(url, main_pid, workers, version, killed), pool_timeout_s)
        for kill in batch:
            kill.replaced_s = None if pool is None else time.monotonic() - kill.at
    return records


def kill_api_servers(url: str, main_pid: int, load: Load, kills: int, api_servers: int, rng: random.Random,
                     gap: tuple[float, float] = (0.2, 1.0), wedge_s: float = 8.0,
                     pool_timeout_s: float = 30.0) -> list[Kill]:
    """``kills`` times: once ``api_servers`` API server processes are up, wait a random ``gap``, SIGKILL a
    random one, and measure until a request sent afterwards gets a 200 and until the count is back."""
    killed: set[int] = set()
    records: list[Kill] = []

    def complete() -> set[int] | None:
        pids = api_server_pids(main_pid)
        return pids if len(pids) == api_servers and not pids & killed else None

    pids = wait_for(complete, pool_timeout_s)
    for _ in range(kills):
        if pids is None:
            break
        time.sleep(rng.uniform(*gap))
        kill = Kill(rng.choice(sorted(pids)), time.monotonic())
        os.kill(kill.pid, signal.SIGKILL)
        killed.add(kill.pid)
        records.append(kill)
        pids = wait_for(complete, pool_timeout_s, interval=0.01)
        kill.replaced_s = None if pids is None else time.monotonic() - kill.at
        _recover(load, kill, wedge_s, pool_timeout_s)
    return records


def stop_process(pool: Callable[[set[int]], Collection[int] | None], load: Load, hang_s: float,
                 rng: random.Random, wedge_s: float = 8.0, pool_timeout_s: float = 30.0) -> Kill | None:
    """SIGSTOP a random process of ``pool({})`` (the pids when the pool is complete, else None) and measure
    until it is gone (the server kills a hung worker or API server after ``hang_s``), until a request sent
    after the stop gets a 200, and until the pool is complete again without it. The process gets SIGCONT
    if it is still there after ``hang_s + 10`` s. None if the pool was never complete to begin with."""
    first = wait_for(lambda: pool(set()), pool_timeout_s)
    if first is None:
        return None
    kill = Kill(rng.choice(sorted(first)), time.monotonic())
    os.kill(kill.pid, signal.SIGSTOP)
    try:
        gone = wait_for(lambda: not alive(kill.pid) and time.monotonic(), hang_s + 10, interval=0.01)
        kill.died_s = None if gone is None else gone - kill.at
    finally:
        with contextlib.suppress(ProcessLookupError):
            if alive(kill.pid):
                os.kill(kill.pid, signal.SIGCONT)
    _recover(load, kill, wedge_s, pool_timeout_s)
    done = wait_for(lambda: pool({kill.pid}), pool_timeout_s)
    kill.replaced_s = None if done is None else time.monotonic() - kill.at
    return kill


def api_pool(main_pid: int, api_servers: int, exclude: set[int]) -> set[int] | None:
    """The API server pids when there are exactly ``api_servers`` of them, none in ``exclude``; else None."""
    pids = api_server_pids(main_pid)
    return pids if len(pids) == api_servers and not pids & exclude else None


# -- the script -----------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One scenario's row of the report."""

    name: str
    kills: list[Kill]
    counts: Counts
    wedge_s: float
    expected_kills: int
    notes: list[str] = field(default_factory=list)

    @property
    def wedges(self) -> int:
        return sum(1 for k in self.kills if k.recovered_s is None or k.recovered_s > self.wedge_s)

    @property
    def not_replaced(self) -> int:
        return sum(1 for k in self.kills if k.replaced_s is None) + self.expected_kills - len(self.kills)

    @property
    def failed(self) -> bool:
        c = self.counts
        return bool(self.wedges or self.not_replaced or c.other or c.timeouts or c.problems or self.notes)


def reference_model(weights: Path) -> Callable[[np.ndarray], np.ndarray]:
    """SimpleNN in this process, from ``weights``: rows -> (rows,) outputs."""
    import torch

    from models.simple_nn import SimpleNN

    model = SimpleNN()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()

    def run(rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(rows)).numpy()[:, 0]

    return run


def publish(path: Path, seed: int) -> str:
    """A new SimpleNN state_dict (weights drawn from ``seed``) renamed over ``path``, written as the reload
    bench writes its versions (imported here: torch loads only when a fault run publishes); its version."""
    from bench.reload import publish as publish_weights

    return publish_weights(path, seed)[1].version


def publish_and_roll_back(server: RunningServer, weights: Path, token: str) -> str:
    """Publish a second version over ``weights``, wait until both of the server's 2 workers serve it,
    ``POST /admin/rollback`` (bearer ``token``) and wait until both serve the first again; returns the first
    version. FaultError when a step does not happen (within 30 s each)."""
    url, first = server.url, file_version(weights)
    second = publish(weights, seed=4242)
    if not wait_for(lambda: full_pool(url, server.pid, 2, second), 30):
        raise FaultError(f"version {second} was never served by both workers")
    response = httpx.post(url + "/admin/rollback", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    if response.status_code != 202:
        raise FaultError(f"POST /admin/rollback answered {response.status_code}")
    if not wait_for(lambda: full_pool(url, server.pid, 2, first), 30):
        raise FaultError(f"the rollback to {first} was never served by both workers")
    return first


class Runner:
    """Runs one scenario at a time: a server of its own in a scratch folder, on a copy of the weights, under
    :class:`Load`; always stops the server; prints progress and returns the scenario's :class:`Result`."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.rng = random.Random(args.seed)  # the scenarios draw from it too

    def server(self, name: str, weights: Path, env: dict[str, str]) -> RunningServer:
        """``python -m serve`` on ``weights`` with ``env``, ready (stopped again if it never gets there)."""
        state = self.workdir / f"state-{name}"
        spec = serve_spec(name, {"SIMPLENN_WEIGHTS": str(weights), "SIMPLENN_STATE_DIR": str(state), **env},
                          ready_timeout_s=120)
        server = RunningServer(spec, self.workdir)
        server.launch()
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
        return server

    def weights(self, name: str) -> Path:
        """A copy of ``--weights`` for scenario ``name``: ``<workdir>/weights-<name>/model.pth``."""
        path = self.workdir / f"weights-{name}" / "model.pth"
        path.parent.mkdir()
        shutil.copyfile(self.args.weights, path)
        return path

    def load(self, url: str, pool: Pool) -> Load:
        """The load of the command line's ``--threads``, ``--timeout`` and ``--pause``, seeded from the rng."""
        return Load(url, pool, threads=self.args.threads, timeout_s=self.args.timeout, pause_s=self.args.pause,
                    seed=self.rng.randrange(1 << 30))

    def pool_for(self, *weights: Path) -> Pool:
        """A request pool whose answers may carry the versions of these weights files only."""
        pool = Pool(seed=self.args.seed)
        for path in weights:
            pool.add_version(file_version(path), reference_model(path))
        return pool

    def run(self, name: str, env: dict[str, str], act: Callable[[RunningServer, Load, Path], list[Kill]],
            expected_kills: int, before: Callable[[RunningServer, Path], list[Path]] | None = None) -> Result:
        """Scenario ``name``: start its server with ``env``, call ``before(server, weights)`` (the weights whose
        versions answers may carry; default the copy it serves), start the load, ``act`` (the faults), let the
        load go on a second, stop everything and count."""
        weights = self.weights(name)
        print(f"-- {name}", flush=True)
        started = time.monotonic()
        server = self.server(name, weights, env)
        notes: list[str] = []
        kills: list[Kill] = []
        load: Load | None = None
        try:
            accepted = before(server, weights) if before else [weights]
            load = self.load(server.url, self.pool_for(*accepted))
            with load:
                time.sleep(0.5)
                kills = act(server, load, weights)
                time.sleep(1.0)  # the load goes on a while after the last fault
            if not server.alive():
                notes.append("the main process exited")
        except FaultError as exc:
            notes.append(str(exc))
        finally:
            server.stop()
        counts = Counts.of(load.samples) if load is not None else Counts()
        print(f"   {len(kills)} faults, {counts.requests} requests, {time.monotonic() - started:.0f} s; "
              f"log: {server.log_path}", flush=True)
        for line in sorted(set(counts.problems))[:5] + notes:
            print(f"   problem: {line}", flush=True)
        return Result(name, kills, counts, self.args.wedge_s, expected_kills, notes)


class Scenarios:
    """The scenarios of ``--scenarios``, each one :meth:`Runner.run` with its server settings and its faults."""

    def __init__(self, runner: Runner) -> None:
        self.runner, self.args, self.rng = runner, runner.args, runner.rng

    def workers(self, workers: int) -> Result:
        """SIGKILL a random one of ``workers`` inference workers ``--kills`` times."""
        a = self.args
        return self.runner.run(f"worker-sigkill-w{workers}", {"SIMPLENN_WORKERS": str(workers)},
                               lambda server, load, _: kill_workers(server.url, server.pid, load, a.kills, workers,
                                                                    self.rng, gap=a.gap, wedge_s=a.wedge_s),
                               a.kills)

    def api(self) -> Result:
        """SIGKILL a random one of 2 API servers ``--api-kills`` times."""
        a = self.args
        return self.runner.run("api-sigkill", {"SIMPLENN_API_SERVERS": "2"},
                               lambda server, load, _: kill_api_servers(server.url, server.pid, load, a.api_kills,
                                                                        2, self.rng, gap=a.gap, wedge_s=a.wedge_s),
                               a.api_kills)

    def hang(self, workers: int) -> Result:
        """SIGSTOP workers: each held request makes an API server's watchdog kill the stopped one."""
        return self._stops(f"worker-sigstop-w{workers}", "worker", {"SIMPLENN_WORKERS": str(workers)},
                           lambda server, exclude: full_pool(server.url, server.pid, workers, None, exclude))

    def api_hang(self) -> Result:
        """SIGSTOP API servers: the supervisor's heartbeat kills the stopped one."""
        return self._stops("api-sigstop", "API server", {"SIMPLENN_API_SERVERS": "2"},
                           lambda server, exclude: api_pool(server.pid, 2, exclude))

    def _stops(self, name: str, what: str, env: dict[str, str],
               pool: Callable[[RunningServer, set[int]], Collection[int] | None]) -> Result:
        a = self.args

        def act(server: RunningServer, load: Load, _: Path) -> list[Kill]:
            kills = []
            for _ in range(a.stops):
                kill = stop_process(lambda exclude: pool(server, exclude), load, a.hang_timeout, self.rng,
                                    wedge_s=a.wedge_s)
                if kill is None:
                    raise FaultError(f"the {what} processes were never all up")
                kills.append(kill)
                time.sleep(self.rng.uniform(*a.gap))
            return kills

        result = self.runner.run(name, {**env, "SIMPLENN_HANG_TIMEOUT_S": str(a.hang_timeout)}, act, a.stops)
        for kill in result.kills:
            if kill.died_s is None or kill.died_s > a.hang_timeout + 2.5:
                result.notes.append(f"stopped {what} {kill.pid} gone after {kill.died_s} s "
                                    f"(hang timeout {a.hang_timeout} s)")
        return result

    def rollback(self) -> Result:
        """2 workers: publish a second version, roll back, then SIGKILL one worker and then both
        ``--rollback-rounds`` times; every answer must carry the first version."""
        a = self.args
        token = "bench-faults"
        first: dict[str, str] = {}

        def before(server: RunningServer, weights: Path) -> list[Path]:
            first["version"] = publish_and_roll_back(server, weights, token)
            return [a.weights]  # answers must carry the first version (the original file's) only

        def act(server: RunningServer, load: Load, _: Path) -> list[Kill]:
            url, version = server.url, first["version"]
            kills = []
            for victims in (1, 2) * a.rollback_rounds:
                kills += kill_workers(url, server.pid, load, 1, 2, self.rng, version, a.gap, a.wedge_s,
                                      victims=victims)
            return kills

        return self.runner.run("rollback-then-sigkill-w2",
                               {"SIMPLENN_WORKERS": "2", "SIMPLENN_ADMIN_TOKEN": token},
                               act, 3 * a.rollback_rounds, before=before)


def markdown_table(results: list[Result]) -> str:
    head = ["scenario", "kills", "requests", "200", "503", "other codes", "connection errors", "client timeouts",
            "wrong answers", "max kill→200 (s)", "max kill→pool complete (s)", "wedges"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        c = r.counts
        recovered = [k.recovered_s for k in r.kills if k.recovered_s is not None]
        replaced = [k.replaced_s for k in r.kills if k.replaced_s is not None]
        other = ", ".join(f"{code}×{n}" for code, n in sorted(c.other.items())) or "0"
        lines.append("| " + " | ".join([
            r.name, str(len(r.kills)), str(c.requests), str(c.ok), str(c.unavailable), other,
            str(c.connection_errors), str(c.timeouts), str(len(c.problems)),
            f"{max(recovered):.2f}" if recovered else "-",
            (f"{max(replaced):.2f}" if replaced else "-") + (f" ({r.not_replaced} never)" if r.not_replaced else ""),
            str(r.wedges)]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="worker,api,hang,api-hang,rollback",
                        help="comma-separated: worker, api, hang, api-hang, rollback (default: all)")
    parser.add_argument("--kills", type=int, default=100, help="worker SIGKILLs per worker count (default 100)")
    parser.add_argument("--workers", default="1,2", help="worker counts for worker and hang (default 1,2)")
    parser.add_argument("--api-kills", type=int, default=20, help="API server SIGKILLs (default 20)")
    parser.add_argument("--stops", type=int, default=3, help="worker SIGSTOPs per worker count (default 3)")
    parser.add_argument("--hang-timeout", type=float, default=2.0, help="SIMPLENN_HANG_TIMEOUT_S for hang (default 2)")
    parser.add_argument("--rollback-rounds", type=int, default=1,
                        help="rollback: rounds of (SIGKILL one worker, then both) after the rollback (default 1)")
    parser.add_argument("--threads", type=int, default=3, help="client threads (default 3)")
    parser.add_argument("--pause", type=float, default=0.01, help="each client's pause between requests, s")
    parser.add_argument("--timeout", type=float, default=10.0, help="client timeout, s (default 10)")
    parser.add_argument("--wedge-s", type=float, default=8.0,
                        help="a fault with no 200 to a later request within this many seconds is a wedge (default 8)")
    parser.add_argument("--gap", type=float, nargs=2, default=(0.2, 1.0), metavar=("MIN", "MAX"),
                        help="random wait before each fault once the pool is complete, s (default 0.2 1.0)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - {"worker", "api", "hang", "api-hang", "rollback"}
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    args.workers = [int(n) for n in args.workers.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="simplenn-faults-"))
    bench = Scenarios(Runner(args, workdir))
    results: list[Result] = []
    started = time.monotonic()
    try:
        for scenario in args.scenarios:
            if scenario == "worker":
                results += [bench.workers(n) for n in args.workers]
            elif scenario == "api":
                results.append(bench.api())
            elif scenario == "hang":
                results += [bench.hang(n) for n in args.workers]
            elif scenario == "api-hang":
                results.append(bench.api_hang())
            elif scenario == "rollback":
                results.append(bench.rollback())
    except ServerStartError as exc:
        print(f"faults: a server did not start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("faults: interrupted", file=sys.stderr)
    print()
    print(markdown_table(results))
    print(f"\n{time.monotonic() - started:.0f} s in all; logs in {workdir}")
    failed = [r.name for r in results if r.failed]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
