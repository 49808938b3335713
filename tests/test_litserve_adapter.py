"""The LitServe (and uvicorn) internals that serve.litserve_adapter relies on exist in the installed
packages, with the parameters it expects. On another version this fails with one line naming what moved."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
import socket
import struct

import pytest

import serve
from bench.servers import HOST
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


_BODY = b'{"input": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]}'
_TCPI_DATA_SEGS_IN = 152  # offset of tcp_info.tcpi_data_segs_in (Linux 4.6+), segments that carried data


def _post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (path.encode(), len(body), extra)) + body


def _read_response(sock: socket.socket) -> bytes:
    """One complete HTTP response (a Content-Length body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _content_length(data):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    return data


def _content_length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    return int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])


def _data_segments_in(sock: socket.socket) -> int:
    return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256), _TCPI_DATA_SEGS_IN)[0]


@pytest.mark.parametrize("path, body, status", [
    ("/predict", _BODY, b"200"),
    ("/v1/models/simplenn:predict", b'{"instances": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]]}', b"200"),
    ("/predict", b'{"input": [1, 2]}', b"422"),
])
def test_a_response_leaves_in_one_tcp_segment(server, path: str, body: bytes, status: bytes) -> None:
    """uvicorn writes a response's head and body separately (two segments, two wake-ups of the client);
    through ``OneWriteHttpProtocol`` the client's kernel receives each response as one data segment."""
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        for _ in range(3):  # the first and the following responses of a kept-alive connection
            before = _data_segments_in(sock)
            sock.sendall(_post(path, body))
            response = _read_response(sock)
            assert response.startswith(b"HTTP/1.1 " + status), response
            assert _data_segments_in(sock) - before == 1, response


def test_an_interim_100_continue_is_sent_before_the_body_arrives(server) -> None:
    """A write outside a complete response (here uvicorn's ``100 Continue``) is held no longer than the
    event loop's turn: the client gets it while the server still waits for the body."""
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        request = _post("/predict", _BODY, b"Expect: 100-continue\r\n")
        head, body = request.split(b"\r\n\r\n", 1)
        sock.sendall(head + b"\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(body)
        assert _read_response(sock).startswith(b"HTTP/1.1 200")


def test_a_malformed_request_gets_its_400_before_the_connection_closes(server) -> None:
    """uvicorn answers a request it cannot parse and closes the connection: the held answer goes first."""
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400"), data


def test_clients_that_leave_before_their_answer_cost_nothing(server) -> None:
    """A response held for one write meets a connection its client already closed: it is dropped quietly,
    and the server goes on answering."""
    for _ in range(20):
        with socket.create_connection((HOST, server.port), timeout=10) as sock:
            sock.sendall(_post("/predict", _BODY))  # and close at once, before the answer
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(_post("/predict", _BODY))
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
    assert "RuntimeError" not in server.log()


def test_pipelined_requests_get_their_answers_in_order(server) -> None:
    """Three requests in one packet (HTTP/1.1 pipelining): uvicorn answers them one after another, and each
    held answer leaves before the next request starts: the same bodies, in order, as asked one by one."""
    requests = [_post("/predict", b'{"input": [%s]}' % b", ".join([b"0.%d" % i] * 10)) for i in range(1, 4)]
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        expected = []
        for request in requests:
            sock.sendall(request)
            expected.append(_read_response(sock).split(b"\r\n\r\n", 1)[1])
        sock.sendall(b"".join(requests))
        data = b""
        while data.count(b"HTTP/1.1 200") < 3 or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in data.split(b"HTTP/1.1 ")[1:]]
    assert bodies == expected and len(set(expected)) == 3
