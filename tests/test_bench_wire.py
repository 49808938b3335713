"""The benchmark's request forms (bench/wire.py) and wrk's generalised script (bench/post.lua): bodies,
headers and paths per protocol, decoding of answers, and one short wrk run against a recording server
that must see exactly the path, headers and binary body it was given. Needs wrk, as the smoke test does."""

from __future__ import annotations

import json
import shutil
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from bench import loadgen, wire
from bench.wire import WireError


def test_make_body_is_the_native_wire_of_make_rows() -> None:
    for rows in (1, 3):
        assert loadgen.make_body(rows, seed=rows) == wire.NATIVE.request(rows, seed=rows).body
    assert json.loads(loadgen.make_body(1, seed=1)) == {"input": loadgen.make_rows(1, seed=1)[0]}


def test_v2_binary_request_is_tritonclients_default_form() -> None:
    request = wire.V2_BINARY.request(4, seed=4)
    assert request.path == "/v2/models/simplenn/infer"
    length = int(request.headers[wire.BINARY_HEADER])
    header = json.loads(request.body[:length])
    raw = request.body[length:]
    assert header["inputs"] == [{"name": "input", "shape": [4, 10], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 160}}]
    assert header["parameters"] == {"binary_data_output": True}
    assert len(raw) == 160 and request.headers["Content-Type"] == "application/octet-stream"
    expected = np.asarray(loadgen.make_rows(4, seed=4), dtype="<f4")
    assert np.array_equal(np.frombuffer(raw, dtype="<f4").reshape(4, 10), expected)


def v2_answer(values: list[float], declared: int | None = None) -> bytes:
    raw = struct.pack(f"<{len(values)}f", *values)
    header = {"model_name": "simplenn", "outputs": [{"name": "output", "datatype": "FP32", "shape": [len(values), 1],
                                                     "parameters": {"binary_data_size": declared or len(raw)}}]}
    return json.dumps(header).encode() + raw


def test_v2_binary_answers_decode_and_bad_ones_are_refused() -> None:
    assert wire.V2_BINARY.decode(v2_answer([0.5, -1.0]), 2) == [0.5, -1.0]
    with pytest.raises(WireError, match="binary_data_size"):
        wire.V2_BINARY.decode(v2_answer([0.5, -1.0], declared=4), 2)
    with pytest.raises(WireError, match="shorter"):
        wire.V2_BINARY.decode(b"{}", 2)
    with pytest.raises(WireError, match="not JSON"):
        wire.V2_BINARY.decode(b"xx" + v2_answer([1.0])[-4:], 1)


@pytest.mark.parametrize(("wire_", "path"), [
    (wire.NATIVE, "/predict"),
    (wire.TORCHSERVE, "/predictions/simplenn"),
    (wire.KSERVE_V1, "/v1/models/simplenn:predict"),
])
def test_json_wires_paths_and_bodies(wire_: wire.Wire, path: str) -> None:
    request = wire_.request(3, seed=3)
    assert request.path == path and request.headers == {"Content-Type": "application/json"}
    payload = json.loads(request.body)
    rows = loadgen.make_rows(3, seed=3)
    assert payload == ({"instances": rows} if wire_ is wire.KSERVE_V1 else {"inputs": rows})


def test_json_answers_decode() -> None:
    assert wire.NATIVE.decode(b'{"output": 0.25, "model_version": "abc"}', 1) == [0.25]
    assert wire.NATIVE.decode(b'{"outputs": [1, 2], "model_version": "abc"}', 2) == [1.0, 2.0]
    with pytest.raises(WireError, match="model_version"):
        wire.NATIVE.decode(b'{"output": 0.25}', 1)
    assert wire.TORCHSERVE.decode(b'{"output": 0.25}', 1) == [0.25]
    assert wire.KSERVE_V1.decode(b'{"predictions": [[1.5], [2.5]]}', 2) == [1.5, 2.5]
    with pytest.raises(WireError, match="expected 3"):
        wire.KSERVE_V1.decode(b'{"predictions": [1.5]}', 3)


def test_prepare_writes_one_body_file_per_wire_and_rows(tmp_path: Path) -> None:
    prepared = wire.V2_BINARY.prepare(tmp_path, 2, seed=2)
    assert prepared.body_file == tmp_path / "v2-binary_2.body"
    assert prepared.body_file.read_bytes() == wire.V2_BINARY.request(2, seed=2).body
    assert prepared.headers[wire.BINARY_HEADER] == wire.V2_BINARY.request(2, seed=2).headers[wire.BINARY_HEADER]


def test_header_lines_refuse_what_would_break_the_request() -> None:
    assert loadgen.header_lines({"A": "1", "B-C": "x y"}) == "A: 1\nB-C: x y"
    for bad in ({"A:B": "1"}, {"A": "1\r\nX: 2"}, {"": "1"}):
        with pytest.raises(ValueError):
            loadgen.header_lines(bad)


class Recorder(BaseHTTPRequestHandler):
    """Answers every POST with 200 and remembers the first one's path, headers and body."""

    seen: list[tuple[str, dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if not Recorder.seen:
            Recorder.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[str]:
    Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_post_lua_sends_the_given_path_headers_and_binary_body(recorder: str, tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed; the benchmark needs it: apt-get install wrk")
    prepared = wire.V2_BINARY.prepare(tmp_path, 3, seed=3)
    result = loadgen.run_wrk(loadgen.find_wrk(), recorder + prepared.path, prepared.body_file, conns=1,
                             duration_s=1, headers=prepared.headers)
    assert result.requests > 0 and result.non2xx == 0
    path, headers, body = Recorder.seen[0]
    assert path == "/v2/models/simplenn/infer"
    assert headers["content-type"] == "application/octet-stream"
    assert headers["inference-header-content-length"] == prepared.headers[wire.BINARY_HEADER]
    assert body == prepared.body_file.read_bytes()  # every byte, binary included
