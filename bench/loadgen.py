"""Load generation with wrk: request rows and bodies, one bounded wrk run, and parsing its result line.

wrk runs with keep-alive connections and ``bench/post.lua``, which POSTs a fixed body (JSON or binary,
read from a file) with the given headers to the URL's path, and prints one ``BENCH_RESULT {json}`` line
from its ``done()`` hook: request count, latency percentiles (microseconds), socket errors
(connect/read/write/timeout) and non-2xx responses. Other protocols' bodies: ``bench/wire.py``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LUA_SCRIPT = Path(__file__).with_name("post.lua")
RESULT_PREFIX = "BENCH_RESULT "
MAX_WRK_THREADS = 2  # the machines this runs on have 2 cores; wrk shares them with the server
SOCKET_ERRORS = ("connect", "read", "write", "timeout")


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed no result line."""


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured."""

    requests: int  # completed responses, any status
    duration_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    max_us: float
    socket_errors: dict[str, int]
    non2xx: int

    @property
    def errors(self) -> int:
        """Socket errors plus non-2xx responses."""
        return sum(self.socket_errors.values()) + self.non2xx

    @property
    def ok_requests(self) -> int:
        """Completed requests with a 2xx status."""
        return self.requests - self.non2xx


def find_wrk() -> str:
    """The path of the wrk binary, or WrkError telling how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise WrkError("wrk is not installed: run `apt-get install -y wrk` (Debian package wrk)")
    return path


def wrk_version(wrk: str) -> str:
    """wrk's name and version, e.g. "wrk debian/4.1.0-3+b2" (``wrk -v`` exits non-zero)."""
    proc = subprocess.run([wrk, "-v"], check=False, capture_output=True, text=True, timeout=10)
    words = (proc.stdout + proc.stderr).split()
    return " ".join(words[:2]) if words else "wrk (unknown version)"


def make_rows(rows: int, seed: int = 0, features: int = 10) -> list[list[float]]:
    """``rows`` rows of ``features`` random numbers in [-2, 2], 6 decimals (fixed seed)."""
    rng = random.Random(seed)
    return [[round(rng.uniform(-2.0, 2.0), 6) for _ in range(features)] for _ in range(rows)]


def make_body(rows: int, seed: int = 0, features: int = 10) -> bytes:
    """The native request body for :func:`make_rows`.

    One row uses the single-row form ``{"input": [...]}``; more use ``{"inputs": [[...], ...]}``.
    """
    table = make_rows(rows, seed, features)
    payload = {"input": table[0]} if rows == 1 else {"inputs": table}
    return json.dumps(payload, separators=(",", ":")).encode()


def header_lines(headers: Mapping[str, str]) -> str:
    """Headers as post.lua reads them from ``BENCH_HEADERS``: one ``Name: value`` a line."""
    for name, value in headers.items():
        if not name.strip() or ":" in name or any(c in name + value for c in "\r\n"):
            raise ValueError(f"bad header {name!r}: {value!r}")
    return "\n".join(f"{name}: {value}" for name, value in headers.items())


def parse_result(output: str) -> WrkResult:
    """Parse the ``BENCH_RESULT`` line that post.lua's ``done()`` prints."""
    for line in output.splitlines():
        if line.startswith(RESULT_PREFIX):
            data = json.loads(line[len(RESULT_PREFIX) :])
            return WrkResult(
                requests=int(data["requests"]),
                duration_s=data["duration_us"] / 1e6,
                p50_us=data["p50_us"],
                p90_us=data["p90_us"],
                p99_us=data["p99_us"],
                mean_us=data["mean_us"],
                max_us=data["max_us"],
                socket_errors={name: int(data[name]) for name in SOCKET_ERRORS},
                non2xx=int(data["non2xx"]),
            )
    raise WrkError(f"wrk printed no {RESULT_PREFIX.strip()} line:\n{output[-2000:]}")


def run_wrk(wrk: str, url: str, body_file: Path, conns: int, duration_s: int, timeout_s: int = 10,
            headers: Mapping[str, str] | None = None) -> WrkResult:
    """POST ``body_file`` to ``url`` over ``conns`` keep-alive connections for ``duration_s``, with
    ``headers`` (default: ``Content-Type: application/json``).

    Uses one wrk thread per connection up to MAX_WRK_THREADS. A request slower than
    ``timeout_s`` counts as a timeout error. The whole run is bounded by duration + 30 s.
    """
    threads = max(1, min(MAX_WRK_THREADS, conns))
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{conns}",
        f"-d{duration_s}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(LUA_SCRIPT),
        url,
    ]
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file),
           "BENCH_HEADERS": header_lines(headers or {"Content-Type": "application/json"})}
    try:
        proc = subprocess.run(
            argv, check=False, capture_output=True, text=True, env=env, timeout=duration_s + timeout_s + 30
        )
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish: {exc}") from exc
    if proc.returncode != 0:
        raise WrkError(f"wrk exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
    return parse_result(proc.stdout)
