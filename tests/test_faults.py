"""Faults for real: SIGKILL and SIGSTOP the server's own processes while it is under load.

Every test starts ``python -m serve`` as a process (conftest's ``start_server``) and talks HTTP to it
on 127.0.0.1 only. The load is ``bench.faults.Load``: 3 client threads, one keep-alive httpx client
each, sending 1- to 64-row ``/predict`` requests (10 s client timeout) and recording every answer;
each 200 is compared with the in-process reference model (conftest's ``reference_outputs`` and
``assert_matches``) of the version it names. The faults go to the processes the server really has:
inference workers (children of the main process with ``spawn_main`` in their command line), API
servers (forked children with the main process's command line) and the main process (supervisor).

What must hold: the server never wedges (a request sent after a fault gets a 200 within 8 s), HTTP
answers are 200 or 503 (503 with Retry-After) and never 500 or 504, no request hangs past the
client timeout, every 200 is right for the version it names, and the processes come back. The long
versions (100 kills and more, with a table of figures) are ``bench/faults.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from bench.faults import (
    Counts,
    Kill,
    Load,
    Pool,
    Sample,
    full_pool,
    kill_api_servers,
    kill_workers,
    status,
    stop_process,
    wait_for,
)
from bench.servers import alive, api_server_pids, worker_pids
from serve.versions import file_version
from tests.conftest import SHIPPED_WEIGHTS, assert_matches, make_state_dict, reference_outputs, save_weights

KILLS = 5
WEDGE_S = 8.0  # after a fault, a request sent later must get a 200 within this long
GAP = (0.1, 0.6)  # random wait before each fault, once every process of the kind is up
TOKEN = "fault-test-token"


def matches(actual: np.ndarray, expected: np.ndarray) -> bool:
    """The suite's tolerance (conftest's ``assert_matches``) as a predicate for the load's threads."""
    try:
        assert_matches(actual, expected)
    except AssertionError:
        return False
    return True


def make_pool(*versions: tuple[str, dict | Path]) -> Pool:
    """Request pool whose answers may carry only these (version, weights) and must match their reference."""
    pool = Pool()
    for version, weights in versions:
        state = torch.load(weights, map_location="cpu", weights_only=True) if isinstance(weights, Path) else weights
        pool.add_version(version, lambda rows, state=state: reference_outputs(state, rows))
    return pool


def load(server, pool: Pool, threads: int = 3, pause_s: float = 0.01, ping_every_s: float = 0.0) -> Load:
    return Load(server.url, pool, threads=threads, timeout_s=10.0, pause_s=pause_s, matches=matches,
                ping_every_s=ping_every_s)


def describe(kills: list[Kill], counts: Counts, server) -> str:
    """What happened, for assertion messages: the faults, the counts and the server's log tail."""
    faults = "; ".join(f"pid {k.pid}: 200 after {k.recovered_s}, pool after {k.replaced_s}, gone after {k.died_s}"
                       for k in kills)
    return (f"\nfaults: {faults}\ncounts: {counts.requests} requests, {counts.ok} x 200, {counts.unavailable} x 503, "
            f"other {dict(counts.other)}, {counts.connection_errors} connection errors, {counts.timeouts} timeouts, "
            f"problems {sorted(set(counts.problems))[:5]}\nlog tail:\n{server.log()[-4000:]}")


def assert_only_good_http_answers(counts: Counts, why: str, connection_errors_allowed: bool = False) -> None:
    """Every HTTP answer is 200 or 503 (no 500, no 504), 503s carry Retry-After, every 200 is the right
    output of an expected version, no request hit the client timeout."""
    assert counts.requests >= 100, f"the load hardly ran{why}"
    assert not counts.other, f"HTTP answers other than 200 and 503{why}"
    assert counts.timeouts == 0, f"requests hung past the 10 s client timeout{why}"
    assert not counts.problems, f"wrong answers{why}"
    if not connection_errors_allowed:
        assert counts.connection_errors == 0, f"connection errors without an API server being killed{why}"


def near_a_fault(sample: Sample, kills: list[Kill], within: float = 1.0) -> bool:
    return any(k.at <= sample.done <= k.at + within for k in kills)


