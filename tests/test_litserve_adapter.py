"""The LitServe (and uvicorn) internals that serve.litserve_adapter relies on exist in the installed
packages, with the parameters it expects. On another version this fails with one line naming what moved."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil

import pytest

import serve
from serve.litserve_adapter import TOUCHPOINTS


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            target = getattr(target, name)
        return target
    raise ImportError(dotted)


@pytest.mark.parametrize("dotted", sorted(TOUCHPOINTS))
def test_touchpoint_exists_with_the_expected_parameters(dotted: str) -> None:
    package = dotted.split(".")[0]
    installed = f"{package} {importlib.metadata.version(package)}"
    try:
        target = _resolve(dotted)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{installed}: {dotted} is gone ({exc}); see serve/litserve_adapter.py",
                    pytrace=False)
    found = tuple(inspect.signature(target).parameters)
    if found != TOUCHPOINTS[dotted]:
        pytest.fail(f"{installed}: {dotted}{found} changed, expected {TOUCHPOINTS[dotted]}; "
                    "see serve/litserve_adapter.py", pytrace=False)


def test_no_other_module_reaches_into_litserve_internals() -> None:
    """Outside the adapter, serve/ imports only LitServe's public names."""
    public = ("import litserve as ls", "from litserve.specs.base import LitSpec", "from litserve.loops.base import LitLoop",
              "from litserve.transport.base import MessageTransport")
    offenders = []
    for module in pkgutil.iter_modules(serve.__path__):
        if module.name == "litserve_adapter":
            continue
        source = inspect.getsource(importlib.import_module(f"serve.{module.name}"))
        for line in source.splitlines():
            stripped = line.strip()
            if " litserve" in stripped and stripped.startswith(("import ", "from ")) and stripped not in public:
                offenders.append(f"serve/{module.name}.py: {stripped}")
    assert not offenders, offenders


def test_uvicorn_keeps_its_client_connections_where_the_adapter_counts_them() -> None:
    """The API server's brief poll for an answer is gated on uvicorn's count of open connections."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app=lambda scope, receive, send: None))
    if not isinstance(getattr(getattr(server, "server_state", None), "connections", None), set):
        pytest.fail(f"uvicorn {importlib.metadata.version('uvicorn')}: Server.server_state.connections moved; "
                    "see serve/litserve_adapter.py", pytrace=False)
