"""The Open Inference Protocol over gRPC (serve/grpc_protocol.py) against the real server, with the stock
``tritonclient[grpc]`` client and the checked-in stubs (serve/grpc_gen) as a second client.

KServe's own ``InferenceGRPCClient`` is not used: the ``kserve`` package brings pandas, the Kubernetes
client, cryptography and a ``psutil<6`` pin into the test environment, and it cannot be imported in one
process with ``tritonclient.grpc`` (both register ``inference.*`` in protobuf's default pool,
kserve/kserve#3099). Our stubs are generated from KServe's proto, so they are its wire format.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.utils import InferenceServerException

from serve.grpc_gen import generate
from serve.grpc_protocol import RecentClients, RpcMethods
from serve.grpc_gen import grpc_predict_v2_pb2 as pb
from serve.grpc_gen import grpc_predict_v2_pb2_grpc as pb_grpc
from serve.grpc_gen import health_pb2, health_pb2_grpc
from serve.versions import file_version
from tests.conftest import SHIPPED_WEIGHTS, ServerProcess, assert_matches, reference_outputs
from tests.scrape import scrape, scrape_when, value

VERSION = file_version(SHIPPED_WEIGHTS)
RNG = np.random.default_rng(11)
SERVICE = "/inference.GRPCInferenceService/"
INFER = SERVICE + "ModelInfer"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.UNIMPLEMENTED}


def infer_request(rows: np.ndarray, raw: bool = True, datatype: str = "FP32", **fields) -> pb.ModelInferRequest:
    """A ModelInfer request for ``rows``: ``raw_input_contents`` (tritonclient's way) or typed contents."""
    request = pb.ModelInferRequest(model_name="simplenn", **fields)
    tensor = request.inputs.add(name="input", datatype=datatype, shape=rows.shape)
    if raw:
        request.raw_input_contents.append(np.ascontiguousarray(rows, dtype="<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(np.asarray(rows, dtype=np.float64).ravel().tolist())
    return request


def outputs_of(response: pb.ModelInferResponse) -> np.ndarray:
    tensor = response.outputs[0]
    assert (tensor.name, tensor.datatype) == ("output", "FP32")
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(tensor.shape)
    return np.asarray(tensor.contents.fp32_contents, dtype=np.float32).reshape(tensor.shape)


def triton_infer(client: triton.InferenceServerClient, rows: np.ndarray, **kwargs) -> np.ndarray:
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows.astype(np.float32))
    return client.infer("simplenn", [tensor], **kwargs).as_numpy("output")


def status_of(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def grpc_counts(server: ServerProcess) -> dict[tuple[str, str], float]:
    """simplenn_requests_total of the gRPC routes: {(method, code): count}."""
    counts = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("simplenn_requests_total{") and 'route="grpc:' in line:
            labels, value = line[len("simplenn_requests_total{"):].split("} ")
            parts = dict(part.split("=", 1) for part in labels.split(","))
            counts[(parts["route"].strip('"').rsplit("/", 1)[1], parts["code"].strip('"'))] = float(value)
    return counts


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as chan:
        grpc.channel_ready_future(chan).result(timeout=10)
        yield chan


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def triton_client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.grpc_target)
    yield client
    client.close()


# -- the shared server: health, metadata, inference, errors, fuzz ----------------------------------------
def test_live_ready_and_metadata_with_tritonclient(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready("simplenn") and triton_client.is_model_ready("simplenn", VERSION)
    assert triton_client.get_server_metadata(as_json=True)["name"] == "simplenn-serve"
    meta = triton_client.get_model_metadata("simplenn", as_json=True)
    assert meta["versions"] == [VERSION] and meta["platform"] == "pytorch_libtorch"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "1"]}]
    with pytest.raises(InferenceServerException) as unknown:
        triton_client.get_model_metadata("other")
    assert unknown.value.status() == "StatusCode.NOT_FOUND" and "other" in unknown.value.message()
    with pytest.raises(InferenceServerException) as old:
        triton_client.is_model_ready("simplenn", "000000000000")
    assert old.value.status() == "StatusCode.NOT_FOUND"


def test_health_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == SERVING
    assert status_of(health.Check, health_pb2.HealthCheckRequest(service="nope")) == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(watch).status == SERVING
    watch.cancel()