def probe(url: str, path: str) -> int | None:
    """One GET on a fresh connection (so it may reach either API server); None without an answer."""
    try:
        return httpx.get(url + path, timeout=2).status_code
    except httpx.HTTPError:
        return None


# -- a. SIGKILL of the inference worker -----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkilled_workers_never_wedge_the_server(start_server, workers: int) -> None:
    """5 SIGKILLs of a worker at random moments under load: each time a request sent afterwards gets a 200
    within 8 s; answers are only 200 (right outputs) or 503 (only just after a kill); with 2 workers
    under 2 % of requests get 503; afterwards the configured number of workers serve one version."""
    server = start_server(env={"SIMPLENN_WORKERS": str(workers)})
    version = file_version(SHIPPED_WEIGHTS)
    with load(server, make_pool((version, SHIPPED_WEIGHTS))) as traffic:
        time.sleep(0.5)
        kills = kill_workers(server.url, server.proc.pid, traffic, KILLS, workers, random.Random(workers), version,
                             gap=GAP, wedge_s=WEDGE_S, pool_timeout_s=20)
        time.sleep(1.0)
    samples = traffic.samples
    counts = Counts.of(samples)
    why = describe(kills, counts, server)

    assert len(kills) == KILLS and all(k.replaced_s is not None for k in kills), f"workers did not come back{why}"
    assert all(k.recovered_s is not None and k.recovered_s <= WEDGE_S for k in kills), f"wedged{why}"
    assert_only_good_http_answers(counts, why)
    late = [s for s in samples if s.status == 503 and not near_a_fault(s, kills)]
    assert not late, f"503s that were not the killed worker's requests: {late[:3]}{why}"
    if workers == 2:
        assert counts.unavailable < 0.02 * counts.requests, f"too many 503s with a second worker serving{why}"
    body = status(server.url)
    assert body is not None
    assert len(body["workers"]) == workers, body
    assert body["versions"] == [version] and body["version"] == version, body
    assert not {w["pid"] for w in body["workers"]} & {k.pid for k in kills}, body


# -- b. SIGKILL of an API server ----------------------------------------------------------------------------------


def test_sigkilled_api_servers_are_replaced_and_answers_go_on(start_server) -> None:
    """5 SIGKILLs of an API server under load (2 API servers): the count is back to 2 within 3 s each
    time, requests sent afterwards get 200 at once; requests on the killed process fail as connection
    errors (counted apart, only just after a kill); every HTTP answer is 200 or 503."""
    server = start_server(env={"SIMPLENN_API_SERVERS": "2"})
    main = server.proc.pid
    version = file_version(SHIPPED_WEIGHTS)
    with load(server, make_pool((version, SHIPPED_WEIGHTS))) as traffic:
        time.sleep(0.5)
        kills = kill_api_servers(server.url, main, traffic, KILLS, 2, random.Random(3), gap=GAP,
                                 wedge_s=WEDGE_S, pool_timeout_s=10)
        time.sleep(1.5)  # requests reach the replacements too
    samples = traffic.samples
    counts = Counts.of(samples)
    why = describe(kills, counts, server)

    assert len(kills) == KILLS, f"API servers did not come back{why}"
    assert all(k.replaced_s is not None and k.replaced_s < 3.0 for k in kills), f"slow API server replacement{why}"
    assert all(k.recovered_s is not None and k.recovered_s <= WEDGE_S for k in kills), f"wedged{why}"
    assert_only_good_http_answers(counts, why, connection_errors_allowed=True)
    unexplained = [s for s in samples if s.status is None and not near_a_fault(s, kills)]
    assert not unexplained, f"connection errors away from any kill: {unexplained[:3]}{why}"
    assert counts.connection_errors <= 3 * KILLS, f"more connection errors than requests in flight{why}"
    assert counts.unavailable == 0, f"503s although every worker lived{why}"
    assert len(api_server_pids(main)) == 2
    assert not api_server_pids(main) & {k.pid for k in kills}
    # the replacements serve: readiness and predictions on fresh connections (either API server)
    assert [probe(server.url, "/health/ready") for _ in range(10)] == [200] * 10
    for _ in range(10):
        response = httpx.post(server.url + "/predict", json={"input": [0.5] * 10}, timeout=10)
        assert response.status_code == 200 and response.json()["model_version"] == version


