"""``python -m serve`` / ``simplenn-serve``: read settings, start the server, exit non-zero with one line on failure."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path


def prepare_state_dir(configured: Path | None) -> Path:
    """The writable folder for worker status and metrics, emptied; exported for the metrics of every process."""
    state_dir = configured or Path(tempfile.mkdtemp(prefix="simplenn-serve-"))
    metrics_dir = state_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return state_dir


def main(argv: list[str] | None = None) -> int:
    from serve.settings import SettingsError, load_settings

    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except SettingsError as exc:
        print(f"simplenn-serve: invalid setting: {exc}", file=sys.stderr)
        return 2
    state_dir = prepare_state_dir(settings.state_dir)
    from serve.logs import configure_logging
    from serve.server import SimpleNNServer, StartupError

    configure_logging(settings.log_level)
    try:
        SimpleNNServer(settings, state_dir).serve()
    except StartupError as exc:
        print(f"simplenn-serve: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
