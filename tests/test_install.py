"""The Makefile's install resolution picks CPU torch, never PyPI's CUDA build (requirements/README.md).

Offline, on loopback: a stand-in "PyPI" (a PEP 503 simple index served by http.server) whose torch is a
CUDA-looking wheel (`torch-2.13.0-<tag>.whl` requiring an `nvidia-*` wheel), a stand-in for PyTorch's CPU
index holding `torch-2.13.0+cpu`, and a find-links folder with the same CPU wheel (as on a machine with a
local wheel folder). pip's own configuration is switched off (PIP_CONFIG_FILE=/dev/null, no PIP_* from
outside). The pip command is the one `make -n` prints, with the Makefile's probe run by make itself; only
its target (`-e .`) is replaced by `torch` and `--dry-run --ignore-installed --report` added.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.tags import sys_tags

from bench.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)
TORCH_PIN = "torch==2.13.0+cpu"


def platform_tag() -> str:
    """A tag this interpreter installs, manylinux where there is one (like the real torch wheels)."""
    tags = [str(tag) for tag in sys_tags()]
    return next((tag for tag in tags if "manylinux" in tag), tags[0])


def write_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal valid wheel: METADATA, WHEEL and RECORD, nothing to import."""
    tag = platform_tag()
    stem = name.replace("-", "_")
    dist_info = f"{stem}-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": "Metadata-Version: 2.1\n"
                                  f"Name: {name}\nVersion: {version}\n"
                                  + "".join(f"Requires-Dist: {requirement}\n" for requirement in requires),
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests/test_install.py\n"
                               f"Root-Is-Purelib: false\nTag: {tag}\n",
    }
    record = ""
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(text.encode())}\n"
    files[f"{dist_info}/RECORD"] = record + f"{dist_info}/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{stem}-{version}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def write_project_page(index: Path, name: str, wheel: Path) -> None:
    """PEP 503: <index>/<name>/ lists the project's files (here, next to the page)."""
    page = index / name
    page.mkdir(parents=True, exist_ok=True)
    (page / wheel.name).write_bytes(wheel.read_bytes())
    href = urllib.parse.quote(wheel.name)   # `+` as %2B, as download.pytorch.org writes it
    (page / "index.html").write_text(f'<!DOCTYPE html>\n<html><body><a href="{href}">{wheel.name}</a></body></html>\n')


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def indexes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str | Path]]:
    root = tmp_path_factory.mktemp("indexes")
    built = root / "built"
    cuda = write_wheel(built / "cuda", "torch", "2.13.0", requires=("nvidia-cublas-cu12==12.4.5.8",))
    nvidia = write_wheel(built / "nvidia", "nvidia-cublas-cu12", "12.4.5.8")
    cpu = write_wheel(built / "cpu", "torch", "2.13.0+cpu")
    write_project_page(root / "pypi", "torch", cuda)
    write_project_page(root / "pypi", "nvidia-cublas-cu12", nvidia)
    write_project_page(root / "cpu", "torch", cpu)
    (root / "wheels").mkdir()
    (root / "wheels" / cpu.name).write_bytes(cpu.read_bytes())

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield {"pypi": f"{base}/pypi/", "cpu": f"{base}/cpu", "wheels": root / "wheels", "cpu_wheel": cpu.name}
    finally:
        server.shutdown()
        server.server_close()


