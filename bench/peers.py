"""Peers for the side-by-side benchmark (``bench/run.py --peers``): TorchServe and KServe's ModelServer
serving the same SimpleNN (``models/simple_nn.py``) and weights as the project, each from a virtual
environment of its own with pinned versions and the CPU torch of ``requirements/cpu.txt``.

* ``torchserve`` - TorchServe 0.12.0 (Java frontend, one Python backend worker), a model archive built
  with torch-model-archiver from ``bench/apps/torchserve_handler.py`` (BaseHandler, the native JSON form
  ``{"input": row}`` / ``{"inputs": rows}``), batching on (batchSize 64, maxBatchDelay 5 ms), token auth
  off, no config snapshots, logging at WARN with the access and metrics logs off, torch on 1 thread;
  ``POST /predictions/simplenn``. Needs a Java runtime (``apt-get install -y openjdk-17-jre-headless``).
* ``kserve`` - KServe 0.21.0's ModelServer, ``bench/apps/kserve_app.py``: one process (one uvicorn
  worker, uvloop + httptools), gRPC off, access log and per-request latency log off, torch on 1 thread;
  KServe V1 ``POST /v1/models/simplenn:predict`` ``{"instances": rows}`` and the Open Inference Protocol
  V2 with binary tensors.

The environments live under ``$SIMPLENN_BENCH_CACHE`` (default ``~/.cache/simplenn-bench``), in
``peers/<name>-venv``; each is created with ``python -m venv`` and ``pip install`` on first use and reused
while its stamp (requirements and constraints) matches. Install them ahead of a run, or see what is there:

    .venv/bin/python -m bench.peers install [torchserve,kserve]
    .venv/bin/python -m bench.peers status
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.servers import ServerSpec, free_port
from bench.wire import KSERVE_V1, MODEL_NAME, TORCHSERVE, V2_BINARY, Wire

REPO_ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO_ROOT / "requirements" / "cpu.txt"  # torch==X+cpu, as the project installs it
TORCH_INDEX_PROBE = REPO_ROOT / "requirements" / "torch_index.py"
MODEL_FILE = REPO_ROOT / "models" / "simple_nn.py"
TORCHSERVE_HANDLER = REPO_ROOT / "bench" / "apps" / "torchserve_handler.py"
CACHE_ENV = "SIMPLENN_BENCH_CACHE"
STAMP = "simplenn-bench-stamp.json"
INSTALL_TIMEOUT_S = 1800
JAVA_HINT = "TorchServe needs a Java runtime (11 or newer): apt-get install -y openjdk-17-jre-headless"

# TorchServe's batching, as the benchmark configures it.
TS_BATCH_SIZE = 64
TS_MAX_BATCH_DELAY_MS = 5


class PeerError(RuntimeError):
    """A peer cannot be installed or prepared; the message says why (and how to fix it when known)."""


@dataclass(frozen=True)
class Peer:
    """One peer server: its pinned packages (torch comes from requirements/cpu.txt) and its wires by scenario
    flavour (``json``: its own JSON protocol; ``v2bin``: Open Inference Protocol V2 binary)."""

    name: str
    title: str
    packages: tuple[str, ...]
    wires: Mapping[str, Wire]
    needs_java: bool = False

    @property
    def requirements(self) -> list[str]:
        """What pip installs: torch (pinned by the constraints file) and the peer's packages."""
        return ["torch", *self.packages]


PEERS: dict[str, Peer] = {
    "torchserve": Peer("torchserve", "TorchServe",
                       ("torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml==6.0.4", "numpy==2.4.6"),
                       {"json": TORCHSERVE}, needs_java=True),
    "kserve": Peer("kserve", "KServe ModelServer", ("kserve==0.21.0",), {"json": KSERVE_V1, "v2bin": V2_BINARY}),
}
PEER_NAMES = tuple(PEERS)


def cache_dir() -> Path:
    """Where the peers' environments live: ``$SIMPLENN_BENCH_CACHE/peers`` (default ~/.cache/simplenn-bench)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "simplenn-bench"
    return Path(root) / "peers"


def venv_dir(peer: Peer, cache: Path) -> Path:
    return cache / f"{peer.name}-venv"


def wanted_stamp(peer: Peer) -> dict[str, object]:
    """What an environment must have been installed from to be reused."""
    return {"requirements": peer.requirements, "constraints": CONSTRAINTS.read_text(),
            "python": sys.version.split()[0]}


def installed(peer: Peer, cache: Path) -> bool:
    """The peer's environment exists and was installed from what is wanted now."""
    venv = venv_dir(peer, cache)
    try:
        stamp = json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return (venv / "bin" / "python").exists() and stamp.get("wanted") == wanted_stamp(peer)


