"""gRPC load with h2load (Debian's ``nghttp2-client``): request bodies, one bounded run, its figures.

A unary gRPC call is an HTTP/2 POST of one length-prefixed protobuf message with ``content-type:
application/grpc``, so h2load, a C HTTP/2 load generator (ghz is packaged neither by Debian nor on
PyPI), sends ``ModelInfer`` calls as wrk sends HTTP requests: a Python gRPC client costs about as much
CPU per call as the server, so on a 2-core machine it would measure itself. The bodies are
``ModelInferRequest`` messages with ``raw_input_contents`` (tritonclient's form) holding the rows of
:func:`bench.loadgen.make_rows` for the same row count, so HTTP and gRPC compute the same numbers.

h2load does not read gRPC's status (it is in the trailers, after an HTTP 200), so every run reads the
server's own ``simplenn_requests_total{route="grpc:/inference.GRPCInferenceService/ModelInfer"}`` by
``code`` before and after: calls h2load saw complete that the server did not count as ``OK`` are errors
(``non_ok``). Latency percentiles come from h2load's per-request log (``--log-file``).

Streams map to connections as ``min(streams, 4)`` connections with ``streams / connections`` concurrent
streams each: several connections, so the kernel spreads them over the API servers (SO_REUSEPORT).
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import loadgen
from bench.loadgen import WrkResult
from bench.servers import HOST, RunningServer

INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
INFER_ROUTE = "grpc:" + INFER_PATH
MAX_CONNECTIONS = 4


class H2loadError(RuntimeError):
    """h2load is missing, failed, or printed no summary."""


def find_h2load() -> str:
    """The path of h2load, or H2loadError telling how to install it."""
    path = shutil.which("h2load")
    if path is None:
        raise H2loadError("h2load is not installed: run `apt-get install -y nghttp2-client` (Debian package)")
    return path


def h2load_version(h2load: str) -> str:
    proc = subprocess.run([h2load, "--version"], check=False, capture_output=True, text=True, timeout=10)
    return proc.stdout.strip() or "h2load (unknown version)"


def rows_of(rows: int, seed: int) -> np.ndarray:
    """The rows of :func:`bench.loadgen.make_rows` for ``rows`` and ``seed`` (same numbers over HTTP)."""
    return np.asarray(loadgen.make_rows(rows, seed=seed), dtype=np.float32)


def make_message(values: np.ndarray, model: str = "simplenn") -> bytes:
    """A serialized ModelInferRequest with the rows as raw little-endian FP32."""
    from serve.grpc_gen import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=values.shape)
    request.raw_input_contents.append(np.ascontiguousarray(values, dtype="<f4").tobytes())
    return request.SerializeToString()


def write_bodies(folder: Path, row_counts: set[int]) -> dict[int, Path]:
    """One gRPC-framed request body per row count (flag byte 0, big-endian length, message)."""
    paths = {}
    for rows in sorted(row_counts):
        message = make_message(rows_of(rows, seed=rows))
        paths[rows] = folder / f"grpc_{rows}.bin"
        paths[rows].write_bytes(b"\0" + struct.pack(">I", len(message)) + message)
    return paths


def infer_counts(server: RunningServer) -> dict[str, float]:
    """The server's ModelInfer answers so far, by gRPC status name."""
    status, body = server.request("GET", "/metrics")
    if status != 200:
        raise H2loadError(f"GET /metrics -> {status}")
    counts: dict[str, float] = {}
    pattern = re.compile(r'^simplenn_requests_total\{code="(\w+)",route="' + re.escape(INFER_ROUTE) + r'"\} (\S+)$')
    for line in body.decode().splitlines():
        match = pattern.match(line)
        if match:
            counts[match[1]] = float(match[2])
    return counts


def check(server: RunningServer, row_counts: tuple[int, ...]) -> dict[str, Any]:
    """Pre-flight over gRPC: one ModelInfer per row count (the rows of the HTTP check); the outputs, to
    compare with the baseline's. Returns {"ok", "detail", "outputs"} as the HTTP check does."""
    import grpc

    from serve.grpc_gen import grpc_predict_v2_pb2 as pb

    outputs: list[float] = []
    with grpc.insecure_channel(f"{HOST}:{server.grpc_port}") as channel:
        call = channel.unary_unary(INFER_PATH, response_deserializer=pb.ModelInferResponse.FromString)
        for rows in row_counts:
            try:
                reply = call(make_message(rows_of(rows, seed=rows)), timeout=10)
            except grpc.RpcError as exc:
                return {"ok": False, "detail": f"{rows}-row ModelInfer -> {exc.code()}: {exc.details()}",
                        "outputs": outputs}
            outputs += np.frombuffer(reply.raw_output_contents[0], dtype="<f4").astype(float).tolist()
    return {"ok": len(outputs) == sum(row_counts), "detail": "ok", "outputs": outputs}


def _percentile(sorted_us: list[float], q: float) -> float:
    return sorted_us[min(len(sorted_us) - 1, math.ceil(q * len(sorted_us)) - 1)]


@dataclass(frozen=True)
class GrpcLoad:
    """Runs h2load against a server's gRPC port; ``run`` answers like :func:`bench.loadgen.run_wrk`."""

    h2load: str
    bodies: dict[int, Path]
    log_dir: Path

    def run(self, server: RunningServer, rows: int, streams: int, duration_s: int) -> WrkResult:
        """``streams`` concurrent ModelInfer calls of ``rows`` rows for ``duration_s``, bounded by +30 s."""
        connections = min(streams, MAX_CONNECTIONS)
        log_file = self.log_dir / f"h2load-{rows}-{streams}.tsv"
        argv = [self.h2load, "-D", str(duration_s), "-c", str(connections), "-m", str(math.ceil(streams / connections)),
                "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(self.bodies[rows]),
                f"--log-file={log_file}", f"http://{HOST}:{server.grpc_port}{INFER_PATH}"]
        before = infer_counts(server)
        try:
            proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=duration_s + 30)
        except subprocess.TimeoutExpired as exc:
            raise H2loadError(f"h2load did not finish: {exc}") from exc
        after = infer_counts(server)
        if proc.returncode != 0:
            raise H2loadError(f"h2load exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
        return self._result(proc.stdout, log_file, after.get("OK", 0) - before.get("OK", 0))

    @staticmethod
    def _result(output: str, log_file: Path, ok: float) -> WrkResult:
        found = re.search(r"finished in ([\d.]+)(m?s),", output)
        counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                           r"(\d+) errored, (\d+) timeout", output)
        if not found or not counts:
            raise H2loadError(f"h2load printed no summary:\n{output[-2000:]}")
        seconds = float(found[1]) / (1000 if found[2] == "ms" else 1)
        done, errored, timeout = (int(counts[i]) for i in (3, 6, 7))
        latencies = sorted(float(line.split("\t")[2]) for line in log_file.read_text().splitlines() if line.strip())
        if not latencies:
            raise H2loadError(f"h2load completed no request:\n{output[-2000:]}")
        return WrkResult(requests=done, duration_s=seconds, p50_us=_percentile(latencies, 0.5),
                         p90_us=_percentile(latencies, 0.9), p99_us=_percentile(latencies, 0.99),
                         mean_us=sum(latencies) / len(latencies), max_us=latencies[-1],
                         socket_errors={"errored": errored, "timeout": timeout},
                         non2xx=max(0, done - int(ok)))  # not answered OK: HTTP errors and gRPC statuses
