"""Side-by-side benchmark of simplenn-serve against a floor, a plain baseline and (``--peers``) TorchServe and
KServe, in ONE run.

Servers (each a subprocess on a free 127.0.0.1 port, in its own process group, stopped at the end
with SIGTERM then SIGKILL even on error):

* ``floor``    - a no-op ASGI app on uvicorn (uvloop/httptools when installed) that answers every
  POST with a small fixed JSON: the ceiling of HTTP + load generator on this machine;
* ``baseline`` - plain FastAPI + pydantic, SimpleNN computed in-process per request under
  ``torch.inference_mode()``, one uvicorn process, same weights and wire format as the project;
* ``project``  - the project server, ``python -m serve --host 127.0.0.1 --port P``, ready when
  ``GET /health/ready`` answers 200;
* ``grpc``     - with ``--grpc``: the same project server over its gRPC port (Open Inference Protocol
  ``ModelInfer``, raw FP32), loaded by h2load instead of wrk (``bench/grpcload.py``); "conns" are
  concurrent streams;
* ``torchserve``, ``kserve`` - with ``--peers``: the peer servers of ``bench/peers.py``, each installed
  into a virtual environment of its own on first use, each asked in its own protocol (``bench/wire.py``).

What is measured, with wrk (keep-alive, ``bench/post.lua``), each run bounded to ``--duration``:

* single-row requests (``{"input": [...]}``, or the server's own form) at 1, 16 and 64 connections:
  req/s, p50/p99 latency;
* rows/s for 1-, 64- and 1,024-row requests at 16 connections (1 row is the single-row run), in each
  server's JSON protocol, and for 1,024-row requests in the Open Inference Protocol V2 binary form
  (scenario flavour ``v2bin``, ``--v2bin-rows``) for the servers that speak it (the floor answers it as
  the no-op it is: the ceiling of that upload);
* server CPU per request: utime+stime summed over the server's whole process tree (from
  /proc/<pid>/stat, before and after each run) divided by completed requests;
* per server: the time from launch to ready (servers start one after another, so each has the machine
  to itself), and its memory, PSS summed over its process tree, once ready and after the last run
  (for this project's servers also PSS and RSS by process role: supervisor, API servers, inference
  workers, other); then its idle CPU: the whole tree's utime+stime over ``--idle-s`` seconds with no
  traffic, every server over the same window (% of one core).

Rounds are interleaved: each round measures every server at every scenario, servers back to back
for one scenario (their order rotating from round to round), so slow drift of a shared machine
hits all of them alike. Figures are medians over rounds; each is also a ratio to the floor and to
the baseline, the median of per-round ratios (each from two runs seconds apart). Non-2xx
responses and socket errors are errors and are reported per server.

Output: a markdown-style table on stdout, and ``<timestamp>.json`` plus ``<timestamp>.png`` in
``--out`` (default bench/results/).

    .venv/bin/python bench/run.py [--duration 5] [--rounds 3] [--smoke] [--grpc] [--peers] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: import bench, models

from bench import grpcload, loadgen, peers, report, wire
from bench.servers import RunningServer, ServerSpec, ServerStartError, role_memory
from bench.wire import PreparedRequest, Wire, WireError

REPO_ROOT = Path(__file__).resolve().parents[1]

SERVER_NAMES = ("floor", "baseline", "project", "grpc", "before", *peers.PEER_NAMES)
DEFAULT_SERVERS = ("floor", "baseline", "project")  # --grpc, --before and --peers add theirs
REFERENCES = ("floor", "baseline")
METRICS = ("req_s", "rows_s", "p50_us", "p99_us", "cpu_us_per_req")
CHECK_ROWS = 3  # rows in the batch request of the pre-flight check
AGREE_TOLERANCE = 1e-4  # |server - baseline| allowed in the pre-flight check
JSON, V2BIN = "json", "v2bin"  # scenario flavours: each server's own JSON protocol; OIP V2 binary tensors
GRPC_WIRE = "grpc-v2"  # what the grpc server speaks in its JSON-flavour scenarios (h2load, bench/grpcload.py)

# The wire each server speaks per flavour; a server without a flavour sits out its scenarios. The floor
# answers any POST, so it takes the V2 binary upload as a no-op: the ceiling of that body over HTTP.
PROJECT_WIRES: dict[str, Wire] = {JSON: wire.NATIVE, V2BIN: wire.V2_BINARY}
SERVER_WIRES: dict[str, Mapping[str, Wire]] = {
    "floor": PROJECT_WIRES,
    "baseline": {JSON: wire.NATIVE},
    "project": PROJECT_WIRES,
    "grpc": {JSON: wire.NATIVE},  # its scenarios; the requests are h2load's (bench/grpcload.py)
    "before": PROJECT_WIRES,
    **{name: peer.wires for name, peer in peers.PEERS.items()},
}


@dataclass(frozen=True)
class Scenario:
    """One load shape: rows per request, concurrent connections, and the flavour of the request."""

    rows: int
    conns: int
    flavour: str = JSON

    @property
    def id(self) -> str:
        base = f"rows{self.rows}_c{self.conns}"
        return base if self.flavour == JSON else f"{self.flavour}_{base}"


@dataclass
class Measurement:
    """One wrk run against one server; ``failure`` says why a run produced no figures."""

    round: int
    server: str
    scenario: str
    rows: int
    conns: int
    flavour: str = JSON
    wire: str | None = None
    requests: int = 0
    ok_requests: int = 0
    errors: int = 0
    error_detail: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    req_s: float | None = None
    rows_s: float | None = None
    p50_us: float | None = None
    p90_us: float | None = None
    p99_us: float | None = None
    cpu_us_per_req: float | None = None
    background_cpu_ms: float | None = None  # CPU the other servers used meanwhile
    failure: str | None = None


def int_list(text: str) -> list[int]:
    """Parse "1,16,64" into [1, 16, 64] (positive integers)."""
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,16,64, got {text!r}")
    return values


def int_list_or_none(text: str) -> list[int]:
    """:func:`int_list`, or [] for "none"."""
    return [] if text.strip().lower() == "none" else int_list(text)


def name_list(text: str) -> list[str]:
    """Parse "floor,baseline" into known server names, in the canonical order."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = names - set(SERVER_NAMES)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"servers must be among {','.join(SERVER_NAMES)}")
    return [name for name in SERVER_NAMES if name in names]