def plain_pypi_env(indexes: dict, tmp_path: Path, cpu_index: str, find_links: Path | None = None) -> dict[str, str]:
    """A machine whose pip has no configuration and reaches only the stand-in PyPI (plus, maybe, a wheel folder)."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PIP_", "TORCH_", "MAKE", "MFLAGS")) and not name.lower().endswith("_proxy")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=indexes["pypi"], PIP_CACHE_DIR=str(tmp_path / "pip-cache"),
               PIP_DISABLE_PIP_VERSION_CHECK="1", TORCH_CPU_INDEX=cpu_index)
    if find_links is not None:
        env["PIP_FIND_LINKS"] = str(find_links)
    return env


def makefile_pip_commands(env: dict[str, str], *targets: str) -> tuple[list[list[str]], str, float]:
    """The pip install lines `make -n <targets>` prints (the Makefile's probe runs), without their `-e <project>`."""
    started = time.monotonic()
    made = subprocess.run(["make", "-n", "-C", str(ROOT), *targets, f"VENV={VENV}", f"PY={sys.executable}"],
                          env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert made.returncode == 0, made.stderr
    commands = [shlex.split(line) for line in made.stdout.splitlines() if line.startswith(f"{VENV}/bin/pip install ")]
    assert len(commands) == len(targets), made.stdout
    for argv in commands:
        assert argv[-2] == "-e" and argv[-1] in (".", ".[test]"), argv
        assert argv[argv.index("-c") + 1] == "requirements/cpu.txt", argv
    return [argv[:-2] for argv in commands], made.stderr, elapsed


def dry_run(argv: list[str], env: dict[str, str], report: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Resolve torch as `argv` would, downloading only metadata; what pip would install."""
    done = subprocess.run([*argv, "torch", "--dry-run", "--ignore-installed", "--report", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    installed = json.loads(report.read_text())["install"] if done.returncode == 0 else []
    return done, [{"name": item["metadata"]["name"], "version": item["metadata"]["version"],
                   "url": item["download_info"]["url"]} for item in installed]


def test_the_stand_in_pypi_gives_plain_pip_the_cuda_build(indexes: dict, tmp_path: Path) -> None:
    """The control: without the Makefile's options, pip takes the CUDA-looking torch and its nvidia wheel."""
    env = plain_pypi_env(indexes, tmp_path, indexes["cpu"])
    done, installed = dry_run([f"{VENV}/bin/pip", "install"], env, tmp_path / "report.json")
    assert done.returncode == 0, done.stderr
    assert sorted((item["name"], item["version"]) for item in installed) == [
        ("nvidia-cublas-cu12", "12.4.5.8"), ("torch", "2.13.0")]


def test_plain_pypi_takes_torch_from_the_cpu_index(indexes: dict, tmp_path: Path) -> None:
    env = plain_pypi_env(indexes, tmp_path, indexes["cpu"])
    (install, install_test), _, _ = makefile_pip_commands(env, "install", "install-test")
    assert install == install_test
    assert install[install.index("--extra-index-url") + 1] == indexes["cpu"]

    done, installed = dry_run(install, env, tmp_path / "report.json")
    assert done.returncode == 0, done.stderr
    assert installed == [{"name": "torch", "version": "2.13.0+cpu",
                          "url": f"{indexes['cpu']}/torch/{urllib.parse.quote(indexes['cpu_wheel'])}"}]


def test_a_local_wheel_needs_no_cpu_index(indexes: dict, tmp_path: Path) -> None:
    """This machine's case: the wheel is in a find-links folder and PyTorch's index is unreachable (closed port)."""
    env = plain_pypi_env(indexes, tmp_path, closed_port_url(), find_links=indexes["wheels"])
    (install, install_test), stderr, elapsed = makefile_pip_commands(env, "install", "install-test")
    assert install == install_test and "--extra-index-url" not in install and stderr == ""
    assert elapsed < 15, f"two probes took {elapsed:.1f} s"   # a stalled index: 15 s (pip's timeout) each

    done, installed = dry_run(install, env, tmp_path / "report.json")
    assert done.returncode == 0, done.stderr
    assert installed == [{"name": "torch", "version": "2.13.0+cpu",
                          "url": (indexes["wheels"] / indexes["cpu_wheel"]).as_uri()}]


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/cpu"


@pytest.fixture(params=["closed port", "silent server"])
def unreachable_cpu_index(request: pytest.FixtureRequest) -> Iterator[str]:
    """A closed port refuses at once; a listener that never accepts nor answers is what a hanging index looks like."""
    if request.param == "closed port":
        yield closed_port_url()
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/cpu"


def test_an_unreachable_cpu_index_costs_seconds_and_never_yields_cuda(
        indexes: dict, tmp_path: Path, unreachable_cpu_index: str) -> None:
    """No local wheel and no CPU index: the probe gives up within its default 3 s, says so, and pip then fails
    to find the pinned CPU wheel instead of taking PyPI's CUDA build."""
    env = plain_pypi_env(indexes, tmp_path, unreachable_cpu_index)
    (install,), stderr, elapsed = makefile_pip_commands(env, "install")
    assert elapsed < 8, f"the probe took {elapsed:.1f} s"   # 3 s at most waiting, the rest is pip's own check
    assert "--extra-index-url" not in install
    assert TORCH_PIN in stderr and unreachable_cpu_index in stderr

    done, installed = dry_run(install, env, tmp_path / "report.json")
    assert done.returncode != 0 and installed == []
    assert "Cannot install torch" in done.stderr   # the pin has no candidate; the CUDA build is no way out
