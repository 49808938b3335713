"""Shared fixtures: a weights factory, a reference model computed in the test process, and the real
server started as a subprocess on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from models.simple_nn import SimpleNN

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_WEIGHTS = ROOT / "weights" / "model.pth"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A SimpleNN state_dict with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return SimpleNN().state_dict()


def save_weights(path: Path, state: dict, atomic: bool = True) -> Path:
    """Save a state_dict the standard way (``torch.save``), by atomic rename unless told otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not atomic:
        torch.save(state, path)
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def reference_outputs(weights: Path | dict, rows: np.ndarray) -> np.ndarray:
    """SimpleNN computed in the test process from the same weights: shape (rows,)."""
    state = torch.load(weights, map_location="cpu", weights_only=True) if isinstance(weights, Path) else weights
    model = SimpleNN()
    model.load_state_dict(state)
    model.eval()
    with torch.inference_mode():
        return model(torch.tensor(rows, dtype=torch.float32)).numpy()[:, 0]


def assert_matches(actual, expected) -> None:
    """Server answers equal the in-process model's to rtol=1e-6. float32 sums differ at ~1e-7 absolute
    with the batch a row was computed in (BLAS picks kernels by batch size), so outputs near zero
    also get atol=1e-6."""
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=1e-6, atol=1e-6)


class _RunsCode:
    """Unpickling this runs ``touch <marker>``: a weights file must never do that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# The weights source never offers these as candidates (nothing to load): startup says "no servable
# weights", a reload keeps the old model without an attempt.
NOT_CANDIDATES = {"zero-bytes", "symlink-loop"}
HOSTILE_KINDS = ["zero-bytes", "random-bytes", "truncated", "runs-code", "wrong-keys", "wrong-shape", "wrong-dtype",
                 "nan", "inf", "too-large", "symlink-loop"]


def write_hostile(kind: str, path: Path, marker: Path) -> Path:
    """Write one kind of broken or hostile weights file at ``path`` (by atomic rename); returns ``path``.

    ``too-large`` is a valid file padded to over 4 kB: serve it with ``SIMPLENN_MAX_WEIGHTS_BYTES=4096``.
    ``runs-code`` would create ``marker`` if it were ever unpickled.
    """
    state = make_state_dict(5)
    tmp = path.with_name(f".{path.name}.{kind}.tmp")
    if kind == "symlink-loop":
        tmp.symlink_to(path.name)  # after the rename it points at itself
        os.replace(tmp, path)
        return path
    content: bytes | dict | None = None
    if kind == "zero-bytes":
        content = b""
    elif kind == "random-bytes":
        content = os.urandom(2048)
    elif kind == "truncated":
        torch.save(state, tmp)
        content = tmp.read_bytes()[:600]
    elif kind == "runs-code":
        content = {"fc1.weight": _RunsCode(marker)}
    elif kind == "wrong-keys":
        state["fc3.weight"] = state.pop("fc2.weight")
    elif kind == "wrong-shape":
        state["fc2.weight"] = torch.zeros(2, 5)
    elif kind == "wrong-dtype":
        state["fc1.weight"] = torch.ones(5, 10, dtype=torch.int64)
    elif kind == "nan":
        state["fc1.weight"][0, 0] = float("nan")
    elif kind == "inf":
        state["fc2.bias"][0] = float("inf")
    elif kind != "too-large":
        raise ValueError(kind)
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        torch.save(content if content is not None else state, tmp)
    if kind == "too-large":
        with open(tmp, "ab") as out:
            out.write(b"\0" * 4096)
    os.replace(tmp, path)
    return path


@pytest.fixture
def weights_factory(tmp_path: Path):
    """``weights_factory(seed, name="model.pth")`` -> (path, state_dict)."""

    def make(seed: int = 1, name: str = "model.pth") -> tuple[Path, dict]:
        state = make_state_dict(seed)
        return save_weights(tmp_path / name, state), state

    return make


class ServerProcess:
    """``python -m serve`` as a subprocess, with its log captured to a file. gRPC is served on a free port of
    its own (``grpc_port``, ``grpc_target``; servers of parallel tests never share one) unless ``env`` says."""

    def __init__(self, tmp_dir: Path, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = int((env or {}).get("SIMPLENN_GRPC_PORT") or free_port())
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log_path = tmp_dir / f"server-{self.port}.log"
        self.state_dir = tmp_dir / f"state-{self.port}"
        full_env = {**os.environ, "SIMPLENN_PORT": str(self.port), "SIMPLENN_GRPC_PORT": str(self.grpc_port),
                    "SIMPLENN_HOST": "127.0.0.1",
                    "SIMPLENN_STATE_DIR": str(self.state_dir), "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "serve", *(args or [])], cwd=ROOT, env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def wait_exit(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in the group
        except ProcessLookupError:
            pass
        self._log.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """``start_server(env=..., args=..., ready=True)`` -> a running ServerProcess, stopped after the test."""
    servers: list[ServerProcess] = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None, ready: bool = True) -> ServerProcess:
        server = ServerProcess(tmp_path, env, args)
        servers.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server on the shipped weights for the whole session (read-only tests share it)."""
    proc = ServerProcess(tmp_path_factory.mktemp("shared-server"), {"SIMPLENN_MAX_ROWS": "512"})
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http