def choose_servers(listed: Sequence[str] | None, grpc: bool, before: bool, with_peers: bool) -> list[str]:
    """The servers to run, in canonical order: ``listed`` (default floor, baseline, project, and before when
    a checkout is given), plus grpc with ``grpc`` and the peers with ``with_peers``."""
    chosen = set(listed) if listed is not None else {*DEFAULT_SERVERS, *(["before"] if before else [])}
    chosen |= ({"grpc"} if grpc else set()) | (set(peers.PEER_NAMES) if with_peers else set())
    return [name for name in SERVER_NAMES if name in chosen]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (:func:`build_parser`), checked, with the servers chosen and the defaults that depend
    on ``--smoke`` filled in."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.servers = choose_servers(args.servers, args.grpc, args.before is not None, args.peers)
    if "before" in args.servers and args.before is None:
        parser.error("--servers before needs --before DIR")
    if "grpc" in args.servers and "project" not in args.servers:
        parser.error("grpc measures the project server: add project to --servers")
    args.duration = args.duration or (1 if args.smoke else 5)
    args.rounds = args.rounds or (1 if args.smoke else 3)
    args.idle_s = (1.0 if args.smoke else 20.0) if args.idle_s is None else args.idle_s
    return args


def build_parser() -> argparse.ArgumentParser:
    """The options of the command line (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, help="seconds per measurement (default 5; smoke 1)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; smoke 1)")
    parser.add_argument("--smoke", action="store_true", help="quick check: 1 round of 1 s runs")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "bench" / "results",
        help="folder for <timestamp>.json and .png (default bench/results)",
    )
    parser.add_argument(
        "--servers",
        type=name_list,
        default=None,
        help=f"comma list among {','.join(SERVER_NAMES)} (default floor,baseline,project; --grpc, --before "
        "and --peers add theirs)",
    )
    parser.add_argument("--grpc", action="store_true",
                        help="also measure the project server over gRPC with h2load, as server 'grpc'")
    parser.add_argument("--peers", action="store_true",
                        help="also measure TorchServe and KServe (bench/peers.py; installed on first use into "
                        "$SIMPLENN_BENCH_CACHE, default ~/.cache/simplenn-bench)")
    parser.add_argument(
        "--conns", type=int_list, default=[1, 16, 64], help="connections for the single-row runs (default 1,16,64)"
    )
    parser.add_argument(
        "--rows", type=int_list, default=[1, 64, 1024], help="rows per request for the rows/s runs (default 1,64,1024)"
    )
    parser.add_argument("--rows-conns", type=int, default=16, help="connections for the rows/s runs (default 16)")
    parser.add_argument(
        "--v2bin-rows", type=int_list_or_none, default=[1024],
        help="rows per request for the Open Inference Protocol V2 binary runs at --rows-conns (default 1024; none)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=REPO_ROOT / "weights" / "model.pth",
        help="state_dict for baseline and project (default weights/model.pth)",
    )
    parser.add_argument(
        "--baseline-threads",
        type=int,
        default=1,
        help="torch intra-op threads in the baseline (default 1, as in the project's workers)",
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=60.0, help="seconds to wait for each server's readiness (default 60)"
    )
    parser.add_argument("--before", type=Path, default=None,
                        help="a checkout of an earlier commit (git worktree add DIR REV): adds its server as 'before'")
    parser.add_argument("--project-args", default="", help='extra CLI args for the project server, e.g. "--workers 2"')
    parser.add_argument("--idle-s", type=float, default=None,
                        help="after the runs, seconds of no traffic over which each server's CPU is measured "
                        "(default 20; smoke 1; 0 skips it)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return parser


def build_scenarios(conns: Sequence[int], rows: Sequence[int], rows_conns: int,
                    v2bin_rows: Sequence[int] = ()) -> list[Scenario]:
    """Single-row runs at each of ``conns`` plus each of ``rows`` at ``rows_conns``, deduplicated, then the
    V2 binary runs of ``v2bin_rows`` rows at ``rows_conns``."""
    pairs = {(1, c) for c in conns} | {(r, rows_conns) for r in rows}
    binary = [Scenario(rows=r, conns=rows_conns, flavour=V2BIN) for r in sorted(set(v2bin_rows))]
    return [Scenario(rows=r, conns=c) for r, c in sorted(pairs)] + binary


def uvicorn_fast_flags() -> list[str]:
    """``--loop uvloop --http httptools`` where installed, else uvicorn's pure-Python defaults."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return ["--loop", loop, "--http", http]


