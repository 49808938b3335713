"""Soak: bounded-time load with periodic weight swaps, reporting errors, RSS trend and open file descriptors.

Starts ``python -m serve`` on a free 127.0.0.1 port on a temporary copy of the weights, runs
``--clients`` client threads of single-row ``/predict`` requests at a capped total ``--rate`` for
``--duration`` seconds, publishes a new state_dict (``torch.save`` then ``os.replace``) every
``--swap-every`` seconds, and every ``--sample-every`` seconds records, per server process (main,
manager, inference worker(s), API servers, resource tracker): RSS and open file descriptors (from
/proc), plus requests ok and errors and the p99 latency of that interval. An error is any answer
that is not 200, no answer, an unknown version, or an output that differs from the in-process model
of the version the answer names (see ``bench/reload.py``, whose helpers this reuses).

At the end it prints a table per process (start, end, max, trend per minute from a least-squares
fit over the samples after the first minute, or all samples in shorter runs), the per-interval table,
and writes ``bench/results/soak-<UTC time>.json``. It stops by itself and always stops the server's
whole process tree (also on Ctrl-C or SIGTERM). Exit status 1 on any error, a swap never served,
or a server process that died.

    .venv/bin/python bench/soak.py                               # 120 s, a swap every 5 s
    .venv/bin/python bench/soak.py --duration 600 --swap-every 2 --workers 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: import bench, models

from bench.reload import (
    RESULTS,
    ROOT,
    SHIPPED_WEIGHTS,
    Load,
    Publisher,
    Sample,
    Server,
    error_summary,
    latency_summary,
    sigterm_as_interrupt,
    start_load,
    start_server,
    torch,
    write_json,
)


def slope_per_minute(times: list[float], values: list[float]) -> float | None:
    """Least-squares slope of ``values`` over ``times`` (seconds), per minute."""
    if len(times) < 3 or max(times) - min(times) < 1:
        return None
    return float(np.polyfit(times, values, 1)[0] * 60)


class Sampler:
    """The per-interval samples of a soak: each ``take(now)`` records, for the requests sent since the last
    one, ok and errors and p99, and a snapshot of the server's processes, and prints a line of the table."""

    def __init__(self, server: Server, load: Load, published: list[tuple[float, str]], started: float) -> None:
        self.server, self.load, self.published, self.started = server, load, published, started
        self.last = started
        self.intervals: list[dict[str, Any]] = []

    def take(self, now: float) -> None:
        """Record (and print) the interval from the last sample to ``now``."""
        snapshot = self.server.snapshot()
        window = [s for s in self.load.all_samples() if self.last <= s.sent < now]
        lat, err = latency_summary(window), error_summary(window)
        self.intervals.append({"t": round(now - self.started, 1), "swaps": len(self.published), "ok": err["ok"],
                               "errors": err["errors"], "p99_ms": lat["p99_ms"], "processes": snapshot})
        rss = sum(p["rss_kib"] or 0 for p in snapshot.values()) / 1024
        fds = sum(p["fds"] or 0 for p in snapshot.values())
        p99 = "-" if lat["p99_ms"] is None else f"{lat['p99_ms']:.1f} ms"
        print(f"{now - self.started:>6.0f} {len(self.published):>6} {err['ok']:>8} {err['errors']:>7} {p99:>9} "
              f"{rss:>7.1f} MiB {fds:>10}  {len(snapshot)}", flush=True)
        self.last = now