# -- c. SIGSTOP of a worker ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sigstopped_worker_is_killed_after_the_hang_timeout(start_server, workers: int) -> None:
    """SIGSTOP a worker under load (SIMPLENN_HANG_TIMEOUT_S=2): it is SIGKILLed about 2 s later, the
    requests it held get 503 after about 2 s (not the 30 s request timeout), a new worker serves; with
    2 workers the other one keeps answering meanwhile."""
    hang = 2.0
    server = start_server(env={"SIMPLENN_WORKERS": str(workers), "SIMPLENN_HANG_TIMEOUT_S": str(hang)})
    version = file_version(SHIPPED_WEIGHTS)
    with load(server, make_pool((version, SHIPPED_WEIGHTS)), threads=4, ping_every_s=0.1) as traffic:
        time.sleep(0.5)
        kill = stop_process(lambda exclude: full_pool(server.url, server.proc.pid, workers, version, exclude),
                            traffic, hang, random.Random(5), wedge_s=WEDGE_S, pool_timeout_s=20)
        time.sleep(1.0)
    assert kill is not None, "the workers never all served"
    samples = traffic.samples
    counts = Counts.of(samples)
    why = describe([kill], counts, server)

    assert kill.died_s is not None, f"the stopped worker was never killed{why}"
    assert hang - 0.5 <= kill.died_s <= hang + 1.5, f"stopped worker killed after {kill.died_s:.2f} s{why}"
    assert kill.recovered_s is not None and kill.recovered_s <= WEDGE_S, f"wedged{why}"
    assert kill.replaced_s is not None, f"no new worker serves{why}"
    assert_only_good_http_answers(counts, why)
    held = [s for s in samples if s.status == 503]
    assert held, f"no request was held by the stopped worker{why}"
    assert all(s.done >= kill.at + kill.died_s - 0.2 for s in held), f"503 before the kill{why}"
    assert max(s.latency for s in held) <= hang + 1.5, f"held requests waited past the hang timeout{why}"
    assert max(s.latency for s in held) >= hang - 0.3, f"no held request waited the hang timeout{why}"
    stopped_window = (kill.at + 0.05, kill.at + kill.died_s - 0.2)
    if workers == 1:
        answered = [s for s in samples if stopped_window[0] <= s.sent <= stopped_window[1] and s.status != 503]
        assert not answered, f"requests sent to the stopped worker were not failed: {answered[:3]}{why}"
    else:  # open-loop pings (closed-loop clients may all be waiting on the stopped worker)
        pings = [s for s in traffic.pings if stopped_window[0] <= s.sent <= stopped_window[1]]
        quick = [s for s in pings if s.status == 200 and s.latency < 0.5]
        assert len(quick) >= 0.75 * len(pings) > 0, f"pings sent during the stop: {pings}{why}"
        slots = np.arange(kill.at, kill.at + kill.died_s - 0.5, 0.5)
        oks = [s.done for s in samples if s.status == 200]
        empty = [round(t - kill.at, 2) for t in slots if not any(t <= done < t + 0.5 for done in oks)]
        assert not empty, f"the other worker stopped answering in the 0.5 s slots starting at {empty}{why}"
    body = status(server.url)
    assert body is not None and len(body["workers"]) == workers and body["versions"] == [version], body
    assert kill.pid not in {w["pid"] for w in body["workers"]}, body


# -- d. the last resort: the supervisor is stopped too ------------------------------------------------------------


