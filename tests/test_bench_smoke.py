"""Smoke test of the benchmark harness (bench/run.py): all three servers, one short round.

Runs ``bench/run.py --smoke`` restricted to one concurrency level (16) and one batch size (64), in
JSON and in the Open Inference Protocol V2 binary form, so the whole test takes about 25 s, and checks
the JSON it writes: header fields, each server's start-up time, memory (the project's by process role)
and idle CPU, one entry per server and
scenario with medians and ratios (the baseline, which does not speak V2 binary, sits that scenario
out), nonzero request counts, no errors for the floor and the baseline, and a PNG next to the JSON.
Needs wrk (``apt-get install wrk``): without it the test fails rather than skips, because the harness
cannot measure anything.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN = REPO_ROOT / "bench" / "run.py"
SERVERS = ("floor", "baseline", "project")
SCENARIOS = ("rows1_c16", "rows64_c16")
BINARY_SCENARIO = "v2bin_rows64_c16"  # floor (a no-op upload) and project only
METRICS = ("req_s", "rows_s", "p50_us", "p99_us", "cpu_us_per_req")
TIMEOUT_S = 90


def run_harness(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the harness; on timeout SIGTERM it first, so it stops the servers it started."""
    proc = subprocess.Popen(
        [sys.executable, str(RUN), *args],
        cwd=REPO_ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"bench/run.py took over {TIMEOUT_S} s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_bench_smoke(tmp_path: Path) -> None:
    """One smoke run of all three servers; then its JSON, PNG and table are checked."""
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed; the benchmark needs it: apt-get install wrk")
    done = run_harness(["--smoke", "--conns", "16", "--rows", "64", "--v2bin-rows", "64", "--out", str(tmp_path)])
    assert done.returncode == 0, (
        f"bench/run.py exited {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    )
    json_files = list(tmp_path.glob("*.json"))
    assert len(json_files) == 1, f"expected one JSON in {tmp_path}, found {json_files}"
    result = json.loads(json_files[0].read_text())
    check_header_and_files(result, json_files[0], done.stdout)
    check_every_server_started_and_answered(result)
    check_summary_structure_and_counts(result)
    check_binary_scenario(result)


def check_header_and_files(result: dict[str, Any], json_path: Path, stdout: str) -> None:
    """The run's header fields, the PNG next to the JSON, and the table on stdout."""
    meta = result["meta"]
    assert {"date", "nproc", "command", "git_commit", "duration_s", "rounds"} <= meta.keys()
    assert meta["nproc"] >= 1 and "--smoke" in meta["command"]
    assert meta["rounds"] == 1 and meta["duration_s"] == 1
    png = json_path.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Single-row requests" in stdout and "| baseline" in stdout


def check_every_server_started_and_answered(result: dict[str, Any]) -> None:
    """All three servers started, with a start-up time and memory, and passed the harness's pre-flight request
    check (the project's JSON and V2 binary outputs equal the baseline's)."""
    assert set(result["servers"]) == set(SERVERS)
    for name, info in result["servers"].items():
        assert info["error"] is None, f"{name} did not start: {info['error']}"
        assert info["check"]["ok"], f"{name} pre-flight check: {info['check']['detail']}"
        assert info["startup_s"] > 0 and info["pss_ready_mib"] > 1 and info["pss_end_mib"] > 1, info
        assert 0 <= info["idle_cpu_pct"] < 100, info  # over the smoke run's 1 s without traffic
    roles = result["servers"]["project"]["memory_by_role"]
    assert set(roles) >= {"supervisor", "API servers", "inference workers"}, roles
    assert roles["supervisor"]["processes"] == 1 and roles["inference workers"]["processes"] >= 1
    assert all(0 < role["pss_mib"] <= role["rss_mib"] for role in roles.values()), roles
    assert set(result["servers"]["project"]["check"]["outputs"]) == {"json", "v2bin"}
    assert result["servers"]["project"]["check"]["agrees_with_baseline"]


def check_summary_structure_and_counts(result: dict[str, Any]) -> None:
    """Every scenario x server has figures and ratios; floor and baseline had no errors."""
    summary = result["summary"]
    assert set(summary) == {*SCENARIOS, BINARY_SCENARIO}
    for sid in SCENARIOS:
        assert set(summary[sid]) == set(SERVERS)
        for name, entry in summary[sid].items():
            where = f"{sid}/{name}"
            assert entry["requests"] > 0, f"{where}: no requests completed"
            assert not entry["failures"], f"{where}: {entry['failures']}"
            for metric in METRICS:
                assert entry[metric] is not None and entry[metric] > 0, f"{where}: {metric}"
                for ref in ("floor", "baseline"):
                    assert entry[f"vs_{ref}"][metric] is not None, f"{where}: vs_{ref} {metric}"
            if name in ("floor", "baseline"):
                assert entry["errors"] == 0, f"{where}: {entry['errors']} errors"
        assert summary[sid]["floor"]["vs_floor"]["req_s"] == pytest.approx(1.0)
        assert summary[sid]["baseline"]["vs_baseline"]["p99_us"] == pytest.approx(1.0)
    assert summary["rows64_c16"]["baseline"]["rows_s"] == pytest.approx(64 * summary["rows64_c16"]["baseline"]["req_s"])


def check_binary_scenario(result: dict[str, Any]) -> None:
    """The V2 binary runs: floor and project only, rows/s from req/s, ratios to the floor but not the baseline."""
    entries = result["summary"][BINARY_SCENARIO]
    assert set(entries) == {"floor", "project"}
    for name, entry in entries.items():
        assert entry["wire"] == "v2-binary" and entry["flavour"] == "v2bin"
        assert entry["requests"] > 0 and not entry["failures"], f"{name}: {entry['failures']}"
        assert entry["rows_s"] == pytest.approx(64 * entry["req_s"])
        assert entry["vs_floor"]["rows_s"] is not None and entry["vs_baseline"]["rows_s"] is None
    assert entries["project"]["errors"] == 0
