"""The container image, built and run for real (Docker Engine from Debian's docker.io, as root).

Set-up (cached under $SIMPLENN_TEST_CACHE, default /var/cache/simplenn-test, so a second run is quick):

* ``deploy/ci/install-tools.sh container`` installs docker.io and debootstrap when missing;
* a private ``dockerd`` starts for this module (own data root in the cache, own socket, no bridge, no
  iptables: containers only ever use the host's network) and stops afterwards;
* no registry image can be pulled here, so the base image is Debian bookworm from ``debootstrap``
  (tarball cached), imported and passed as ``BASE_IMAGE``;
* the image's build cannot see this machine's pip configuration, so every wheel it needs is
  downloaded on the host into a cached wheelhouse (the CPU torch wheel comes from the local wheel
  folder that pip is configured with), handed in through ``deploy/wheelhouse/`` and installed with
  ``PIP_NO_INDEX=1``.

Each container runs like production: ``--read-only``, the image's non-root user, all capabilities
dropped, no new privileges, tmpfs for /tmp and the state folder, the weights folder mounted read-only,
host networking with the server bound to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from bench.servers import cmdline, free_port
from models.simple_nn import SimpleNN
from serve.versions import file_version

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "simplenn-serve:test"
DEPS_IMAGE = "simplenn-serve:test-deps"
BASE_IMAGE = "simplenn-base:bookworm"
USER = "10001:10001"
RUN_DIR = Path("/run/simplenn-test-docker")  # short: a unix socket path has at most 107 bytes
WHEELHOUSE = ROOT / "deploy" / "wheelhouse"
# pip download for the image's interpreter (Debian bookworm: CPython 3.11, glibc 2.36), whatever runs the tests
WHEEL_TARGET = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                *[arg for glibc in (36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 17, 12, 5)
                  for arg in ("--platform", f"manylinux_2_{glibc}_x86_64")]]


def _cache_dir() -> Path:
    if os.environ.get("SIMPLENN_TEST_CACHE"):
        return Path(os.environ["SIMPLENN_TEST_CACHE"])
    return Path("/var/cache/simplenn-test")


CACHE = _cache_dir()


def _log(message: str) -> None:
    print(f"[test_container {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run(cmd: list, timeout: float, env: dict | None = None, check: bool = True,
         log: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command; with ``check``, fail the test with the end of its output."""
    if log is not None:
        with open(log, "wb") as out:
            result = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                    env=env, stdin=subprocess.DEVNULL, check=False)
        result.stdout = log.read_text(errors="replace")
    else:
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env,
                                stdin=subprocess.DEVNULL, check=False)
        result.stdout = (result.stdout or "") + (result.stderr or "")
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd[:4]))}... exited {result.returncode}:\n{result.stdout[-4000:]}")
    return result


# -- the Docker daemon ---------------------------------------------------------------------------------------

class Docker:
    """The docker CLI, talking to the private daemon of this module."""

    def __init__(self, socket_path: Path) -> None:
        client = shutil.which("docker") or "/usr/bin/docker"
        self.client = client
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{socket_path}", "DOCKER_BUILDKIT": "0",
                    "DOCKER_CLI_HINTS": "false", "DOCKER_CONFIG": str(RUN_DIR / "client-config")}

    def __call__(self, *args: object, timeout: float = 120, check: bool = True,
                 log: Path | None = None) -> subprocess.CompletedProcess:
        return _run([self.client, *args], timeout=timeout, env=self.env, check=check, log=log)

    def inspect(self, name: str) -> dict:
        return json.loads(self("inspect", name).stdout)[0]


