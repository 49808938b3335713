"""Shared fixtures: a weights factory, a reference model computed in the test process, and the real
server started as a subprocess on a free loopback port."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from bench.servers import RunningServer, serve_spec
from models.simple_nn import SimpleNN

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_WEIGHTS = ROOT / "weights" / "model.pth"

# ``make test`` runs the suite on two pytest-xdist workers (``-n 2 --dist loadfile``): the tests of one file run
# in one worker, in file order, so that its module-scoped servers and fixtures are made once. The files that
# are timing-sensitive or keep the CPUs busy make one unit of work, "serial": they never run at the same time
# as each other (each may run beside a test of another file), and as the longest unit they go out first.
# (A scheduler of our own rather than ``xdist_group`` marks: with pytest 9.2, ``--dist loadgroup`` silently
# ignores the marks, pytest-dev/pytest-xdist#1386.)
SERIAL = {"test_bench_smoke", "test_container", "test_faults", "test_fuzz"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SerialFirst(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return "serial" if Path(file).stem in SERIAL else file

    config.option.loadscopereorder = False  # collection order: test_bench_smoke's "serial" comes first
    return SerialFirst(config, log)


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


class ServerProcess(RunningServer):
    """``python -m serve`` as a subprocess, started at once (``bench.servers.RunningServer``: its own session,
    a log file, a free port and a free gRPC port of its own unless ``env`` says, and ``stop()`` ends the
    whole tree). Its state folder is ``state_dir``."""

    stop_grace_s = 30.0  # a draining server may take its time before the SIGKILL

    def __init__(self, tmp_dir: Path, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        spec = serve_spec("server-{port}", {"SIMPLENN_STATE_DIR": str(tmp_dir / "state-{port}"), **(env or {})},
                          args or ())
        super().__init__(spec, tmp_dir)
        self.state_dir = Path(self._fill(spec.env["SIMPLENN_STATE_DIR"]))
        self.launch()


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


def _shared(tmp_path_factory: pytest.TempPathFactory, name: str, env: dict[str, str]) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp(name), env)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


# Servers shared by every test of a session (of each xdist worker) that only sends requests to them: such a
# test leaves nothing behind that another could see (a test that compares metrics takes a before and an after).
# Tests that kill, swap weights, stop or reconfigure a server start their own with ``start_server``.


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shipped weights, default settings but at most 512 rows per request."""
    yield from _shared(tmp_path_factory, "shared-server", {"SIMPLENN_MAX_ROWS": "512"})


@pytest.fixture(scope="session")
def batching_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One API server that waits 300 ms for more rows once its queue is drained: requests sent close together,
    over any protocol, meet in one forward pass."""
    yield from _shared(tmp_path_factory, "batching-server",
                       {"SIMPLENN_BATCH_TIMEOUT_MS": "300", "SIMPLENN_API_SERVERS": "1"})


@pytest.fixture(scope="session")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One row per forward pass of 1 s, a 64 kB queue bound, a 2.5 s request timeout, one API server.
    (``test_grpc``'s lost-worker test SIGKILLs its worker and waits for the replacement before it returns.)"""
    yield from _shared(tmp_path_factory, "slow-server", {
        "SIMPLENN_MODEL_CLASS": "tests.user_models:SlowSimpleNN", "SLOW_FORWARD_S": "1.0",
        "SIMPLENN_MAX_BATCH_SIZE": "1", "SIMPLENN_MAX_QUEUE_BYTES": "65536", "SIMPLENN_API_SERVERS": "1",
        "SIMPLENN_REQUEST_TIMEOUT_S": "2.5"})


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http