def server_specs(args: argparse.Namespace) -> dict[str, ServerSpec]:
    """How to start each server; ``{port}``/``{host}`` are filled in at launch."""
    py = sys.executable
    uvicorn = [
        py,
        "-m",
        "uvicorn",
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--log-level",
        "warning",
        "--no-access-log",
        *uvicorn_fast_flags(),
    ]
    weights = str(args.weights.resolve())
    return {
        "floor": ServerSpec("floor", [*uvicorn, "bench.apps.floor_app:app"], ready_timeout_s=args.ready_timeout),
        "baseline": ServerSpec(
            "baseline",
            [*uvicorn, "bench.apps.baseline_app:app"],
            env={"BENCH_WEIGHTS": weights, "BENCH_TORCH_THREADS": str(args.baseline_threads)},
            ready_timeout_s=args.ready_timeout,
        ),
        "project": ServerSpec(
            "project",
            [py, "-m", "serve", "--host", "{host}", "--port", "{port}", *shlex.split(args.project_args)],
            env={"SIMPLENN_HOST": "{host}", "SIMPLENN_PORT": "{port}", "SIMPLENN_GRPC_PORT": "{grpc_port}",
                 "SIMPLENN_WEIGHTS": weights},
            ready_timeout_s=args.ready_timeout,
        ),
        # The same server from an earlier checkout, for before/after figures in one run.
        "before": ServerSpec(
            "before",
            [py, "-c", "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); runpy.run_module('serve', "
             "run_name='__main__')", str(args.before), "--host", "{host}", "--port", "{port}",
             *shlex.split(args.project_args)],
            env={"SIMPLENN_HOST": "{host}", "SIMPLENN_PORT": "{port}", "SIMPLENN_WEIGHTS": weights},
            ready_timeout_s=args.ready_timeout,
        ),
    }


