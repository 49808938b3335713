"""What a model version is: the bytes of a weights file, named by their sha256, pinned as a snapshot.

A version's id is the first 12 hex digits of its sha256 (``version_of``). The supervisor reads a
candidate file once, checks its size and its ``.sha256`` sidecar, and copies the bytes to
``<state>/versions/<sha256><suffix>`` (:meth:`VersionStore.pin`). Workers load only pinned
snapshots, so a version stays loadable after its file is overwritten or deleted: a replacement
worker started after a rollback loads exactly the rolled-back bytes. No torch here.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.errors import WeightsError
from serve.source import Candidate


def version_of(data: bytes) -> tuple[str, str]:
    """(version id, sha256 hex) of a weights file's bytes: the id is the first 12 hex digits."""
    digest = hashlib.sha256(data).hexdigest()
    return digest[:12], digest


def read_weights(path: Path, max_bytes: int, expected_sha256: str | None,
                 shown: Path | None = None) -> tuple[bytes, str, str]:
    """(bytes, version id, sha256) of a weights file, read once; ``WeightsError`` naming ``shown`` (default
    ``path``) when it is over ``max_bytes``, unreadable, or not the ``expected_sha256`` (its sidecar's)."""
    shown = shown or path
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise WeightsError(shown, f"is {size} bytes, over the limit of {max_bytes}", "too_large")
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(shown, f"cannot be read: {exc.strerror or exc}", "unreadable") from None
    version, digest = version_of(data)
    if expected_sha256 and expected_sha256.lower() != digest:
        raise WeightsError(shown, f"sha256 {digest} does not match its sidecar ({expected_sha256})", "digest")
    return data, version, digest


def file_version(path: Path) -> str:
    """The version id the server gives the weights file at ``path`` (what ``X-Model-Version`` will say)."""
    return version_of(path.read_bytes())[0]


@dataclass(frozen=True)
class Version:
    """A pinned version: its id and digest, the snapshot to load, and the file it came from."""

    id: str
    sha256: str
    path: str
    origin: str
    fingerprint: tuple

    def command(self, op: str) -> dict[str, Any]:
        """The control message that asks a worker to ``load`` or ``serve`` this version."""
        return {"t": op, "version": self.id, "sha256": self.sha256, "path": self.path, "origin": self.origin}


class VersionStore:
    """The pinned snapshots in one folder; only the versions still in use are kept."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        folder.mkdir(parents=True, exist_ok=True)

    def pin(self, candidate: Candidate) -> Version:
        """Read, check and snapshot a candidate; ``WeightsError`` (too large, unreadable, digest)."""
        path = candidate.path
        data, version, digest = read_weights(path, self.max_bytes, candidate.expected_sha256)
        snapshot = self.folder / (digest + path.suffix)
        if not snapshot.exists():
            tmp = snapshot.with_name(f".{snapshot.name}.tmp")
            tmp.write_bytes(data)
            os.chmod(tmp, 0o400)
            os.replace(tmp, snapshot)
        return Version(version, digest, str(snapshot), str(path), candidate.fingerprint)

    def keep_only(self, *versions: Version | None) -> None:
        """Delete every snapshot except those of ``versions``."""
        keep = {Path(v.path).name for v in versions if v is not None}
        for entry in self.folder.iterdir():
            if entry.name not in keep and not entry.name.startswith("."):
                entry.unlink(missing_ok=True)
