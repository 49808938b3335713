"""The one configuration class: ``SIMPLENN_*`` environment variables, a ``.env`` file and CLI flags.

Precedence, highest first: CLI flags (``--max-batch-size 64``), environment (``SIMPLENN_MAX_BATCH_SIZE=64``),
``.env`` in the working directory, the defaults below.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class Settings(BaseSettings):
    """Every setting of the server; each field is also ``SIMPLENN_<NAME>`` and ``--<name-with-dashes>``."""

    model_config = SettingsConfigDict(
        env_prefix="SIMPLENN_",
        env_file=".env",
        extra="ignore",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="simplenn-serve",
        protected_namespaces=(),
    )

    host: str = Field("127.0.0.1", description="Address to listen on (the container sets 0.0.0.0).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC (Open Inference Protocol) port; 0 turns gRPC off.")
    weights: Path = Field(Path("weights/model.pth"), description="Weights file (.pth/.pt/.safetensors) or directory.")
    model_class: str = Field("models.simple_nn:SimpleNN", description="Architecture as 'module:Class'.")
    model_name: str = Field("simplenn", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Served model name.")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")
    compile: Literal["none", "torchscript"] = Field("none", description="Serve eager PyTorch or TorchScript.")
    max_batch_size: int = Field(256, ge=1, le=65536, description="Most rows in one forward pass.")
    batch_timeout_ms: float = Field(
        0.0, ge=0, le=1000, description="Extra wait for more rows once the queue is drained (0: no wait)."
    )
    worker_spin_us: float = Field(
        500.0, ge=0, le=100_000,
        description="After answering, a worker polls this long for the next request before it sleeps, "
                    "only while no more processes than CPU cores want to run, and never under a CPU quota "
                    "below the cores (0: never).")
    api_spin_us: float = Field(
        300.0, ge=0, le=100_000,
        description="After sending the only request in flight to a worker, an API server polls this long for "
                    "the answer before it sleeps, only while it has one client connection (HTTP, or a gRPC peer "
                    "seen in the last second) and no more processes than CPU cores want to run, and never under "
                    "a CPU quota below the cores (0: never).")
    max_rows: int = Field(4096, ge=1, le=1_000_000, description="Most rows in one request.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body (413 beyond).")
    max_queue_bytes: int = Field(
        1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024,
        description="Request bytes an API server may have queued for one worker before 503 Overloaded."
    )
    max_weights_bytes: int = Field(1 << 30, ge=1024, description="Largest weights file accepted.")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="Longest wait for an answer (504 beyond).")
    hang_timeout_s: float = Field(
        30.0, gt=0, le=3600,
        description="A worker holding requests, or an API server leaving a ping unanswered, this long is replaced.")
    worker_start_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="Longest a worker may take to load a version; also the liveness margin.")
    workers: int = Field(1, ge=1, le=64, description="Inference worker processes (one model each).")
    api_servers: int = Field(0, ge=0, le=64, description="HTTP server processes; 0 picks one per CPU core, at most 2.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")
    access_log: bool = Field(False, description="Log every request.")
    # hot reload
    poll_interval_s: float = Field(0.5, gt=0, le=60, description="Fingerprint poll period of the weights path.")
    reload_debounce_s: float = Field(0.25, ge=0, le=60, description="How long a new file must be unchanged.")
    watch_events: bool = Field(True, description="Use filesystem events as well as polling.")
    golden: Path | None = Field(None, description="Optional .json golden file checked before a swap.")
    golden_tolerance: float = Field(1e-4, gt=0, description="Absolute tolerance for the golden check.")
    admin_token: SecretStr | None = Field(None, description="Bearer token for /admin routes (absent when unset).")
    state_dir: Path | None = Field(None, description="Writable folder for worker status; a temp folder if unset.")
    drain_s: float = Field(0.0, ge=0, le=600, description="After SIGTERM, keep serving this long while not ready.")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("model_class")
    @classmethod
    def _check_model_class(cls, value: str) -> str:
        if not re.match(r"^[\w.]+:[\w]+$", value):
            raise ValueError("must look like 'package.module:ClassName'")
        return value

    def resolved_api_servers(self) -> int:
        """``api_servers`` with 0 resolved: one HTTP process per core, at most two."""
        return self.api_servers or max(1, min(2, os.cpu_count() or 1))


class SettingsError(Exception):
    """A setting has a bad value; the message is one line naming the setting and why."""


def load_settings(argv: list[str] | None = None) -> Settings:
    """Read the settings from CLI flags (``argv``), the environment and ``.env``.

    Raises ``SettingsError`` with one line per bad value, e.g.
    ``SIMPLENN_PORT (--port): Input should be less than or equal to 65535 (got 99999)``.
    """
    try:
        return Settings(_cli_parse_args=argv if argv is not None else [])
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            flag = "--" + name.replace("_", "-")
            lines.append(f"SIMPLENN_{name.upper()} ({flag}): {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("; ".join(lines)) from None