def git_commit() -> str | None:
    """HEAD's commit id, with "-dirty" if the work tree has changes; None outside git."""

    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return commit + ("-dirty" if dirty else "")


def collect_meta(args: argparse.Namespace, wrk: str, scenarios: list[Scenario], h2load: str | None) -> dict[str, Any]:
    """The header of the report: when, where, how."""
    import torch

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "command": shlex.join([sys.executable, *sys.argv]),
        "git_commit": git_commit(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "wrk": loadgen.wrk_version(wrk),
        "h2load": grpcload.h2load_version(h2load) if h2load else None,
        "uvicorn_flags": uvicorn_fast_flags(),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "smoke": args.smoke,
        "weights": str(args.weights),
        "baseline_threads": args.baseline_threads,
        "servers": args.servers,
        "scenarios": [asdict(s) | {"id": s.id} for s in scenarios],
        "wires": {name: {flavour: wire_name(name, flavour) for flavour in SERVER_WIRES[name]} for name in args.servers},
    }


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so ``finally`` blocks stop the servers."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def prepare_peers(
    names: Sequence[str], args: argparse.Namespace, run_dir: Path
) -> tuple[dict[str, ServerSpec], dict[str, str]]:
    """Specs of the peers in ``names`` (installed on first use) and, for each that cannot run, why."""
    specs: dict[str, ServerSpec] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:
            specs[name] = peers.peer_spec(name, args.weights, run_dir, args.ready_timeout,
                                          log=lambda line: print(line, file=sys.stderr, flush=True))
        except (peers.PeerError, OSError, subprocess.SubprocessError) as exc:
            errors[name] = str(exc)
            print(f"!! {exc}", file=sys.stderr)
    return specs, errors


def mib(server: RunningServer) -> float | None:
    """The PSS of a live server's process tree in MiB, None once it has exited."""
    return server.pss_bytes() / 2**20 if server.alive() else None


def start_servers(
    specs: Sequence[ServerSpec], log_dir: Path, stack: ExitStack
) -> tuple[dict[str, RunningServer], dict[str, dict[str, Any]]]:
    """Launch the servers one after another, each once the one before is ready (so each start-up has the
    machine to itself), each stopped when ``stack`` closes.

    Returns the ready servers and, for every server, its info (command, startup time, PSS once ready, error).
    """
    ready: dict[str, RunningServer] = {}
    info: dict[str, dict[str, Any]] = {}
    for spec in specs:
        server = RunningServer(spec, log_dir)
        stack.callback(server.stop)
        server.launch()
        entry: dict[str, Any] = {"command": shlex.join(spec.argv), "error": None, "pss_ready_mib": None}
        try:
            server.wait_ready()
            ready[spec.name] = server
            entry["pss_ready_mib"] = mib(server)
        except ServerStartError as exc:
            entry["error"] = str(exc)
            print(f"!! {exc}", file=sys.stderr)
        entry["startup_s"] = server.startup_s
        info[spec.name] = entry
    return ready, info


def check_wire(server: RunningServer, wire_: Wire, decode: bool = True) -> dict[str, Any]:
    """One single-row and one batch request in ``wire_``; the reply must have its shape (the floor, with
    ``decode`` false, only has to answer 200). Returns {"ok", "detail", "outputs"}."""
    outputs: list[float] = []
    for rows in (1, CHECK_ROWS):
        request = wire_.request(rows, seed=rows)
        status, body = server.request("POST", request.path, request.body, headers=request.headers)
        where = f"{rows}-row {wire_.name} POST {request.path}"
        if status != 200:
            return {"ok": False, "detail": f"{where} -> {status}: {body[:300]!r}", "outputs": outputs}
        if decode:
            try:
                outputs += wire_.decode(body, rows)
            except WireError as exc:
                return {"ok": False, "detail": f"{where}: reply {body[:200]!r}: {exc}", "outputs": outputs}
    return {"ok": True, "detail": "ok", "outputs": outputs}


def check_server(server: RunningServer, wires: Mapping[str, Wire]) -> dict[str, Any]:
    """Pre-flight in every flavour the server speaks. Returns {"ok", "detail", "outputs": {flavour: [...]}}."""
    decode = server.spec.name != "floor"
    results = {flavour: check_wire(server, wire_, decode) for flavour, wire_ in wires.items()}
    bad = [result["detail"] for result in results.values() if not result["ok"]]
    return {"ok": not bad, "detail": "; ".join(bad) or "ok",
            "outputs": {flavour: result["outputs"] for flavour, result in results.items()}}