def test_with_the_supervisor_stopped_a_dead_worker_makes_the_server_not_ready_then_not_live(start_server) -> None:
    """SIGSTOP the main process, SIGKILL the only worker (hang 1 s, worker start 2 s): /health/ready is 503
    at once, /health/live turns 503 about 3 s later; after SIGCONT a worker starts, both are 200 again and
    a request sent during the outage is answered."""
    server = start_server(env={"SIMPLENN_WORKERS": "1", "SIMPLENN_HANG_TIMEOUT_S": "1",
                               "SIMPLENN_WORKER_START_TIMEOUT_S": "2"})
    main, url = server.proc.pid, server.url
    (worker,) = worker_pids(main)
    pool = make_pool((file_version(SHIPPED_WEIGHTS), SHIPPED_WEIGHTS))
    parked: list[httpx.Response | Exception] = []

    def send_during_outage() -> None:
        try:
            parked.append(httpx.post(url + "/predict", content=pool.bodies[-1],
                                     headers={"Content-Type": "application/json"}, timeout=30))
        except httpx.HTTPError as exc:
            parked.append(exc)

    live: list[tuple[float, int | None]] = []
    sender = threading.Thread(target=send_during_outage)
    os.kill(main, signal.SIGSTOP)
    try:
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        not_ready = wait_for(lambda: all(probe(url, "/health/ready") == 503 for _ in range(6)) and time.monotonic(),
                             2.0, interval=0.02)
        sender.start()
        while time.monotonic() < killed + 6.0:  # until 1 s after the first 503, at most 6 s
            live.append((time.monotonic() - killed, probe(url, "/health/live")))
            first_503 = next((t for t, code in live if code == 503), None)
            if first_503 is not None and live[-1][0] > first_503 + 1.0:
                break
            time.sleep(0.1)
        assert not worker_pids(main), "a worker was started while the supervisor was stopped"
    finally:
        os.kill(main, signal.SIGCONT)
    back = wait_for(lambda: all(probe(url, path) == 200 for path in ("/health/ready", "/health/live") * 3), 30,
                    interval=0.1)
    if sender.ident is not None:
        sender.join(35)
    why = f"\nlive probes (s after the kill, status): {live}\nlog tail:\n{server.log()[-4000:]}"

    assert not_ready is not None and not_ready - killed <= 0.5, f"/health/ready did not turn 503 at once{why}"
    first_503 = next((t for t, code in live if code == 503), None)
    assert first_503 is not None and 2.5 <= first_503 <= 5.0, f"/health/live turned 503 at {first_503}{why}"
    assert all(code == 200 for t, code in live if t < first_503), why
    assert all(code == 503 for t, code in live if t >= first_503 + 0.5), f"/health/live flapped{why}"
    assert back, f"not ready and live again within 30 s of SIGCONT{why}"
    new_workers = worker_pids(main)
    assert len(new_workers) == 1 and worker not in new_workers
    assert len(parked) == 1 and isinstance(parked[0], httpx.Response), f"request during the outage: {parked}{why}"
    assert parked[0].status_code == 200, f"{parked[0].status_code} {parked[0].text}{why}"
    assert_matches(parked[0].json()["outputs"], pool.expected[file_version(SHIPPED_WEIGHTS)][-1])


# -- e. rollback, then worker kills ----------------------------------------------------------------------------------


