"""Process-level helpers of serve.process, each in a fresh interpreter (they change the whole process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter at the repository root; it prints one JSON line."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freeze_heap_moves_the_start_up_objects_out_of_the_collectors_reach() -> None:
    found = run_python(
        "import gc, json, fastapi; from serve.process import freeze_heap; before = gc.get_freeze_count(); "
        "freeze_heap(); print(json.dumps({'before': before, 'after': gc.get_freeze_count(), "
        "'young': gc.get_count()[0]}))")
    assert found["before"] == 0 and found["after"] > 10_000  # FastAPI and pydantic alone make tens of thousands
    assert found["young"] < 100


def test_release_startup_pages_gives_back_read_only_file_pages_and_the_code_still_works(tmp_path: Path) -> None:
    """A 64 MiB read-only file mapping this process alone holds (as a worker alone holds torch's libraries)
    leaves memory; pages shared with another process stay (Linux skips them), so torch's own are not
    measured here: the test's processes share them."""
    blob = tmp_path / "library.bin"
    blob.write_bytes(bytes(range(256)) * (64 * 4096))
    found = run_python(
        "import json, mmap, os, torch; from serve.process import release_startup_pages\n"
        "from bench.servers import memory_bytes\n"
        "rss = lambda: memory_bytes(os.getpid())[1] // 2**20\n"
        f"f = open({str(blob)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "total = sum(m[i] for i in range(0, len(m), 4096))\n"
        "before = rss(); advised = release_startup_pages(); after = rss()\n"
        "y = torch.nn.Linear(10, 1)(torch.ones(3, 10)).sum().item()\n"
        "print(json.dumps({'before': before, 'after': after, 'advised': advised, 'finite': y == y, "
        "'same': sum(m[i] for i in range(0, len(m), 4096)) == total}))")
    assert found["advised"] > 50, found  # torch's shared libraries, numpy's, Python's extension modules, the blob
    assert found["after"] < found["before"] - 50, found  # the blob's 64 MiB left
    assert found["finite"] and found["same"], found  # torch computes; the pages read back the same