def run_soak(publisher: Publisher, sampler: Sampler, args: argparse.Namespace) -> None:
    """Until ``args.duration`` after the sampler's start: a swap every ``args.swap_every`` seconds (appended to
    the sampler's ``published``), a sample every ``args.sample_every`` seconds and one at the end."""
    started = sampler.started
    next_swap, next_sample = started + args.swap_every, started
    while True:
        now = time.monotonic()
        if now - started >= args.duration:
            sampler.take(now)
            break
        if now >= next_swap:
            renamed, version = publisher.next()
            sampler.published.append((renamed, version.version))
            next_swap += args.swap_every
        if now >= next_sample:
            sampler.take(now)
            next_sample += args.sample_every
        time.sleep(max(0.0, min(next_swap, next_sample, started + args.duration) - time.monotonic()))


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """The whole soak (see the module's docstring): the result as ``write_json`` writes it, with the server's
    log under ``server_log``."""
    env = {"SIMPLENN_LOG_LEVEL": "info", "SIMPLENN_WORKERS": str(args.workers)}
    workdir, weights, server = start_server("simplenn-soak-", args, env)
    load: Load | None = None
    published: list[tuple[float, str]] = []
    try:
        startup = server.wait_ready().startup_s
        publisher, load = start_load(server, weights, args, seed=5000)
        sampler = Sampler(server, load, published, time.monotonic())
        print(f"server up in {startup:.1f} s (pid {server.pid}); soaking for {args.duration:.0f} s, "
              f"a swap every {args.swap_every:.1f} s, a sample every {args.sample_every:.1f} s", flush=True)
        print(f"{'t':>6} {'swaps':>6} {'ok':>8} {'errors':>7} {'p99':>9} {'RSS total':>11} {'fds total':>10}  procs",
              flush=True)
        run_soak(publisher, sampler, args)
        time.sleep(min(3.0, args.swap_every))  # let the last swap be served
        load.stop()
        samples = load.all_samples()
        final = server.snapshot()
        alive = server.alive()
    finally:
        if load is not None:
            load.stop()
        code = server.stop()
        server_log = server.log_path.read_text(errors="replace")
        shutil.rmtree(workdir, ignore_errors=True)
    server_info = {"startup_s": round(startup, 2), "alive_at_end": alive, "exit_code": code}
    result = soak_result(args, server_info, sampler.intervals, published, load.first_seen, samples, final)
    result["server_log"] = server_log
    return result


def soak_result(args: argparse.Namespace, server_info: dict[str, Any], intervals: list[dict[str, Any]],
                published: list[tuple[float, str]], first_seen: dict[str, float], samples: list[Sample],
                final: dict[str, dict]) -> dict[str, Any]:
    """The result but for the server's log: settings, ``server_info``, swaps published and served, requests,
    the per-interval p99 range, per-process figures (:func:`summarize_processes`) and the intervals."""
    served = sum(1 for _, version in published if version in first_seen)
    reload_s = [first_seen[v] - t for t, v in published if v in first_seen]
    lat_all = latency_summary(samples)
    return {
        "kind": "soak",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "server": server_info,
        "swaps": {"published": len(published), "served": served,
                  "first_answer_ms_p50": _ms(np.percentile(reload_s, 50)) if reload_s else None,
                  "first_answer_ms_max": _ms(max(reload_s)) if reload_s else None},
        "requests": error_summary(samples) | {"p50_ms": lat_all["p50_ms"], "p99_ms": lat_all["p99_ms"],
                                              "max_ms": lat_all["max_ms"]},
        "interval_p99_ms": {"min": _min([i["p99_ms"] for i in intervals]),
                            "max": _max([i["p99_ms"] for i in intervals])},
        "per_process": summarize_processes(intervals, final, warmup_s=args.trend_after_s),
        "intervals": intervals,
    }


def summarize_processes(intervals: list[dict[str, Any]], final: dict[str, dict], warmup_s: float) -> list[dict]:
    """Per process: RSS and fds at the first and last sample, max, and the trend per minute."""
    keys: list[str] = []
    for entry in intervals:
        keys.extend(k for k in entry["processes"] if k not in keys)
    rows = []
    for key in keys:
        points = [(e["t"], e["processes"][key]) for e in intervals if key in e["processes"]]
        rss = [(t, p["rss_kib"] / 1024) for t, p in points if p["rss_kib"] is not None]
        fds = [(t, p["fds"]) for t, p in points if p["fds"] is not None]
        span = max(t for t, _ in points) if points else 0
        after = warmup_s if span - warmup_s >= 30 else 0.0  # short runs: fit every sample
        rss_fit = [(t, v) for t, v in rss if t >= after]
        fds_fit = [(t, v) for t, v in fds if t >= after]
        rows.append({
            "process": key,
            "samples": len(points),
            "alive_at_end": key in final,
            "rss_start_mib": round(rss[0][1], 1) if rss else None,
            "rss_end_mib": round(rss[-1][1], 1) if rss else None,
            "rss_max_mib": round(max(v for _, v in rss), 1) if rss else None,
            "rss_trend_mib_per_min": _round(slope_per_minute([t for t, _ in rss_fit], [v for _, v in rss_fit]), 3),
            "fds_start": fds[0][1] if fds else None,
            "fds_end": fds[-1][1] if fds else None,
            "fds_max": max(v for _, v in fds) if fds else None,
            "fds_trend_per_min": _round(slope_per_minute([t for t, _ in fds_fit], [v for _, v in fds_fit]), 3),
            "trend_from_s": after,
        })
    return rows