def agreement(check: dict[str, Any], reference: Sequence[float]) -> bool:
    """Every flavour's outputs equal the reference (the baseline's) within AGREE_TOLERANCE."""
    return all(
        len(ours) == len(reference) > 0
        and all(abs(a - b) <= AGREE_TOLERANCE for a, b in zip(ours, reference, strict=True))
        for ours in check["outputs"].values()
    )


def preflight(
    servers: dict[str, RunningServer],
    info: dict[str, dict[str, Any]],
    wrk: str,
    requests: Mapping[tuple[str, int], PreparedRequest],
    warmup_s: int,
    grpc_load: grpcload.GrpcLoad | None = None,
) -> None:
    """Check every server's replies (and all but the references' outputs against the baseline's), then warm
    it up with single-row requests in its JSON wire."""
    for name, server in servers.items():
        if name == "grpc":
            check = grpcload.check(server, (1, CHECK_ROWS))
            info[name]["check"] = {**check, "outputs": {JSON: check["outputs"]}}
        else:
            info[name]["check"] = check_server(server, SERVER_WIRES[name])
        if not info[name]["check"]["ok"]:
            print(f"!! {name}: {info[name]['check']['detail']}", file=sys.stderr)
        try:
            if name == "grpc" and grpc_load is not None:
                grpc_load.run(server, rows=1, streams=4, duration_s=warmup_s)
            else:
                warm = requests[(SERVER_WIRES[name][JSON].name, 1)]
                loadgen.run_wrk(wrk, server.url + warm.path, warm.body_file, conns=4, duration_s=warmup_s,
                                headers=warm.headers)
        except (loadgen.WrkError, grpcload.H2loadError) as exc:
            print(f"!! {name}: warm-up failed: {exc}", file=sys.stderr)
    if "baseline" not in servers:
        return
    reference = info["baseline"]["check"]["outputs"][JSON]
    for name in servers:
        if name not in REFERENCES:
            agree = agreement(info[name]["check"], reference)
            info[name]["check"]["agrees_with_baseline"] = agree
            if not agree:
                print(f"!! {name} outputs {info[name]['check']['outputs']} differ from baseline {reference}",
                      file=sys.stderr)


def measure(
    server: RunningServer,
    others: Sequence[RunningServer],
    scenario: Scenario,
    request: PreparedRequest | None,
    wrk: str,
    duration_s: int,
    round_no: int,
    grpc_load: grpcload.GrpcLoad | None = None,
) -> Measurement:
    """One wrk run of ``request`` against ``server`` (an h2load run over gRPC with ``grpc_load``), with the CPU
    its process tree used meanwhile."""
    name = "grpc" if grpc_load is not None else server.spec.name
    m = Measurement(round=round_no, server=name, scenario=scenario.id, rows=scenario.rows, conns=scenario.conns,
                    flavour=scenario.flavour, wire=wire_name(name, scenario.flavour))
    if not server.alive():
        m.failure = f"server exited; log tail:\n{server.log_tail()}"
        return m
    cpu_before = server.cpu_seconds()
    background_before = sum(o.cpu_seconds() for o in others if o.alive())
    try:
        if grpc_load is not None:
            result = grpc_load.run(server, scenario.rows, scenario.conns, duration_s)
        else:
            assert request is not None, "an HTTP run needs a request"
            result = loadgen.run_wrk(wrk, server.url + request.path, request.body_file, scenario.conns, duration_s,
                                     headers=request.headers)
    except (loadgen.WrkError, grpcload.H2loadError) as exc:
        m.failure = str(exc)
        return m
    if not server.alive():
        m.failure = f"server exited during the run; log tail:\n{server.log_tail()}"
        return m
    cpu_s = server.cpu_seconds() - cpu_before
    background_s = sum(o.cpu_seconds() for o in others if o.alive()) - background_before
    m.requests, m.ok_requests, m.errors = result.requests, result.ok_requests, result.errors
    m.error_detail = {**result.socket_errors, "non2xx": result.non2xx}
    m.duration_s = result.duration_s
    m.req_s = result.ok_requests / result.duration_s if result.duration_s else None
    m.rows_s = m.req_s * scenario.rows if m.req_s is not None else None
    m.p50_us, m.p90_us, m.p99_us = result.p50_us, result.p90_us, result.p99_us
    m.cpu_us_per_req = cpu_s * 1e6 / result.requests if result.requests else None
    m.background_cpu_ms = background_s * 1e3
    return m