@pytest.mark.parametrize("rows", [1, 512])
def test_infer_raw_with_tritonclient(triton_client: triton.InferenceServerClient, rows: int) -> None:
    x = RNG.standard_normal((rows, 10)).astype(np.float32)
    out = triton_infer(triton_client, x)
    assert out.shape == (rows, 1)
    assert_matches(out[:, 0], reference_outputs(SHIPPED_WEIGHTS, x))


@pytest.mark.parametrize(("rows", "raw"), [(1, False), (512, False), (3, True)])
def test_infer_typed_and_raw_with_the_stubs(stub: pb_grpc.GRPCInferenceServiceStub, rows: int, raw: bool) -> None:
    x = RNG.standard_normal((rows, 10))
    response, call = stub.ModelInfer.with_call(infer_request(x, raw=raw, id="req-7", model_version=VERSION),
                                               metadata=[("x-request-id", "grpc-test-42")])
    assert (response.model_name, response.model_version, response.id) == ("simplenn", VERSION, "req-7")
    assert bool(response.raw_output_contents) == raw  # answered the way it was asked
    assert_matches(outputs_of(response)[:, 0], reference_outputs(SHIPPED_WEIGHTS, x.astype(np.float32)))
    assert ("x-request-id", "grpc-test-42") in call.trailing_metadata()


def test_a_request_id_is_made_when_none_is_sent(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    _, call = stub.ServerLive.with_call(pb.ServerLiveRequest())
    ids = [value for key, value in call.trailing_metadata() if key == "x-request-id"]
    assert len(ids) == 1 and len(ids[0]) == 24


def _with(**changes) -> pb.ModelInferRequest:
    request = infer_request(np.zeros((1, 10)))
    for key, change in changes.items():
        if key == "tensor":
            change(request.inputs[0])
        else:
            change(request)
    return request


def _typed(datatype: str, field: str, values: list) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="simplenn")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=[1, 10])
    getattr(tensor.contents, field).extend(values)
    return request


