"""Print the pip option that makes requirements/cpu.txt's CPU torch installable, or nothing.

    python3 requirements/torch_index.py [PIP [CPU_INDEX_URL]]

* nothing, when pip as configured here (pip.conf, PIP_* variables: a local wheel folder, a mirror)
  already finds the pinned `torch==X+cpu` wheel;
* else `--extra-index-url CPU_INDEX_URL` (default: $TORCH_CPU_INDEX, else PyTorch's CPU index) when
  that index answers within $TORCH_INDEX_TIMEOUT seconds (default 3, the whole probe, DNS included);
* else nothing, and a note on stderr: pip will then fail to find the wheel. It never falls back to
  PyPI's plain torch, which is the multi-GB CUDA build on Linux x86_64.

The Makefile runs it once per install (see requirements/README.md); PIP is the venv's pip.
"""
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

CONSTRAINTS = Path(__file__).with_name("cpu.txt")
DEFAULT_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pinned_torch() -> str:
    return next(line.strip() for line in CONSTRAINTS.read_text().splitlines() if line.startswith("torch=="))


def pip_finds_pinned_torch(pip: str) -> bool:
    """Would `pip install torch -c cpu.txt` resolve with pip's own configuration? (Resolves, downloads nothing
    but metadata; already installed packages are ignored, so the answer is about the sources.)"""
    command = [pip] if Path(pip).is_file() else [sys.executable, "-m", "pip"]   # no venv yet: `make -n`
    try:
        return subprocess.run(
            [*command, "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
             "--disable-pip-version-check", "-c", str(CONSTRAINTS), "torch"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
        ).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def answers(index: str, timeout_s: float) -> bool:
    """Does `<index>/torch/` answer 200 within timeout_s (name resolution, connection and headers together)?"""
    result = []

    def probe():
        try:
            with urllib.request.urlopen(index.rstrip("/") + "/torch/", timeout=timeout_s) as response:
                result.append(response.status == 200)
        except Exception:   # noqa: BLE001 - unreachable, for whatever reason
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def main(argv: list[str]) -> int:
    pip = argv[1] if len(argv) > 1 else ".venv/bin/pip"
    index = argv[2] if len(argv) > 2 and argv[2] else os.environ.get("TORCH_CPU_INDEX") or DEFAULT_CPU_INDEX
    timeout_s = float(os.environ.get("TORCH_INDEX_TIMEOUT") or 3)
    if pip_finds_pinned_torch(pip):
        return 0
    if answers(index, timeout_s):
        print(f"--extra-index-url {index}")
        return 0
    print(f"{argv[0]}: pip's configured sources lack {pinned_torch()} and {index} did not answer "
          f"(waited at most {timeout_s:g} s); if the install fails, set TORCH_CPU_INDEX to a reachable copy of "
          "PyTorch's CPU index or give pip a find-links folder holding the wheel (requirements/README.md)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
