"""serve.transport and serve.worker: frames, connections, batching across requests and protocols,
the queue bound and timeouts."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve.channel import ChannelClosed, accept
from serve.transport import Layout, encode_replies, encode_request, parse_replies
from serve.worker import ApiLinks, take_batch
from tests.scrape import scrape, scrape_when, value


def test_reply_frames_round_trip() -> None:
    outputs = np.arange(6, dtype=np.float32).reshape(3, 2)
    data = encode_replies("abc123", [(7, 0, outputs), (8, 1, "inference failed: boom")])
    version, records = parse_replies(data[4:])
    assert version == "abc123"
    assert records[0][0] == 7 and np.array_equal(records[0][2], outputs)
    assert records[1] == (8, 1, "inference failed: boom")


@pytest.fixture
def linked(tmp_path: Path):
    """A worker's ApiLinks connected to one listening API-server socket; yields (links, api-side conn)."""
    layout = Layout(tmp_path, api_servers=1)
    layout.listen()
    links = ApiLinks(layout, worker_id=3)
    deadline = time.monotonic() + 5
    conn = None
    while conn is None and time.monotonic() < deadline:
        conn = accept(layout.listeners[0])
    assert conn is not None
    yield links, conn
    conn.close()
    layout.listeners[0].close()


def _frames(conn, timeout: float = 5.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frames = conn.frames()
        if frames:
            return frames
        time.sleep(0.01)
    return []


def test_take_batch_respects_max_rows_and_keeps_the_rest(linked) -> None:
    links, conn = linked
    assert _frames(conn) == [b'{"worker":3}']  # the worker's hello names it
    for uid, rows in enumerate([3, 3, 3]):
        conn.send(encode_request(uid, time.monotonic(), np.full((rows, 2), uid, dtype=np.float32)))
    time.sleep(0.05)
    first = take_batch(links, max_rows=6, linger=0)
    assert [r.uid for r in first] == [0, 1]
    second = take_batch(links, max_rows=6, linger=0)
    assert [r.uid for r in second] == [2] and second[0].values.shape == (3, 2)
    assert take_batch(links, max_rows=6, linger=0, wait=0.05) == []


def test_an_oversized_request_runs_alone_and_answers_go_back_on_its_connection(linked) -> None:
    links, conn = linked
    _frames(conn)
    conn.send(encode_request(1, time.monotonic(), np.ones((10, 2), dtype=np.float32)))
    batch = take_batch(links, max_rows=4, linger=0)
    assert [(r.uid, len(r.values)) for r in batch] == [(1, 10)]
    links.answer(batch[0].conn, encode_replies("v1", [(1, 0, np.zeros((10, 1), dtype=np.float32))]))
    (body,) = _frames(conn)
    assert parse_replies(body)[0] == "v1"


def test_a_lost_api_server_connection_is_made_again(linked) -> None:
    links, conn = linked
    _frames(conn)
    conn.close()  # the API server died
    assert take_batch(links, max_rows=4, linger=0, wait=0.2) == []  # notices EOF, reconnects
    again = accept(links.layout.listeners[0])
    assert again is not None, "the worker did not reconnect"
    assert _frames(again) == [b'{"worker":3}']
    with pytest.raises(ChannelClosed):
        conn.frames()


def test_a_v2_request_and_a_native_request_share_one_forward_pass(batching_server) -> None:
    server = batching_server
    before = scrape(server.url)
    rows_before = value(before, "simplenn_batch_size_rows_sum")
    v2 = {"inputs": [{"name": "input", "shape": [8, 10], "datatype": "FP32", "data": [0.25] * 80}]}
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(httpx.post, server.url + "/v2/models/simplenn/infer", json=v2, timeout=10)
        time.sleep(0.05)
        b = pool.submit(httpx.post, server.url + "/predict", json={"input": [0.25] * 10}, timeout=10)
        assert a.result().status_code == 200 and b.result().status_code == 200
    after = scrape_when(server.url, lambda got: value(got, "simplenn_batch_size_rows_sum") >= rows_before + 9)
    batches = value(after, "simplenn_batch_size_rows_count") - value(before, "simplenn_batch_size_rows_count")
    assert (batches, value(after, "simplenn_batch_size_rows_sum") - rows_before) == (1, 9)
    assert a.result().json()["outputs"][0]["data"][0] == b.result().json()["output"]


def test_concurrent_requests_are_batched(batching_server) -> None:
    server = batching_server
    before = scrape(server.url)
    rows_before = value(before, "simplenn_batch_size_rows_sum")
    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(lambda _: httpx.post(server.url + "/predict", json={"input": [1.0] * 10},
                                                      timeout=10).status_code, range(64)))
    assert statuses == [200] * 64
    after = scrape_when(server.url, lambda got: value(got, "simplenn_batch_size_rows_sum") >= rows_before + 64)
    batches = value(after, "simplenn_batch_size_rows_count") - value(before, "simplenn_batch_size_rows_count")
    assert value(after, "simplenn_batch_size_rows_sum") - rows_before == 64
    assert batches < 64 * 0.75, f"{batches} forward passes for 64 concurrent requests"


def test_a_full_queue_answers_503_with_retry_after_at_once(slow_server) -> None:
    server = slow_server  # 1 s per forward pass of one request, a 64 kB queue bound, one API server
    body = {"inputs": [[0.5] * 10] * 1000}  # 40 kB of float32 per queued request

    def send(_: int) -> tuple[int, float, str | None]:
        started = time.monotonic()
        response = httpx.post(server.url + "/predict", json=body, timeout=30)
        return response.status_code, time.monotonic() - started, response.headers.get("retry-after")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, range(8)))
    refused = [r for r in results if r[0] == 503]
    assert refused, results
    assert all(seconds < 1.0 and retry == "1" for _, seconds, retry in refused), refused
    assert any(status == 200 for status, _, _ in results)


def test_a_request_that_waits_too_long_gets_504(start_server) -> None:
    server = start_server(env={"SIMPLENN_MODEL_CLASS": "tests.user_models:SlowSimpleNN", "SLOW_FORWARD_S": "1.5",
                               "SIMPLENN_REQUEST_TIMEOUT_S": "0.5"})
    started = time.monotonic()
    response = httpx.post(server.url + "/predict", json={"input": [0.5] * 10}, timeout=10)
    assert response.status_code == 504 and "0.5 s" in response.json()["error"]
    assert time.monotonic() - started < 1.4


def test_a_spinning_worker_takes_requests_that_come_during_and_after_its_spin(tmp_path: Path) -> None:
    """With a spin, a request sent at once is taken without sleeping, and one sent long after the spin
    is still taken (the worker then blocks as usual)."""
    layout = Layout(tmp_path, api_servers=1)
    layout.listen()
    links = ApiLinks(layout, worker_id=0, spin_s=0.05)
    links.spin.cpus, links.last_batch = 10_000, 1  # idle cores, and a worker that is not batching: it spins
    conn = None
    while conn is None:
        conn = accept(layout.listeners[0])
    try:
        for delay in (0.01, 0.2):  # within the 50 ms spin, then long after it
            request = encode_request(7, time.monotonic(), np.ones((1, 4), np.float32))
            threading.Timer(delay, conn.send, args=(request,)).start()
            batch = take_batch(links, max_rows=16, linger=0.0)  # no wait limit: spin, then block
            assert [r.uid for r in batch] == [7] and batch[0].values.shape == (1, 4)
    finally:
        conn.close()
        layout.listeners[0].close()