def test_a_rollback_holds_across_worker_kills(start_server, weights_factory) -> None:
    """2 workers: publish a second version, roll back to the first (admin API), then SIGKILL one worker,
    then both at once (no worker left: as with 1 worker): every answer carries the first version, the
    replacements serve it, and status shows one version with the second as previous."""
    path, first_state = weights_factory(1)
    first = file_version(path)
    server = start_server(env={"SIMPLENN_WEIGHTS": str(path), "SIMPLENN_WORKERS": "2", "SIMPLENN_ADMIN_TOKEN": TOKEN})
    url, main = server.url, server.proc.pid
    save_weights(path, make_state_dict(2))
    second = file_version(path)
    assert second != first
    assert wait_for(lambda: full_pool(url, main, 2, second), 15), f"{second} never served{server.log()[-3000:]}"
    response = httpx.post(url + "/admin/rollback", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert response.status_code == 202, response.text
    assert wait_for(lambda: full_pool(url, main, 2, first), 10), f"rollback never served{server.log()[-3000:]}"

    rng = random.Random(11)
    with load(server, make_pool((first, first_state))) as traffic:  # an answer of `second` is a wrong answer
        time.sleep(0.3)
        kills = kill_workers(url, main, traffic, 1, 2, rng, first, gap=GAP, wedge_s=WEDGE_S, pool_timeout_s=20)
        kills += kill_workers(url, main, traffic, 1, 2, rng, first, gap=GAP, wedge_s=WEDGE_S, pool_timeout_s=20,
                              victims=2)
        time.sleep(1.0)
    counts = Counts.of(traffic.samples)
    why = describe(kills, counts, server)

    assert len(kills) == 3, f"workers did not come back on {first}{why}"
    assert all(k.replaced_s is not None for k in kills), f"the replacements do not all serve {first}{why}"
    assert all(k.recovered_s is not None and k.recovered_s <= WEDGE_S for k in kills), f"wedged{why}"
    assert_only_good_http_answers(counts, why)
    assert {s.version for s in traffic.samples if s.status == 200} == {first}
    body = status(url)
    assert body is not None
    assert (body["version"], body["versions"], body["previous_version"]) == (first, [first], second), body
    assert len(body["workers"]) == 2 and not {w["pid"] for w in body["workers"]} & {k.pid for k in kills}, body


# -- f. one version across workers ---------------------------------------------------------------------------------


def test_a_new_version_reaches_both_workers_within_a_second(start_server, weights_factory, tmp_path: Path) -> None:
    """2 workers under load, a new weights file: both workers report it within 1 s of each other, and no
    answer carries the old version more than 1 s after the first answer of the new one."""
    path, first_state = weights_factory(1)
    first = file_version(path)
    staged_state = make_state_dict(2)
    staged = save_weights(tmp_path / "staged" / "model.pth", staged_state)
    second = file_version(staged)
    server = start_server(env={"SIMPLENN_WEIGHTS": str(path), "SIMPLENN_WORKERS": "2"})
    switched: dict[int, float] = {}  # worker -> when status first showed it on the new version

    # 4 clients without pauses: requests overlap, so both workers get some (a worker takes a request
    # when the other has more rows in flight)
    with load(server, make_pool((first, first_state), (second, staged_state)), threads=4, pause_s=0) as traffic:
        time.sleep(0.5)
        os.replace(staged, path)
        published = time.monotonic()
        while len(switched) < 2 and time.monotonic() < published + 15:
            for entry in (status(server.url) or {}).get("workers", []):
                if entry["version"] == second:
                    switched.setdefault(entry["worker"], time.monotonic())
            time.sleep(0.02)
        time.sleep(1.0)
    samples = traffic.samples
    counts = Counts.of(samples)
    why = describe([], counts, server)

    assert len(switched) == 2, f"workers on the new version: {switched}{why}"
    assert max(switched.values()) - min(switched.values()) <= 1.0, f"switch times {switched}{why}"
    assert_only_good_http_answers(counts, why)
    assert counts.ok == counts.requests, f"answers other than 200 without any fault{why}"
    new = [s.done for s in samples if s.version == second]
    assert new and any(s.version == first for s in samples), f"the load did not see both versions{why}"
    stale = [s for s in samples if s.version == first and s.done > min(new) + 1.0]
    assert not stale, f"old-version answers more than 1 s after the first new one: {stale[:3]}{why}"
    body = status(server.url)
    assert body is not None and body["version"] == second and body["versions"] == [second], body


# -- g. SIGSTOP of an API server -----------------------------------------------------------------------------------


def held_by(sock: socket.socket, pids: set[int]) -> int | None:
    """Which of ``pids`` holds the server's end of the loopback TCP connection ``sock`` (from /proc)."""
    client_port, server_port = sock.getsockname()[1], sock.getpeername()[1]
    ends = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, inode = (line.split()[i] for i in (1, 2, 9))
        if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
            ends.add(f"socket:[{inode}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in ends:
                    return pid
    return None


def predict_on(conn: http.client.HTTPConnection, body: bytes) -> tuple[float, int | Exception]:
    """One /predict on ``conn`` (keep-alive): (seconds it took, the status or the exception it raised)."""
    started = time.monotonic()
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return time.monotonic() - started, response.status
    except (OSError, http.client.HTTPException) as exc:
        return time.monotonic() - started, exc


def test_a_sigstopped_api_server_is_killed_and_replaced(start_server) -> None:
    """SIGSTOP the API server (of 2, SIMPLENN_HANG_TIMEOUT_S=2, so a ping a second) that holds a keep-alive
    connection, under load: the supervisor SIGKILLs it 2 to 3 s later (one error line) and a new one
    replaces it within 5 s; the request sent on that connection after the stop fails as a connection
    error at the kill instead of hanging; requests on fresh connections get 200 throughout; the other
    API server (which answers its pings) lives on."""
    hang = 2.0
    server = start_server(env={"SIMPLENN_API_SERVERS": "2", "SIMPLENN_HANG_TIMEOUT_S": str(hang)})
    main = server.proc.pid
    version = file_version(SHIPPED_WEIGHTS)
    pool = make_pool((version, SHIPPED_WEIGHTS))
    pids = wait_for(lambda: found if len(found := api_server_pids(main)) == 2 else None, 10)
    assert pids, f"2 API servers never ran{server.log()[-3000:]}"
    held = http.client.HTTPConnection("127.0.0.1", server.port, timeout=hang + 20)
    assert predict_on(held, pool.bodies[0])[1] == 200
    victim = held_by(held.sock, pids)
    assert victim is not None, "no API server holds the keep-alive connection"
    (other,) = pids - {victim}
    outcome: list[tuple[float, int | Exception]] = []
    sender = threading.Thread(target=lambda: outcome.append(predict_on(held, pool.bodies[0])))

    with load(server, pool, ping_every_s=0.1) as traffic:
        time.sleep(0.5)
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            sender.start()
            gone = wait_for(lambda: not alive(victim) and time.monotonic(), hang + 10, interval=0.01)
            back = wait_for(lambda: (len(current := api_server_pids(main)) == 2 and victim not in current
                                     and time.monotonic()), hang + 10, interval=0.01)
        finally:
            with contextlib.suppress(ProcessLookupError):
                if alive(victim):
                    os.kill(victim, signal.SIGCONT)
        sender.join(hang + 25)
        time.sleep(1.0)
    held.close()
    samples = traffic.samples
    counts = Counts.of(samples)
    died_s = None if gone is None else gone - stopped
    kill = Kill(victim, stopped, died_s=died_s, replaced_s=None if back is None else back - stopped)
    why = describe([kill], counts, server)

    assert died_s is not None, f"the stopped API server was never killed{why}"
    assert hang - 0.2 <= died_s <= hang + 1.75, f"stopped API server killed after {died_s:.2f} s{why}"
    assert kill.replaced_s is not None and kill.replaced_s <= hang + 3.0, f"no timely replacement{why}"
    log = server.log()
    assert len(re.findall(rf"API server \d \(pid {victim}\) did not answer a ping", log)) == 1, why
    assert len(outcome) == 1, f"the request on the stopped API server's connection never ended{why}"
    took, result = outcome[0]
    assert isinstance(result, Exception) and not isinstance(result, TimeoutError), \
        f"the held connection's request ended with {result!r} after {took:.2f} s{why}"
    assert took <= died_s + 0.5, f"the held connection's request failed {took:.2f} s after the stop{why}"
    assert_only_good_http_answers(counts, why, connection_errors_allowed=True)
    assert counts.unavailable == 0, f"503s although every worker lived{why}"
    lost = [s for s in samples if s.status is None and not stopped <= s.done <= stopped + died_s + 0.5]
    assert not lost, f"connection errors that were not the stopped API server's: {lost[:3]}{why}"
    pings = [s for s in traffic.pings if stopped + 0.05 <= s.sent <= stopped + died_s]
    assert pings and all(s.status == 200 for s in pings), f"fresh connections during the stop: {pings}{why}"
    assert sum(s.latency < 0.5 for s in pings) >= 0.75 * len(pings), f"slow fresh connections: {pings}{why}"
    assert alive(other) and other in api_server_pids(main), f"the API server that answered was killed{why}"
    assert [probe(server.url, "/health/ready") for _ in range(10)] == [200] * 10
    for _ in range(10):
        response = httpx.post(server.url + "/predict", json={"input": [0.5] * 10}, timeout=10)
        assert response.status_code == 200 and response.json()["model_version"] == version