def _stop_pid(pid: int, timeout: float = 30) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop_stale_daemon(pidfile: Path, socket_path: Path) -> None:
    """A dockerd that an interrupted earlier run of this test left behind (same pid file and socket)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    command = (cmdline(pid) or b"").decode(errors="replace")
    if "dockerd" in command and str(socket_path) in command:
        _log(f"stopping the dockerd (pid {pid}) an earlier run left behind")
        _stop_pid(pid)


def _unmount_below(folder: Path) -> None:
    """What the daemon left mounted in its exec root (the network namespace handle), deepest first."""
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted((p for p in points if p.startswith(f"{folder}/")), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    if os.geteuid() != 0:
        pytest.fail("the container test runs Docker Engine and debootstrap, which need root")
    CACHE.mkdir(parents=True, exist_ok=True)
    # One container test at a time on this machine: they share the daemon's data root and the images.
    lock = open(CACHE / "container-test.lock", "w")
    deadline = time.monotonic() + 1200
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                pytest.fail(f"another container test holds {CACHE / 'container-test.lock'}")
            time.sleep(2)

    started = time.monotonic()
    _run(["bash", ROOT / "deploy" / "ci" / "install-tools.sh", "container"], timeout=900)
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    (RUN_DIR / "client-config").mkdir(exist_ok=True)
    socket_path, pidfile = RUN_DIR / "docker.sock", RUN_DIR / "dockerd.pid"
    _stop_stale_daemon(pidfile, socket_path)
    daemon_log = open(RUN_DIR / "dockerd.log", "wb")
    proc = subprocess.Popen(
        [dockerd, "--data-root", str(CACHE / "docker"), "--exec-root", str(RUN_DIR / "exec"),
         "--host", f"unix://{socket_path}", "--pidfile", str(pidfile),
         # host networking only: no docker0 bridge, no NAT, no iptables rules, no port proxies
         "--bridge=none", "--iptables=false", "--ip-masq=false", "--userland-proxy=false",
         "--log-level=warn"],
        stdout=daemon_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    client = Docker(socket_path)
    try:
        deadline = time.monotonic() + 60
        while client("version", "--format", "{{.Server.Version}}", check=False, timeout=10).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dockerd did not start:\n{(RUN_DIR / 'dockerd.log').read_text()[-3000:]}")
            time.sleep(0.3)
        drivers = client("network", "ls", "--format", "{{.Driver}}").stdout.split()
        assert "bridge" not in drivers, f"the daemon has a bridge network: {drivers}"
        _log(f"dockerd up ({time.monotonic() - started:.0f} s with installs)")
        yield client
    finally:
        leftovers = client("ps", "-aq", "--filter", "label=simplenn-test", check=False).stdout.split()
        if leftovers:
            client("rm", "-f", *leftovers, check=False)
        client("container", "prune", "-f", check=False)  # e.g. a failed build's intermediate container
        begin = time.monotonic()
        client("image", "prune", "-f", check=False, timeout=300)  # earlier builds' untagged layers
        _log(f"pruned untagged images ({time.monotonic() - begin:.0f} s)")
        begin = time.monotonic()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        _unmount_below(RUN_DIR)
        _log(f"dockerd stopped ({time.monotonic() - begin:.0f} s)")
        daemon_log.close()
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


# -- the image -----------------------------------------------------------------------------------------------

def _debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 .sources or one-line .list), for debootstrap."""
    if os.environ.get("SIMPLENN_TEST_DEBIAN_MIRROR"):
        return os.environ["SIMPLENN_TEST_DEBIAN_MIRROR"]
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list")),
             *sorted((apt / "sources.list.d").glob("*.sources"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
                if "bookworm" in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                match = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line.strip() + " ")
                if match:
                    return match.group(1)
    return "http://deb.debian.org/debian"


def _ensure_base_image(docker: Docker) -> None:
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return
    tarball = CACHE / "debian-bookworm-minbase-amd64.tar"
    if not tarball.exists():
        mirror = _debian_mirror()
        _log(f"debootstrap bookworm from {mirror} (cached as {tarball})")
        rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
        try:
            _run(["debootstrap", "--variant=minbase", "bookworm", rootfs, mirror], timeout=900,
                 log=CACHE / "debootstrap.log")
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for path in (rootfs / leftover).glob("*"):
                    if path.is_file():
                        path.unlink()
            for path in (rootfs / "var/cache/apt").glob("*.bin"):
                path.unlink()
            partial = tarball.with_suffix(".partial")
            _run(["tar", "-C", rootfs, "--numeric-owner", "-cf", partial, "."], timeout=300)
            os.replace(partial, tarball)
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
    _log(f"docker import {tarball.name} {BASE_IMAGE}")
    docker("import", tarball, BASE_IMAGE, timeout=300)


def _wheelhouse() -> Path:
    """Every wheel the image installs (pyproject's dependencies under requirements/cpu.txt), cached by inputs."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    constraints = (ROOT / "requirements" / "cpu.txt").read_text()
    key = hashlib.sha256(json.dumps([dependencies, constraints, WHEEL_TARGET]).encode()).hexdigest()[:16]
    wheelhouse = CACHE / "wheelhouse" / key
    if wheelhouse.is_dir():
        return wheelhouse
    _log(f"pip download into {wheelhouse}")
    wheelhouse.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=wheelhouse.parent))
    requirements = partial / "requirements.in"
    requirements.write_text("\n".join(dependencies) + "\n")
    _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet", *WHEEL_TARGET,
          "--dest", partial, "-c", ROOT / "requirements" / "cpu.txt", "-r", requirements], timeout=900)
    requirements.unlink()
    assert any(p.name.startswith("torch-") and "+cpu" in p.name for p in partial.iterdir()), \
        "pip download did not take torch's CPU wheel (is the local wheel folder in pip's config?)"
    os.replace(partial, wheelhouse)
    return wheelhouse


@pytest.fixture(scope="module")
def image(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> str:
    started = time.monotonic()
    _ensure_base_image(docker)
    wheels = _wheelhouse()
    added = []
    try:
        for wheel in wheels.iterdir():
            target = WHEELHOUSE / wheel.name
            if target.exists():
                continue
            try:
                os.link(wheel, target)
            except OSError:
                shutil.copyfile(wheel, target)
            added.append(target)
        build_dir = tmp_path_factory.mktemp("build")
        build_args = ["--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", "PIP_NO_INDEX=1"]
        # The dependency stage gets a tag of its own, so that pruning untagged images keeps it as build cache.
        _log("docker build --target deps")
        docker("build", "--force-rm", *build_args, "--target", "deps", "--tag", DEPS_IMAGE, ROOT, timeout=1200,
               log=build_dir / "build-deps.log")
        _log("docker build")
        docker("build", "--force-rm", *build_args, "--tag", IMAGE, ROOT, timeout=1200, log=build_dir / "build.log")
    finally:
        for path in added:
            path.unlink(missing_ok=True)
    _log(f"image ready ({time.monotonic() - started:.0f} s)")
    return IMAGE


# -- running containers --------------------------------------------------------------------------------------

def _save(state: dict, path: Path) -> str:
    """Publish weights like a real publisher: write a temporary name, then rename. Returns the version."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return file_version(path)


def _state(seed: int) -> dict:
    torch.manual_seed(seed)
    return SimpleNN().state_dict()


def _reference(state: dict, row: list[float]) -> float:
    model = SimpleNN()
    model.load_state_dict(state)
    with torch.inference_mode():
        return float(model(torch.tensor([row], dtype=torch.float32))[0, 0])


class Container:
    def __init__(self, docker: Docker, image: str, weights_dir: Path, env: dict[str, str] | None = None,
                 mounts: list[str] | None = None) -> None:
        self.docker = docker
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = f"simplenn-test-{self.port}"
        args = ["run", "--detach", "--name", self.name, "--label", "simplenn-test=1",
                "--network", "host", "--read-only", "--user", USER,
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--tmpfs", "/tmp", "--tmpfs", "/var/lib/simplenn",
                "--volume", f"{weights_dir}:/weights:ro",
                "--env", "SIMPLENN_HOST=127.0.0.1", "--env", f"SIMPLENN_PORT={self.port}",
                "--env", f"SIMPLENN_GRPC_PORT={free_port()}",  # host network: never the image's 8001 twice
                "--health-interval", "1s", "--health-start-period", "60s"]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        for mount in mounts or []:
            args += ["--volume", mount]
        docker(*args, image)

    def logs(self) -> str:
        return self.docker("logs", self.name, check=False).stdout[-4000:]

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.docker.inspect(self.name)["State"]["Running"]:
                pytest.fail(f"the container exited:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        pytest.fail(f"not ready after {timeout} s:\n{self.logs()}")

    def predict(self, row: list[float]) -> dict:
        response = httpx.post(self.url + "/predict", json={"input": row}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def remove(self) -> None:
        self.docker("rm", "--force", self.name, check=False)


@pytest.fixture
def weights_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "weights"
    folder.mkdir()
    folder.chmod(0o755)  # the container's user reads it; pytest's tmp folders are 0700
    return folder


@pytest.fixture
def run_container(docker: Docker, image: str) -> Iterator:
    containers: list[Container] = []

    def start(weights: Path, **kwargs) -> Container:
        container = Container(docker, image, weights, **kwargs)
        containers.append(container)
        return container

    yield start
    for container in containers:
        container.remove()


# -- tests ---------------------------------------------------------------------------------------------------

def test_image_runs_as_non_root_with_a_stop_signal_and_a_healthcheck(docker: Docker, image: str) -> None:
    config = docker.inspect(image)["Config"]
    assert config["User"] == USER
    assert config["StopSignal"] == "SIGTERM"
    assert config["Healthcheck"]["Test"][0] == "CMD"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["SIMPLENN_HOST"] == "0.0.0.0" and env["SIMPLENN_PORT"] == "8000"
    assert env["SIMPLENN_WEIGHTS"] == "/weights" and env["SIMPLENN_STATE_DIR"] == "/var/lib/simplenn"
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"][0] == "/usr/bin/tini"


def test_read_only_container_serves_and_hot_reloads_weights_from_the_volume(
        docker: Docker, run_container, weights_dir: Path) -> None:
    first = _state(1)
    version = _save(first, weights_dir / "model.pth")
    container = run_container(weights_dir)
    container.wait_ready()
    row = [0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 3.0, 0.25, -2.0, 1.0]

    answer = container.predict(row)
    assert answer["model_version"] == version
    assert answer["output"] == pytest.approx(_reference(first, row), rel=1e-5, abs=1e-6)
    status = httpx.get(container.url + "/v1/models/simplenn", timeout=10).json()
    assert status["version"] == version and status["ready"] is True
    assert b"simplenn_requests_total" in httpx.get(container.url + "/metrics", timeout=10).content

    # The image's HEALTHCHECK passes (it runs as the same user, on the read-only filesystem).
    deadline = time.monotonic() + 30
    while docker.inspect(container.name)["State"]["Health"]["Status"] != "healthy":
        assert time.monotonic() < deadline, docker.inspect(container.name)["State"]["Health"]
        time.sleep(0.5)

    # New weights renamed over the old file on the host: answers carry the new version within seconds.
    second = _state(2)
    new_version = _save(second, weights_dir / "model.pth")
    assert new_version != version
    deadline = time.monotonic() + 15
    while (answer := container.predict(row))["model_version"] != new_version:
        assert answer["model_version"] == version, answer
        assert time.monotonic() < deadline, f"still {answer} 15 s after the swap:\n{container.logs()}"
        time.sleep(0.2)
    assert answer["output"] == pytest.approx(_reference(second, row), rel=1e-5, abs=1e-6)

    state = docker.inspect(container.name)
    assert state["HostConfig"]["ReadonlyRootfs"] is True and state["Config"]["User"] == USER


@pytest.mark.parametrize("variant", ["cpu", "cuda", "rocm"])
def test_torch_variant_build_argument_picks_the_pinned_torch(docker: Docker, image: str, variant: str) -> None:
    """TORCH_VARIANT=cpu: requirements/cpu.txt's CPU wheel from PyTorch's CPU index; cuda: the same version
    from PyPI (the CUDA build); anything else stops the build. Only the small stage that decides is built."""
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "requirements" / "cpu.txt").read_text(), re.MULTILINE).group(1)
    tag = f"simplenn-serve:test-requirements-{variant}"
    build = docker("build", "--force-rm", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                   "--build-arg", f"TORCH_VARIANT={variant}", "--target", "requirements", "--tag", tag, ROOT,
                   timeout=600, check=variant != "rocm")
    if variant == "rocm":
        assert build.returncode != 0 and "TORCH_VARIANT must be cpu or cuda, not 'rocm'" in build.stdout
        return
    try:
        files = {name: docker("run", "--rm", "--network", "host", "--entrypoint", "cat", tag,
                              f"/requirements/{name}.txt").stdout for name in ("constraints", "requirements")}
    finally:
        docker("rmi", tag, check=False)
    constraints = files["constraints"].splitlines()
    requirements = files["requirements"].splitlines()
    assert "litserve==0.2.19" in constraints and "torch>=2.4" in requirements
    if variant == "cpu":
        assert f"torch=={pinned}" in constraints and "+cpu" in pinned
        assert requirements[0] == "--extra-index-url https://download.pytorch.org/whl/cpu"
    else:
        assert f"torch=={pinned.split('+')[0]}" in constraints
        assert not any("index-url" in line for line in requirements)


SLOW_MODEL = '''
import os, time
from models.simple_nn import SimpleNN


class SlowSimpleNN(SimpleNN):
    """SimpleNN whose forward pass takes SLOW_FORWARD_S seconds: keeps requests in flight."""

    def forward(self, x):
        time.sleep(float(os.environ.get("SLOW_FORWARD_S", "1.0")))
        return super().forward(x)
'''


def test_docker_stop_drains_in_flight_requests_and_exits_zero(
        docker: Docker, run_container, weights_dir: Path, tmp_path: Path) -> None:
    version = _save(_state(3), weights_dir / "model.pth")
    code = tmp_path / "slowmodel"
    code.mkdir()
    (code / "slow_simplenn.py").write_text(SLOW_MODEL)
    code.chmod(0o755)
    (code / "slow_simplenn.py").chmod(0o644)
    drain_s, grace_s = 1.0, 20
    container = run_container(weights_dir, mounts=[f"{code}:/opt/testmodel:ro"],
                              env={"PYTHONPATH": "/opt/testmodel", "SIMPLENN_MODEL_CLASS": "slow_simplenn:SlowSimpleNN",
                                   "SLOW_FORWARD_S": "1.0", "SIMPLENN_MAX_BATCH_SIZE": "1",
                                   "SIMPLENN_DRAIN_S": str(drain_s)})
    container.wait_ready()

    results: list[tuple[int, str]] = []

    def call() -> None:
        response = httpx.post(container.url + "/predict", json={"input": [0.1] * 10}, timeout=60)
        results.append((response.status_code, response.json().get("model_version", response.text)))

    # Three requests, one forward pass (1 s) each: the last one ends ~3 s from now, after the drain.
    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.4)
    stopped: dict[str, float | int] = {}

    def stop() -> None:
        begin = time.monotonic()
        stopped["rc"] = docker("stop", "--time", str(grace_s), container.name, timeout=grace_s + 30).returncode
        stopped["seconds"] = time.monotonic() - begin

    stopper = threading.Thread(target=stop)
    stopper.start()
    deadline = time.monotonic() + 5
    while httpx.get(container.url + "/health/ready", timeout=5).status_code != 503:  # not ready at once...
        assert time.monotonic() < deadline, "/health/ready stayed 200 after SIGTERM"
        time.sleep(0.05)
    assert httpx.get(container.url + "/health/live", timeout=5).status_code == 200  # ...but still serving

    for thread in threads:
        thread.join(60)
    stopper.join(grace_s + 40)
    assert results == [(200, version)] * 3, f"{results}\n{container.logs()}"
    assert stopped.get("rc") == 0
    state = docker.inspect(container.name)["State"]
    assert state["Running"] is False and state["OOMKilled"] is False
    assert state["ExitCode"] == 0, f"exit code {state['ExitCode']} (137: killed at the end of the grace period)"
    assert stopped["seconds"] < grace_s - 5, stopped