def _ms(seconds: float) -> float:
    return round(float(seconds) * 1000, 1)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _min(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(min(present), 2) if present else None


def _max(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(max(present), 2) if present else None


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{round(value, 2) + 0.0:+.2f}{unit}" if unit.endswith("/min") else f"{value:,}{unit}"


def print_report(result: dict[str, Any]) -> None:
    req, swaps, s = result["requests"], result["swaps"], result["settings"]
    print()
    print(f"soak: {s['duration']:.0f} s, {s['clients']} clients at {s['rate']:.0f} req/s total, "
          f"{s['workers']} worker(s), a swap every {s['swap_every']:.1f} s")
    print(f"  requests: {req['ok']:,} ok, {req['errors']} errors {req['by_kind'] or ''}; latency p50 "
          f"{req['p50_ms'] or 0:.1f} ms, p99 {req['p99_ms'] or 0:.1f} ms (per {s['sample_every']:.0f} s interval: "
          f"{result['interval_p99_ms']['min']} .. {result['interval_p99_ms']['max']} ms)")
    print(f"  swaps: {swaps['published']} published, {swaps['served']} served; rename -> first new answer p50 "
          f"{swaps['first_answer_ms_p50']} ms, max {swaps['first_answer_ms_max']} ms")
    for example in req["examples"]:
        print(f"  e.g. {example}")
    print()
    print(f"  {'process (pid)':26}{'RSS start':>12}{'end':>11}{'max':>11}{'trend':>14}"
          f"{'fds start':>11}{'end':>6}{'max':>6}{'trend':>10}")
    for row in result["per_process"]:
        gone = "" if row["alive_at_end"] else "  (gone)"
        print(f"  {row['process']:26}{_fmt(row['rss_start_mib'], ' MiB'):>12}{_fmt(row['rss_end_mib'], ' MiB'):>11}"
              f"{_fmt(row['rss_max_mib'], ' MiB'):>11}{_fmt(row['rss_trend_mib_per_min'], ' MiB/min'):>14}"
              f"{_fmt(row['fds_start']):>11}{_fmt(row['fds_end']):>6}{_fmt(row['fds_max']):>6}"
              f"{_fmt(row['fds_trend_per_min'], '/min'):>10}{gone}")
    trend_from = {row["trend_from_s"] for row in result["per_process"]}
    print(f"  (trend: least-squares slope over the samples from t={max(trend_from, default=0):.0f} s on)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (then it stops by itself)")
    parser.add_argument("--swap-every", type=float, default=5.0, help="seconds between weight swaps")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--clients", type=int, default=8, help="client threads (one keep-alive connection each)")
    parser.add_argument("--rate", type=float, default=400, help="total requests per second cap (0: closed loop)")
    parser.add_argument("--workers", type=int, default=1, help="SIMPLENN_WORKERS")
    parser.add_argument("--server-args", default="", help="extra CLI flags for python -m serve")
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS, help="initial weights (copied)")
    parser.add_argument("--trend-after-s", type=float, default=60.0,
                        help="fit trends on samples after this many seconds (when at least 30 s remain)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.swap_every <= 0 or args.sample_every <= 0:
        parser.error("--duration, --swap-every and --sample-every must be positive")
    torch.set_num_threads(1)
    with sigterm_as_interrupt():
        result = soak(args)
    print_report(result)
    path = write_json(result, args.out, "soak")
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    failed = (result["requests"]["errors"] or result["swaps"]["served"] < result["swaps"]["published"]
              or not result["server"]["alive_at_end"] or not all(r["alive_at_end"] for r in result["per_process"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