BAD_REQUESTS = {
    "input named otherwise": (_with(tensor=lambda t: setattr(t, "name", "x")), "named 'input'"),
    "two inputs": (_with(request=lambda r: r.inputs.add(name="input2")), "exactly one input"),
    "no input": (pb.ModelInferRequest(model_name="simplenn"), "exactly one input"),
    "BOOL": (_typed("BOOL", "bool_contents", [True] * 10), "not supported"),
    "BYTES": (_typed("BYTES", "bytes_contents", [b"x"] * 10), "not supported"),
    "unknown datatype": (_with(tensor=lambda t: setattr(t, "datatype", "FP8")), "not supported"),
    "FP16 typed": (_typed("FP16", "fp32_contents", [0.0] * 10), "raw_input_contents"),
    "INT32 in the fp32 field": (_typed("INT32", "fp32_contents", [0.0] * 10), "contents.int_contents"),
    "nine INT64 values": (_typed("INT64", "int64_contents", [1] * 9), "needs 10 values"),
    "nine features": (infer_request(np.zeros((1, 9))), "[N, 10]"),
    "three dimensions": (_with(tensor=lambda t: t.shape.append(1)), "shape must be [N, 10]"),
    "negative dimension": (_with(tensor=lambda t: t.shape.__setitem__(0, -1)), "shape must be [N, 10]"),
    "negative dimensions whose product fits": (_with(tensor=lambda t: (t.ClearField("shape"),
                                                                       t.shape.extend([-1, -10]))), "shape must be"),
    "huge declared shape": (_with(tensor=lambda t: t.shape.__setitem__(0, 2**62)), "larger than"),
    "int64-overflowing shape": (_with(tensor=lambda t: (t.ClearField("shape"), t.shape.extend([2**62, 2**62]))),
                                "larger than"),
    "raw bytes short of the shape": (_with(tensor=lambda t: t.shape.__setitem__(0, 2)), "bytes do not hold"),
    "typed values short of the shape": (_with(request=lambda r: (r.ClearField("raw_input_contents"),
                                                                 r.inputs[0].contents.fp32_contents.extend([0] * 5))),
                                        "needs 10 values"),
    "NaN raw": (infer_request(np.full((1, 10), np.nan)), "finite"),
    "Inf typed": (infer_request(np.full((1, 10), np.inf), raw=False), "finite"),
    "beyond float32 as FP64": (_typed("FP64", "fp64_contents", [1e39] * 10), "float32"),
    "raw and typed together": (_with(tensor=lambda t: t.contents.fp32_contents.extend([0.0] * 10)),
                               "raw_input_contents must hold"),
    "two raw contents for one input": (_with(request=lambda r: r.raw_input_contents.append(b"")),
                                       "raw_input_contents must hold"),
    "unknown requested output": (_with(request=lambda r: r.outputs.add(name="nope")), "nope"),
    "more rows than SIMPLENN_MAX_ROWS": (infer_request(np.zeros((513, 10))), "512"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_are_invalid_argument_naming_the_problem(stub: pb_grpc.GRPCInferenceServiceStub,
                                                              case: str) -> None:
    request, words = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value
    assert words in error.value.details()


def test_unknown_model_or_version_is_not_found(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    x = np.zeros((1, 10))
    for request in (infer_request(x, model_version="000000000000"), _with(request=lambda r: setattr(
            r, "model_name", "other"))):
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and "not" in error.value.details()
    assert status_of(stub.ModelMetadata, pb.ModelMetadataRequest(name="simplenn", version="1")) == \
        grpc.StatusCode.NOT_FOUND
    assert stub.ModelMetadata(pb.ModelMetadataRequest(name="simplenn", version=VERSION)).versions == [VERSION]


def test_malformed_and_oversized_messages_never_reach_a_worker(server: ServerProcess, channel: grpc.Channel,
                                                               stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    raw = channel.unary_unary(INFER)  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as malformed:
        raw(b"\x0a\xff\xff\xff\xff\x0f")
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest" in malformed.value.details()
    before = httpx.get(server.url + "/metrics").text.count("simplenn_batch_size_rows_count")
    big = infer_request(np.zeros((1, 10)))
    big.raw_input_contents[0] = b"\0" * (9 * 1024 * 1024)  # over SIMPLENN_MAX_BODY_BYTES (8 MiB)
    assert status_of(stub.ModelInfer, big) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert before == httpx.get(server.url + "/metrics").text.count("simplenn_batch_size_rows_count")
    x = RNG.standard_normal((2, 10))
    assert_matches(outputs_of(stub.ModelInfer(infer_request(x)))[:, 0],
                   reference_outputs(SHIPPED_WEIGHTS, x.astype(np.float32)))


def _fuzz_cases(seed: int) -> list[tuple[str, bytes]]:
    """Random bytes, every truncation and random byte flips of valid requests, and every method."""
    rng = random.Random(seed)
    valid = [infer_request(np.ones((2, 10)), id="fuzz").SerializeToString(),
             infer_request(np.ones((2, 10)), raw=False).SerializeToString(),
             triton_pb.ModelInferRequest(model_name="simplenn").SerializeToString()]
    methods = ["ModelInfer", "ModelReady", "ModelMetadata", "ServerLive", "ServerReady", "ServerMetadata"]
    cases = [(rng.choice(methods), rng.randbytes(rng.choice([1, 3, 10, 50, 300, 3000]))) for _ in range(400)]
    for message in valid:
        cases += [("ModelInfer", message[:cut]) for cut in range(len(message))]
        for _ in range(150):
            mutated = bytearray(message)
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            cases.append(("ModelInfer", bytes(mutated)))
    return cases


def test_fuzzed_protobuf_never_gets_internal_and_the_server_still_answers(
        server: ServerProcess, channel: grpc.Channel, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    cases = _fuzz_cases(seed=20261130)
    assert len(cases) >= 1000
    calls = {method: channel.unary_unary(SERVICE + method) for method, _ in cases}
    futures = [(method, data, calls[method].future(data, timeout=30)) for method, data in cases]
    codes: dict[grpc.StatusCode, int] = {}
    for method, data, future in futures:
        try:
            future.result()
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert code in CLIENT_ERRORS, f"{method} {data[:60]!r}: {code} {exc.details()}"
        codes[code] = codes.get(code, 0) + 1
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 100, codes
    x = RNG.standard_normal((4, 10))
    assert_matches(outputs_of(stub.ModelInfer(infer_request(x)))[:, 0],
                   reference_outputs(SHIPPED_WEIGHTS, x.astype(np.float32)))
    counts = grpc_counts(server)
    assert not [key for key in counts if key[1] in ("INTERNAL", "UNKNOWN")], counts
    assert "unexpected error" not in server.log()


def test_metrics_count_grpc_methods_with_their_status(server: ServerProcess,
                                                      stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    before = grpc_counts(server)
    stub.ServerReady(pb.ServerReadyRequest())
    status_of(stub.ModelInfer, pb.ModelInferRequest(model_name="simplenn"))
    after = grpc_counts(server)
    for key in (("ServerReady", "OK"), ("ModelInfer", "INVALID_ARGUMENT")):
        assert after[key] == before.get(key, 0) + 1, key
    text = httpx.get(server.url + "/metrics").text
    assert 'simplenn_request_duration_seconds_count{route="grpc:/inference.GRPCInferenceService/ModelInfer"}' in text


def test_recent_clients_are_those_seen_within_the_window() -> None:
    now = [100.0]
    clients = RecentClients(window_s=1.0, clock=lambda: now[0])
    clients.seen("ipv4:127.0.0.1:40000")
    clients.seen("ipv4:127.0.0.1:40000")
    assert clients.count() == 1
    now[0] += 0.6
    clients.seen("ipv6:[::1]:40001")
    assert clients.count() == 2
    now[0] += 0.6  # the first is 1.2 s old, the second 0.6 s
    assert clients.count() == 1
    assert list(clients.last_seen) == ["ipv6:[::1]:40001"]


def test_recent_clients_stay_few_while_nobody_counts_them() -> None:
    """Under load nothing asks for the count; a new connection every millisecond for 10 s keeps about one
    window's worth of peers, not all of them."""
    now = [0.0]
    clients = RecentClients(window_s=1.0, clock=lambda: now[0])
    for i in range(10_000):
        now[0] = i / 1000
        clients.seen(f"ipv4:127.0.0.1:{i}")
    assert len(clients.last_seen) <= 2001
    assert clients.count() == 1001  # seen at 8.999 s to 9.999 s


def test_rpcs_count_each_client_connection_once() -> None:
    """A real grpc.aio server with our RpcMethods: two channels are two clients, however many calls."""

    async def main() -> tuple[int, int]:
        rpcs = RpcMethods(access_log=False)

        async def live(request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        server = grpc.aio.server()
        handler = rpcs.unary("inference.GRPCInferenceService", "ServerLive", live, pb.ServerLiveRequest,
                             pb.ServerLiveResponse)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ServerLive": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            own = [("grpc.use_local_subchannel_pool", 1)]  # else channels in one process share a connection
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=own) as first, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=own) as second:
                for _ in range(3):
                    assert (await pb_grpc.GRPCInferenceServiceStub(first).ServerLive(pb.ServerLiveRequest())).live
                one = rpcs.clients.count()
                await pb_grpc.GRPCInferenceServiceStub(second).ServerLive(pb.ServerLiveRequest())
                return one, rpcs.clients.count()
        finally:
            await server.stop(None)

    assert asyncio.run(main()) == (1, 2)


def test_checked_in_stubs_are_what_the_generator_makes(tmp_path: Path) -> None:
    for path in generate.generate(tmp_path):
        assert path.read_text() == (generate.HERE / path.name).read_text(), f"{path.name}: run make grpc-stubs"


def test_our_messages_match_the_stock_client_on_the_wire() -> None:
    """The messages of the RPCs we serve have tritonclient's field names, numbers and types (and nested ones)."""

    def same(ours, theirs) -> None:
        for field in ours.fields:
            other = theirs.fields_by_name[field.name]
            assert (other.number, other.type, other.is_repeated) == (field.number, field.type, field.is_repeated), \
                field.full_name
        for nested in ours.nested_types:
            same(nested, theirs.nested_types_by_name[nested.name])

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    served = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
    for method in (service.methods_by_name[name] for name in served):
        for ours in (method.input_type, method.output_type):
            same(ours, triton_pb.DESCRIPTOR.message_types_by_name[ours.name])
    for name in ("InferParameter", "InferTensorContents"):
        same(pb.DESCRIPTOR.message_types_by_name[name], triton_pb.DESCRIPTOR.message_types_by_name[name])


# -- the batching and the slow server (conftest; shared with test_transport and test_protocols) -----------
def test_1000_rows_and_grpc_and_http_requests_share_one_forward_pass(batching_server: ServerProcess) -> None:
    server = batching_server
    x = RNG.standard_normal((1000, 10)).astype(np.float32)
    expected = reference_outputs(SHIPPED_WEIGHTS, x)
    client = triton.InferenceServerClient(server.grpc_target)
    assert_matches(triton_infer(client, x)[:, 0], expected)
    with grpc.insecure_channel(server.grpc_target) as chan:
        typed = pb_grpc.GRPCInferenceServiceStub(chan).ModelInfer(infer_request(x, raw=False))
        assert_matches(outputs_of(typed)[:, 0], expected)
    metrics = scrape(server.url)
    rows_before = value(metrics, "simplenn_batch_size_rows_sum")
    with ThreadPoolExecutor(2) as pool:
        grpc_call = pool.submit(triton_infer, client, np.full((8, 10), 0.25, dtype=np.float32))
        time.sleep(0.05)
        http_call = pool.submit(httpx.post, server.url + "/predict", json={"input": [0.25] * 10}, timeout=10)
        assert http_call.result().status_code == 200
        assert grpc_call.result()[0, 0] == http_call.result().json()["output"]
    client.close()

    after = scrape_when(server.url, lambda got: value(got, "simplenn_batch_size_rows_sum") >= rows_before + 9)
    passes = value(after, "simplenn_batch_size_rows_count") - value(metrics, "simplenn_batch_size_rows_count")
    assert (passes, value(after, "simplenn_batch_size_rows_sum") - rows_before) == (1, 9)


def _timed(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest,
           timeout: float | None = None) -> tuple[grpc.StatusCode, float, str]:
    started = time.monotonic()
    try:
        stub.ModelInfer(request, timeout=timeout)
        return grpc.StatusCode.OK, time.monotonic() - started, ""
    except grpc.RpcError as exc:
        return exc.code(), time.monotonic() - started, exc.details() or ""


def _concurrently(target: str, requests: list[pb.ModelInferRequest]) -> list[tuple[grpc.StatusCode, float, str]]:
    with grpc.insecure_channel(target) as chan, ThreadPoolExecutor(len(requests)) as pool:
        stub = pb_grpc.GRPCInferenceServiceStub(chan)
        return list(pool.map(lambda request: _timed(stub, request), requests))


def test_a_full_queue_is_resource_exhausted_at_once(slow_server: ServerProcess) -> None:
    results = _concurrently(slow_server.grpc_target, [infer_request(np.full((1000, 10), 0.5))] * 6)  # 40 kB each
    refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert refused and all(seconds < 1.0 and "queue is full" in text for _, seconds, text in refused), results
    assert any(code == grpc.StatusCode.OK for code, _, _ in results), results


def test_the_request_timeout_is_deadline_exceeded(slow_server: ServerProcess) -> None:
    results = _concurrently(slow_server.grpc_target, [infer_request(np.full((1, 10), 0.5))] * 4)
    codes = sorted(code.name for code, _, _ in results)
    assert codes.count("OK") >= 1 and "DEADLINE_EXCEEDED" in codes, results
    assert all("2.5 s" in text for code, _, text in results if code == grpc.StatusCode.DEADLINE_EXCEEDED), results


def test_a_client_deadline_ends_the_call_and_costs_nothing_else(slow_server: ServerProcess) -> None:
    with grpc.insecure_channel(slow_server.grpc_target) as chan:
        stub = pb_grpc.GRPCInferenceServiceStub(chan)
        code, seconds, _ = _timed(stub, infer_request(np.zeros((1, 10))), timeout=0.3)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and seconds < 0.9
        x = RNG.standard_normal((1, 10)).astype(np.float32)
        assert_matches(outputs_of(stub.ModelInfer(infer_request(x), timeout=10))[:, 0],
                       reference_outputs(SHIPPED_WEIGHTS, x))
    assert grpc_counts(slow_server).get(("ModelInfer", "DEADLINE_EXCEEDED"), 0) >= 1


def test_a_lost_worker_is_unavailable_fast_and_is_replaced(slow_server: ServerProcess) -> None:
    (worker,) = httpx.get(slow_server.url + "/v1/models/simplenn").json()["workers"]
    with ThreadPoolExecutor(1) as pool:
        calls = pool.submit(_concurrently, slow_server.grpc_target, [infer_request(np.zeros((1, 10)))] * 2)
        time.sleep(0.5)
        killed = time.monotonic()
        os.kill(worker["pid"], signal.SIGKILL)
        results = calls.result(timeout=30)
    assert [code for code, _, _ in results] == [grpc.StatusCode.UNAVAILABLE] * 2, results
    assert time.monotonic() - killed < 3, "not failed fast"
    slow_server.wait_ready(60)
    with grpc.insecure_channel(slow_server.grpc_target) as chan:
        assert _timed(pb_grpc.GRPCInferenceServiceStub(chan), infer_request(np.zeros((1, 10))))[0] == \
            grpc.StatusCode.OK


# -- a server of its own ------------------------------------------------------------------------------------
def test_sigterm_during_a_stream_of_rpcs_loses_nothing_accepted(start_server) -> None:
    server = start_server(env={"SIMPLENN_MODEL_CLASS": "tests.user_models:SlowSimpleNN", "SLOW_FORWARD_S": "0.02",
                               "SIMPLENN_DRAIN_S": "2.0", "SIMPLENN_ACCESS_LOG": "true"})
    outcomes: dict[str, str] = {}  # request id -> status name as the client saw it

    def stream(worker: int) -> None:
        with grpc.insecure_channel(server.grpc_target) as chan:
            stub = pb_grpc.GRPCInferenceServiceStub(chan)
            for n in range(100_000):
                request_id = f"sigterm-{worker}-{n}"
                try:
                    stub.ModelInfer(infer_request(np.zeros((1, 10))), metadata=[("x-request-id", request_id)],
                                    timeout=20)
                    outcomes[request_id] = "OK"
                except grpc.RpcError as exc:
                    outcomes[request_id] = exc.code().name
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        return

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    server.proc.send_signal(signal.SIGTERM)
    with grpc.insecure_channel(server.grpc_target) as chan:  # draining: not ready, still answering
        ready, health = True, SERVING
        deadline = time.monotonic() + 1.5
        while (ready or health != NOT_SERVING) and time.monotonic() < deadline:
            time.sleep(0.05)
            ready = pb_grpc.GRPCInferenceServiceStub(chan).ServerReady(pb.ServerReadyRequest()).ready
            health = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest()).status
        assert (ready, health) == (False, NOT_SERVING)
    for thread in threads:
        thread.join(40)
    assert server.wait_exit(40) == 0
    served = {}
    for line in server.log().splitlines():
        if '"request_id":"sigterm-' in line and '"method":"GRPC"' in line:
            request_id = line.split('"request_id":"', 1)[1].split('"', 1)[0]
            served[request_id] = line.split('"status":"', 1)[1].split('"', 1)[0]
    seen = {status: list(outcomes.values()).count(status) for status in set(outcomes.values())}
    statuses = list(served.values())
    assert served and set(statuses) == {"OK"}, (seen, {status: statuses.count(status) for status in set(statuses)})
    # gRPC core cancels the calls that reached an API server's transport but not yet its application when
    # that server stops (pending calls are "zombified"): the server never saw them, so nothing accepted is
    # lost, and a client may send them again. At most one per client stream; every other answer is OK or
    # UNAVAILABLE (a stopped server), never an error of an accepted request.
    unseen_cancelled = [rid for rid, code in outcomes.items() if code == "CANCELLED" and rid not in served]
    assert len(unseen_cancelled) <= len(threads), seen
    assert {code for rid, code in outcomes.items() if rid not in unseen_cancelled} <= {"OK", "UNAVAILABLE"}, seen
    lost = {rid: outcomes.get(rid) for rid, status in served.items() if outcomes.get(rid) != "OK"}
    assert not lost, f"accepted but not answered: {lost}"
    assert seen.get("OK", 0) > 20, seen
