"""Publishing files the way the weights source's contract says (for the tests of serve.source and serve.watch)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Publisher contract: write a temporary name, then rename over the target."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def symlink_atomic(target: str, link: Path) -> None:
    """Retarget a symlink atomically (new link under a temp name, renamed over the old one)."""
    tmp = link.with_name(link.name + "_tmp")
    os.symlink(target, tmp)
    os.replace(tmp, link)