def test_unreadable_weights_as_the_non_root_user(docker: Docker, run_container, weights_dir: Path) -> None:
    """Root reads everything, so "no read permission" is tested here, where the server runs as uid 10001."""
    good = _state(3)
    version = _save(good, weights_dir / "model.pth")
    container = run_container(weights_dir)
    container.wait_ready()
    row = [0.5] * 10

    # During a reload: an unreadable file is rejected and the old version keeps answering.
    blocked = weights_dir / ".blocked.tmp"
    torch.save(_state(4), blocked)
    blocked.chmod(0o000)
    os.replace(blocked, weights_dir / "model.pth")
    deadline = time.monotonic() + 15
    while True:
        last = httpx.get(container.url + "/v1/models/simplenn", timeout=10).json()["last_reload"]
        if last["result"] == "failed":
            break
        assert time.monotonic() < deadline, f"no failed reload:\n{container.logs()}"
        time.sleep(0.2)
    assert "Permission denied" in last["error"]
    assert container.predict(row)["model_version"] == version

    # At startup: the same file stops the server with one clear line and a non-zero exit.
    starting = run_container(weights_dir)
    deadline = time.monotonic() + 120
    while docker.inspect(starting.name)["State"]["Running"]:
        assert time.monotonic() < deadline, starting.logs()
        time.sleep(0.25)
    assert docker.inspect(starting.name)["State"]["ExitCode"] == 1
    assert "cannot start" in starting.logs() and "Permission denied" in starting.logs()
