"""Logs: one JSON object per line, request ids echoed and logged, dropped clients are not errors."""

from __future__ import annotations

import json
import socket
import time

import httpx


def test_json_lines_request_id_and_quiet_disconnects(start_server) -> None:
    server = start_server(env={"SIMPLENN_ACCESS_LOG": "true"})
    answer = httpx.post(server.url + "/predict", json={"input": [0.5] * 10}, headers={"X-Request-ID": "abc-123"})
    assert answer.headers["x-request-id"] == "abc-123"
    generated = httpx.get(server.url + "/health/live").headers["x-request-id"]
    assert len(generated) >= 16
    for _ in range(3):  # clients that go away mid-request or between keep-alive requests
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"input\"")
    time.sleep(0.5)
    server.stop()  # the shutdown's lines too
    records = [json.loads(line) for line in server.log().splitlines() if line.strip()]  # every line is JSON
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    access = [r for r in records if r["logger"] == "simplenn.access" and r.get("request_id") == "abc-123"]
    assert access and access[0]["path"] == "/predict" and access[0]["status"] == 200
    assert not [r for r in records if r["level"] in ("error", "critical")], records
    assert "Traceback" not in server.log()
