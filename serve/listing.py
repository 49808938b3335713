"""The listing rule: which weights files at a location are servable, best first.

:func:`scan` looks at a location once. It never opens a weights file (the loader does): it only
resolves paths, stats files and reads the small ``.sha256`` sidecars. No torch here.

Location rule
-------------
* **A file** (or a symlink to one, however deep): that file is the only candidate.
* **A directory**, with ONE rule:

  1. If it has *numbered version subdirectories* (``<dir>/1/``, ``<dir>/2/``, names made of digits
     only), they are the versions, highest integer first (TF Serving's layout). Each version directory
     must hold a single weights file; if it holds several, the one named ``model.*`` is used; if that
     is still ambiguous the version is skipped with a warning. Loose files in ``<dir>`` are then ignored.
  2. Otherwise the weights files directly in ``<dir>`` are the candidates, newest mtime first, the
     name breaking ties.

  Weights files are names ending in ``.pth``, ``.pt`` or ``.safetensors``. Hidden names (starting
  with ``.``), temporary names (``*.tmp``, ``*.part``, ``*~``) and empty files are never candidates.
  Symlinks are followed: a kubelet ConfigMap/Secret volume (``<dir>/model.pth`` ->
  ``..data/model.pth``, ``..data`` -> ``..2026_11_29_17_00_00.123/``, swapped by renaming a new
  ``..data_tmp`` symlink over ``..data``) works in both file and directory mode. Dangling symlinks,
  symlink loops and unreadable directories are skipped with a warning.

Candidates are returned best first; ``Candidate.path`` is the resolved real path.

Publisher contract
------------------
Write the weights to a temporary name (``model.pth.tmp``, a hidden name, or a hidden version directory
such as ``.4.tmp/``) on the same filesystem, then ``os.replace``/``rename`` it into place (or swap a
symlink the same way). An optional ``<weights file>.sha256`` sidecar (``sha256sum`` format: the hex
digest is the first whitespace-separated token) is looked up next to the name as listed, else next
to the resolved file; write it BEFORE renaming the weights file, or together with it (same version
directory, same kubelet swap). The loader rejects a file whose digest does not match the sidecar.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Candidate", "Problems", "WEIGHTS_SUFFIXES", "scan", "version_directories"]

logger = logging.getLogger(__name__)

WEIGHTS_SUFFIXES = (".pth", ".pt", ".safetensors")
_TEMP_SUFFIXES = (".tmp", ".part", "~")
_SIDECAR_SUFFIX = ".sha256"
_SIDECAR_MAX_BYTES = 4096
_VERSION_NAME = re.compile(r"[0-9]+")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Candidate:
    """One servable weights file, as seen at one moment."""

    path: Path  # resolved real path of the weights file (os.path.realpath)
    version_hint: str  # "3" for <dir>/3/model.pth, else the file name as listed; informational only
    fingerprint: tuple  # (realpath, st_ino, st_size, st_mtime_ns, st_ctime_ns, sidecar fingerprint or None)
    expected_sha256: str | None  # lower-case hex digest from "<file>.sha256", if that sidecar exists


class Problems:
    """Collects why entries were skipped during one scan; each warning is logged once while it lasts.

    ``already_warned`` is the previous scan's :attr:`warned`: a warning still true is not logged again.
    """

    def __init__(self, already_warned: set[str] | None = None) -> None:
        self.messages: list[str] = []
        self.warned: set[str] = set()
        self._already_warned = already_warned or set()

    def warn(self, message: str) -> None:
        self.messages.append(message)
        self.warned.add(message)
        if message not in self._already_warned:
            logger.warning("%s", message)

    def debug(self, message: str) -> None:
        self.messages.append(message)
        logger.debug("%s", message)

    def os_error(self, path: Path, exc: OSError, what: str = "weights file") -> None:
        """Classify a resolve/stat/read failure of `path` and report it at the right level."""
        if isinstance(exc, FileNotFoundError):
            if os.path.islink(path) and not os.path.exists(path):
                self.warn(f"{what} {path} is a dangling symlink; skipped")
            else:
                self.debug(f"{what} {path} vanished while scanning; skipped")
        elif exc.errno == errno.ELOOP:
            self.warn(f"{what} {path} is a symlink loop; skipped")
        elif isinstance(exc, PermissionError):
            self.warn(f"{what} {path}: permission denied; skipped")
        else:
            self.warn(f"{what} {path}: {exc.strerror or exc}; skipped")


def scan(location: Path, problems: Problems) -> list[Candidate]:
    """All servable candidates at `location` right now, best first, one per real path."""
    if os.path.isdir(location):
        entries, by_mtime = _directory_entries(location, problems)
    elif os.path.lexists(location):
        entries, by_mtime = [(location, location.name)], False
    else:
        problems.debug(f"{location} does not exist")
        entries, by_mtime = [], False
    found = [c for entry, hint in entries if (c := _candidate(entry, hint, problems)) is not None]
    if by_mtime:
        found.sort(key=lambda c: (-c.fingerprint[3], c.version_hint))
    unique: dict[Path, Candidate] = {}
    for candidate in found:
        unique.setdefault(candidate.path, candidate)
    return list(unique.values())


def version_directories(directory: Path, names: list[str] | None = None) -> list[str]:
    """Names of the numbered version subdirectories of `directory`, highest number first."""
    if names is None:
        try:
            names = os.listdir(directory)
        except OSError:
            return []
    numbered = [(int(n), n) for n in names if _VERSION_NAME.fullmatch(n) and os.path.isdir(directory / n)]
    return [name for _, name in sorted(numbered, reverse=True)]


def _is_weights_name(name: str) -> bool:
    """A visible, non-temporary name with a weights suffix."""
    lower = name.lower()
    return not name.startswith(".") and not lower.endswith(_TEMP_SUFFIXES) and lower.endswith(WEIGHTS_SUFFIXES)


def _directory_entries(directory: Path, problems: Problems) -> tuple[list[tuple[Path, str]], bool]:
    """(entry path, version hint) pairs per the directory rule, and whether to order them by mtime."""
    names = _list_dir(directory, problems)
    versions = version_directories(directory, names)
    if not versions:
        return [(directory / n, n) for n in names if _is_weights_name(n)], True
    entries = []
    for name in versions:
        weights = _version_file(directory / name, problems)
        if weights is not None:
            entries.append((weights, name))
    return entries, False


def _version_file(version_dir: Path, problems: Problems) -> Path | None:
    """The single weights file of a version directory (preferring model.*), or None."""
    names = [n for n in _list_dir(version_dir, problems) if _is_weights_name(n)]
    chosen = names if len(names) <= 1 else [n for n in names if n.startswith("model.")]
    if len(chosen) == 1:
        return version_dir / chosen[0]
    if not names:
        problems.debug(f"version directory {version_dir} holds no weights file")
    else:
        problems.warn(f"version directory {version_dir} holds several weights files ({', '.join(names)}) "
                      f"and not exactly one named model.*; skipped")
    return None


def _list_dir(directory: Path, problems: Problems) -> list[str]:
    """Sorted names in `directory`; [] with the reason reported if it cannot be listed."""
    try:
        return sorted(os.listdir(directory))
    except OSError as exc:
        problems.os_error(directory, exc, "directory")
        return []


def _resolve(path: Path) -> tuple[str, os.stat_result]:
    """Real path and stat of `path`, following every symlink; raises OSError (loops: ELOOP)."""
    real = os.path.realpath(path, strict=True)
    return real, os.stat(real)


def _stat_fingerprint(real: str, st: os.stat_result) -> tuple:
    return (real, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _candidate(entry: Path, hint: str, problems: Problems) -> Candidate | None:
    """Resolve and stat one entry (and its sidecar); None, with the reason reported, if not servable."""
    try:
        real, st = _resolve(entry)
    except OSError as exc:
        problems.os_error(entry, exc)
        return None
    if not stat.S_ISREG(st.st_mode):
        problems.debug(f"{entry} is not a regular file; skipped")
        return None
    if st.st_size == 0:
        problems.debug(f"{entry} is empty; skipped")
        return None
    sidecar_fingerprint, digest = None, None
    sidecar = next((p for p in (Path(f"{entry}{_SIDECAR_SUFFIX}"), Path(f"{real}{_SIDECAR_SUFFIX}"))
                    if os.path.lexists(p)), None)
    if sidecar is not None:
        try:
            sidecar_fingerprint, digest = _read_sidecar(sidecar)
        except OSError as exc:
            problems.os_error(sidecar, exc, "sha256 sidecar")
            return None
        except ValueError as exc:
            problems.warn(str(exc))
            return None
    return Candidate(Path(real), hint, _stat_fingerprint(real, st) + (sidecar_fingerprint,), digest)


def _read_sidecar(path: Path) -> tuple[tuple, str]:
    """Fingerprint and digest of a ``sha256sum``-style sidecar; OSError if unreadable, ValueError if malformed."""
    real, st = _resolve(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"sha256 sidecar {path} is not a regular file; weights skipped")
    with open(real, "rb") as f:
        tokens = f.read(_SIDECAR_MAX_BYTES).split()
    # sha256sum prefixes the line with a backslash when it escapes the file name
    digest = tokens[0].decode("ascii", "replace").lstrip("\\").lower() if tokens else ""
    if not _SHA256_HEX.fullmatch(digest):
        raise ValueError(f"sha256 sidecar {path} does not start with a sha256 hex digest; weights skipped")
    return _stat_fingerprint(real, st), digest