def torch_index_options(pip: Path) -> list[str]:
    """The pip options that make the CPU torch installable here (requirements/torch_index.py's answer)."""
    proc = subprocess.run([sys.executable, str(TORCH_INDEX_PROBE), str(pip)], capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.stderr.strip():
        print(proc.stderr.strip(), file=sys.stderr)
    return shlex.split(proc.stdout)


def ensure_venv(peer: Peer, cache: Path, log: Callable[[str], None] = print) -> Path:
    """The peer's virtual environment, created and installed when missing or stale; its install output goes
    to ``install.log`` in it. PeerError when pip fails."""
    venv = venv_dir(peer, cache)
    if installed(peer, cache):
        return venv
    log(f"{peer.title} ({peer.name}): installing {' '.join(peer.requirements)} into {venv} "
        "(first use: a minute or more)")
    began = time.monotonic()
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    pip = venv / "bin" / "pip"
    argv = [str(pip), "install", "--disable-pip-version-check", "-c", str(CONSTRAINTS),
            *torch_index_options(pip), *peer.requirements]
    install_log = venv / "install.log"
    with open(install_log, "w") as out:
        out.write(shlex.join(argv) + "\n")
        out.flush()
        try:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise PeerError(f"{peer.name}: pip install ran over {INSTALL_TIMEOUT_S} s; see {install_log}") from None
    if proc.returncode != 0:
        tail = "\n".join(install_log.read_text(errors="replace").splitlines()[-15:])
        raise PeerError(f"{peer.name}: pip install failed ({install_log}):\n{tail}")
    seconds = time.monotonic() - began
    (venv / STAMP).write_text(json.dumps({"wanted": wanted_stamp(peer), "install_s": round(seconds, 1),
                                          "versions": package_versions(venv, peer)}, indent=2) + "\n")
    log(f"{peer.name}: installed in {seconds:.0f} s")
    return venv


def package_versions(venv: Path, peer: Peer) -> dict[str, str]:
    """Installed versions of torch and the peer's packages, read in its environment."""
    names = ["torch", *(re.split(r"[=<>!~\[ ]", p, maxsplit=1)[0] for p in peer.packages)]
    code = ("import importlib.metadata as m, json, sys\n"
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code, *names], capture_output=True, text=True,
                          timeout=60, check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def install_info(peer: Peer, cache: Path) -> dict[str, object]:
    """The stamp of an installed peer (versions, first install time), for the report's header."""
    try:
        stamp = json.loads((venv_dir(peer, cache) / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return {"venv": str(venv_dir(peer, cache)), "versions": stamp.get("versions", {}),
            "install_s": stamp.get("install_s")}


def find_java() -> str:
    """The java binary (``$JAVA_HOME/bin/java`` or on PATH); PeerError saying how to install one."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise PeerError(JAVA_HINT)
    return java


def java_version(java: str) -> str:
    """``java -version``'s first line, e.g. 'openjdk version "17.0.15" 2025-04-15'."""
    proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[0] if lines else "java (unknown version)"


# -- TorchServe ------------------------------------------------------------------------------------------------

TS_LOG4J = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="MODEL_LOG" level="warn"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Root level="warn">
      <AppenderRef ref="STDOUT"/>
    </Root>
  </Loggers>
</Configuration>
"""


def torchserve_config(store: Path, archive: str) -> str:
    """config.properties: the model with batching and one worker; addresses come from TS_* variables."""
    models = {MODEL_NAME: {"1.0": {"defaultVersion": True, "marName": archive, "minWorkers": 1, "maxWorkers": 1,
                                   "batchSize": TS_BATCH_SIZE, "maxBatchDelay": TS_MAX_BATCH_DELAY_MS,
                                   "responseTimeout": 120}}}
    return "\n".join([
        f"model_store={store}",
        f"load_models={archive}",
        f"models={json.dumps(models, separators=(',', ':'))}",
        "default_workers_per_model=1",
        "disable_system_metrics=true",
        "enable_envvars_config=true",
        "",
    ])


def build_archive(venv: Path, weights: Path, store: Path) -> str:
    """``simplenn.mar`` in ``store``, built with the peer's torch-model-archiver; returns its file name."""
    store.mkdir(parents=True, exist_ok=True)
    argv = [str(venv / "bin" / "torch-model-archiver"), "--model-name", MODEL_NAME, "--version", "1.0",
            "--model-file", str(MODEL_FILE), "--serialized-file", str(weights), "--handler", str(TORCHSERVE_HANDLER),
            "--export-path", str(store), "--force"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise PeerError(f"torchserve: torch-model-archiver failed: {(proc.stdout + proc.stderr)[-1500:]}")
    return f"{MODEL_NAME}.mar"


def torchserve_spec(venv: Path, weights: Path, run_dir: Path, ready_timeout_s: float) -> ServerSpec:
    """TorchServe in the foreground on ``{host}:{port}``; its other ports (management, metrics, gRPC) are
    free ports of their own, its temporary files, pid file and logs stay in ``run_dir``."""
    find_java()
    run_dir.mkdir(parents=True, exist_ok=True)
    store = run_dir / "model-store"
    archive = build_archive(venv, weights, store)
    config, log4j = run_dir / "config.properties", run_dir / "log4j2.xml"
    config.write_text(torchserve_config(store, archive))
    log4j.write_text(TS_LOG4J)
    env = {
        "TS_INFERENCE_ADDRESS": "http://{host}:{port}",
        "TS_MANAGEMENT_ADDRESS": f"http://{{host}}:{free_port()}",
        "TS_METRICS_ADDRESS": f"http://{{host}}:{free_port()}",
        "TS_GRPC_INFERENCE_PORT": "{grpc_port}",
        "TS_GRPC_MANAGEMENT_PORT": str(free_port()),
        "TMPDIR": str(run_dir), "TEMP": str(run_dir), "LOG_LOCATION": str(run_dir), "METRICS_LOCATION": str(run_dir),
        "OMP_NUM_THREADS": "1",
    }
    argv = [str(venv / "bin" / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
            "--ts-config", str(config), "--log-config", str(log4j), "--model-store", str(store)]
    # /ping answers "Healthy" before the worker has loaded the model: ready is the first prediction.
    return ServerSpec("torchserve", argv, env, ready_path=TORCHSERVE.path, ready_timeout_s=ready_timeout_s,
                      ready_body=TORCHSERVE.request(1, seed=0).body)


# -- KServe ------------------------------------------------------------------------------------------------------


def kserve_spec(venv: Path, weights: Path, run_dir: Path, ready_timeout_s: float) -> ServerSpec:
    """KServe's ModelServer (bench/apps/kserve_app.py) on ``{port}``, one process, gRPC off, quiet logs."""
    argv = [str(venv / "bin" / "python"), "-m", "bench.apps.kserve_app", "--http_port", "{port}",
            "--grpc_port", "{grpc_port}", "--enable_grpc", "false", "--workers", "1",
            "--enable_latency_logging", "false", "--configure_logging", "false"]
    env = {"BENCH_WEIGHTS": str(weights), "BENCH_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(run_dir)}
    run_dir.mkdir(parents=True, exist_ok=True)
    return ServerSpec("kserve", argv, env, ready_path=f"/v1/models/{MODEL_NAME}", ready_timeout_s=ready_timeout_s)


SPEC_BUILDERS: dict[str, Callable[[Path, Path, Path, float], ServerSpec]] = {
    "torchserve": torchserve_spec,
    "kserve": kserve_spec,
}


def peer_spec(name: str, weights: Path, run_dir: Path, ready_timeout_s: float, cache: Path | None = None,
              log: Callable[[str], None] = print) -> ServerSpec:
    """Install the peer when needed and return how to start it (its files in ``run_dir/<name>``).
    PeerError when it cannot be installed or prepared."""
    peer = PEERS[name]
    if peer.needs_java:
        find_java()  # before a long install
    venv = ensure_venv(peer, cache or cache_dir(), log)
    return SPEC_BUILDERS[name](venv, weights.resolve(), run_dir / name, ready_timeout_s)


def peer_meta(names: Sequence[str], cache: Path | None = None) -> dict[str, dict[str, object]]:
    """Per peer: its environment, installed versions, first install time, and Java's version for TorchServe."""
    meta: dict[str, dict[str, object]] = {}
    for name in names:
        meta[name] = install_info(PEERS[name], cache or cache_dir())
        if PEERS[name].needs_java:
            try:
                meta[name]["java"] = java_version(find_java())
            except PeerError as exc:
                meta[name]["java"] = str(exc)
    return meta


def parse_names(text: str) -> list[str]:
    """Parse "torchserve,kserve" into peer names (all of them for an empty text)."""
    names = [part.strip() for part in text.split(",") if part.strip()] or list(PEER_NAMES)
    unknown = set(names) - set(PEER_NAMES)
    if unknown:
        raise argparse.ArgumentTypeError(f"peers are {','.join(PEER_NAMES)}; unknown: {','.join(sorted(unknown))}")
    return [name for name in PEER_NAMES if name in names]


def main(argv: Sequence[str] | None = None) -> int:
    """``install [names]``: create the environments now; ``status``: what is installed, with versions."""
    parser = argparse.ArgumentParser(description="The benchmark's peer servers' environments.")
    parser.add_argument("action", choices=("install", "status"))
    parser.add_argument("names", nargs="?", type=parse_names, default=list(PEER_NAMES),
                        help=f"comma list among {','.join(PEER_NAMES)} (default all)")
    args = parser.parse_args(argv)
    cache = cache_dir()
    failed = False
    for name in args.names:
        peer = PEERS[name]
        if args.action == "install":
            try:
                if peer.needs_java:
                    find_java()
                ensure_venv(peer, cache)
            except PeerError as exc:
                print(f"!! {exc}", file=sys.stderr)
                failed = True
                continue
        state = "installed" if installed(peer, cache) else "not installed"
        print(f"{name}: {state} at {venv_dir(peer, cache)} {json.dumps(peer_meta([name], cache)[name])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