def wire_name(server: str, flavour: str) -> str | None:
    """The name of the wire ``server`` speaks in scenarios of ``flavour``, None when it sits them out."""
    spoken = SERVER_WIRES[server].get(flavour)
    if spoken is None:
        return None
    return GRPC_WIRE if server == "grpc" else spoken.name


def run_rounds(
    servers: dict[str, RunningServer],
    scenarios: Sequence[Scenario],
    requests: Mapping[tuple[str, int], PreparedRequest],
    wrk: str,
    duration_s: int,
    rounds: int,
    grpc_load: grpcload.GrpcLoad | None = None,
) -> list[Measurement]:
    """Every round: for each scenario, each server that speaks its flavour back to back (order rotates by
    round)."""
    names = list(servers)
    measurements: list[Measurement] = []
    for round_no in range(rounds):
        shift = round_no % len(names) if names else 0
        order = names[shift:] + names[:shift]
        for scenario in scenarios:
            for name in order:
                spoken = SERVER_WIRES[name].get(scenario.flavour)
                if spoken is None:
                    continue
                others = [s for s in {id(s): s for s in servers.values()}.values() if s is not servers[name]]
                request = None if name == "grpc" else requests[(spoken.name, scenario.rows)]
                m = measure(servers[name], others, scenario, request, wrk, duration_s, round_no,
                            grpc_load if name == "grpc" else None)
                measurements.append(m)
                print(
                    f"round {round_no + 1}/{rounds} {scenario.id:>19} {name:>10}: "
                    f"{report.fmt_num(m.req_s)} req/s, {m.errors} errors"
                    + (f" FAILED: {m.failure.splitlines()[0]}" if m.failure else ""),
                    file=sys.stderr,
                    flush=True,
                )
    return measurements


def median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def summarize(
    measurements: Sequence[Measurement], scenarios: Sequence[Scenario], names: Sequence[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """summary[scenario_id][server]: medians over rounds, totals, and ratios to the references, for the
    servers that ran the scenario (scenarios no server ran are left out).

    ``vs_floor`` / ``vs_baseline`` hold, per metric, the median over rounds of
    (this server's figure / the reference's figure in the same round and scenario).
    """
    by_key = {(m.round, m.scenario, m.server): m for m in measurements if m.failure is None}
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for sc in scenarios:
        entries: dict[str, dict[str, Any]] = {}
        for name in names:
            runs = [m for m in measurements if m.scenario == sc.id and m.server == name]
            if not runs:
                continue
            good = [m for m in runs if m.failure is None]
            entry: dict[str, Any] = {
                "scenario": sc.id,
                "rows": sc.rows,
                "conns": sc.conns,
                "flavour": sc.flavour,
                "wire": runs[0].wire,
                "rounds": len(good),
                "requests": sum(m.requests for m in good),
                "errors": sum(m.errors for m in good),
                "failures": [m.failure for m in runs if m.failure],
            }
            for metric in METRICS:
                entry[metric] = median_or_none([getattr(m, metric) for m in good])
            for ref in REFERENCES:
                entry[f"vs_{ref}"] = {
                    metric: median_or_none(
                        [
                            ratio(getattr(m, metric), getattr(by_key.get((m.round, sc.id, ref)), metric, None))
                            for m in good
                        ]
                    )
                    for metric in METRICS
                }
            entries[name] = entry
        if entries:
            summary[sc.id] = entries
    return summary


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def prepare_requests(
    folder: Path, names: Sequence[str], scenarios: Sequence[Scenario]
) -> dict[tuple[str, int], PreparedRequest]:
    """One request (its body in a file) per (wire name, rows) that ``names`` need for ``scenarios``, plus each
    server's single-row JSON request (the warm-up)."""
    requests: dict[tuple[str, int], PreparedRequest] = {}
    for name in names:
        for flavour, wire_ in SERVER_WIRES[name].items():
            counts = {s.rows for s in scenarios if s.flavour == flavour} | ({1} if flavour == JSON else set())
            for rows in sorted(counts):
                if (wire_.name, rows) not in requests:
                    requests[(wire_.name, rows)] = wire_.prepare(folder, rows, seed=rows)
    return requests


def record_memory(servers: Mapping[str, RunningServer], info: dict[str, dict[str, Any]], key: str) -> None:
    """``info[name][key]``: each server's PSS now, in MiB; for this project's servers also PSS and RSS by
    process role (``memory_by_role``)."""
    for name, server in servers.items():
        info[name][key] = mib(server)
        if name in ("project", "before") and server.alive():
            info[name]["memory_by_role"] = role_memory(server.pid)


def record_idle(servers: Mapping[str, RunningServer], info: dict[str, dict[str, Any]], seconds: float) -> None:
    """``info[name]["idle_cpu_pct"]``: each server's CPU (whole process tree, % of one core) over ``seconds``
    with no traffic, all servers measured over the same window."""
    distinct = {name: server for name, server in servers.items() if name != "grpc" and server.alive()}
    before = {name: server.cpu_seconds() for name, server in distinct.items()}
    time.sleep(seconds)
    for name, server in distinct.items():
        info[name]["idle_cpu_pct"] = 100 * (server.cpu_seconds() - before[name]) / seconds


def save_and_print(result: dict[str, Any], out: Path, plot: bool) -> None:
    """Write ``<UTC time>.json`` (and, with ``plot``, the ``.png``) in ``out`` and print the report."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(report.format_report(result))
    print(f"\nJSON: {json_path}")
    if plot:
        png_path = report.plot(result, json_path.with_suffix(".png"))
        print(f"plot: {png_path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark of the command line ``argv``; the exit status (1 when a server or a run failed, 2 when
    wrk or h2load is missing)."""
    args = parse_args(argv)
    try:
        wrk = loadgen.find_wrk()
    except loadgen.WrkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        h2load = grpcload.find_h2load() if "grpc" in args.servers else None
    except grpcload.H2loadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    scenarios = build_scenarios(args.conns, args.rows, args.rows_conns, args.v2bin_rows)
    meta = collect_meta(args, wrk, scenarios, h2load)
    specs = server_specs(args)
    peer_names = [name for name in args.servers if name in peers.PEERS]
    os.chdir(REPO_ROOT)  # servers import bench.* / serve / models from the repository root
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="simplenn-bench-") as tmp_dir, ExitStack() as stack:
        tmp = Path(tmp_dir)
        peer_specs, peer_errors = prepare_peers(peer_names, args, tmp)
        specs.update(peer_specs)
        meta["peers"] = peers.peer_meta(peer_names)
        started, info = start_servers([specs[n] for n in args.servers if n in specs and n != "grpc"], tmp, stack)
        info |= {name: {"command": None, "error": error, "startup_s": None} for name, error in peer_errors.items()}
        grpc_load = None
        if h2load is not None and "project" in started:
            rows = {1, *(s.rows for s in scenarios if s.flavour == JSON)}
            grpc_load = grpcload.GrpcLoad(h2load, grpcload.write_bodies(tmp, rows), tmp)
            started["grpc"] = started["project"]  # the same process, measured over gRPC
            info["grpc"] = {**info["project"], "command": f"{h2load} -> the project's gRPC port"}
        servers = {name: started[name] for name in args.servers if name in started}
        info = {name: info[name] for name in args.servers if name in info}
        requests = prepare_requests(tmp, list(servers), scenarios)
        preflight(servers, info, wrk, requests, warmup_s=1, grpc_load=grpc_load)
        measurements = run_rounds(servers, scenarios, requests, wrk, args.duration, args.rounds, grpc_load)
        record_memory(servers, info, "pss_end_mib")
        if args.idle_s:
            record_idle(servers, info, args.idle_s)
    result = {
        "meta": meta,
        "servers": info,
        "summary": summarize(measurements, scenarios, list(servers)),  # the ones that started
        "measurements": [asdict(m) for m in measurements],
    }
    save_and_print(result, args.out, plot=not args.no_plot)
    failed = any(e["error"] for e in info.values()) or any(m.failure for m in measurements)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
