"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis) and with hypothesis-built bodies.

One dedicated server (default limits: 8 MiB bodies, 4,096 rows) takes, per run:

* every operation of ``/openapi.json``, positive and negative cases from schemathesis, path parameters
  both random and real (``simplenn`` and the live version, so ``/v1`` and ``/v2`` reach their handlers);
* hypothesis bodies POSTed to ``/predict``, ``/v1/models/simplenn:predict`` and
  ``/v2/models/simplenn/infer``: near-valid bodies of each protocol with wrong types in any place,
  huge integers (10**400), extreme floats (-0.0, 1e308, 3.5e38, 5e-324), NaN/Infinity tokens,
  deep nesting up to 10,000 levels, unicode with lone-surrogate escapes and invalid UTF-8, empty
  and non-JSON bodies, random Content-Types and binary-extension headers;
* bodies just under, at and over the 8 MiB limit, with and without Content-Length.

Every answer must be below 500, and every 4xx a JSON ``{"error": "<text>"}``. Failures are collected
(not shrunk, to keep the run bounded) and reported with the request that caused them. At least 2,000
requests per run; afterwards the server must still answer known rows exactly like the in-process
model on every protocol, with every one of its processes alive and no unhandled exception logged.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from bench.servers import alive, process_tree
from tests.conftest import SHIPPED_WEIGHTS, ServerProcess, assert_matches, reference_outputs

pytestmark = pytest.mark.timeout(300)

MODEL = "simplenn"
FEATURES = 10
LIMIT = 8 * 1024 * 1024  # the server's default SIMPLENN_MAX_BODY_BYTES
MIN_CASES = 2000
PREDICT_PATHS = ("/predict", f"/v1/models/{MODEL}:predict", f"/v2/models/{MODEL}/infer")
# Examples per (operation, variant) from schemathesis, and per route from hypothesis.
SCHEMA_EXAMPLES = 40
BODY_EXAMPLES = 500
HYPOTHESIS: dict[str, Any] = {"deadline": None, "database": None, "phases": [Phase.generate], "print_blob": False,
                               "suppress_health_check": list(HealthCheck)}


class Tally:
    """Every request the fuzzers sent, by route and status, and the failures among them."""

    def __init__(self) -> None:
        self.statuses: Counter[tuple[str, int | str]] = Counter()
        self.failures: dict[tuple[str, str], tuple[int, str]] = {}  # (route, kind) -> (size, repro), smallest kept
        self.completed: set[str] = set()

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def record(self, route: str, status: int | str, problem: str | None, repro: str) -> None:
        self.statuses[(route, status)] += 1
        if problem is not None:
            key = (route, problem)
            if key not in self.failures or len(repro) < self.failures[key][0]:
                self.failures[key] = (len(repro), repro)

    def failures_for(self, routes: tuple[str, ...]) -> str:
        lines = [f"{route} -> {kind}\n    {repro}" for (route, kind), (_, repro) in sorted(self.failures.items())
                 if route in routes]
        return "\n".join(lines)


TALLY = Tally()


def problem_with(status: int, body: bytes) -> str | None:
    """None when the answer is acceptable for a fuzzed request, else a short description."""
    if status >= 500:
        return f"{status} {body[:200]!r}"
    if 400 <= status < 500:
        try:
            decoded = json.loads(body)
        except ValueError:
            return f"{status} with a non-JSON body {body[:200]!r}"
        if not (isinstance(decoded, dict) and isinstance(decoded.get("error"), str) and decoded["error"]):
            return f"{status} without an 'error' string: {body[:200]!r}"
    return None


def short(data: bytes | str | None, limit: int = 600) -> str:
    text = repr(data)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(data or b'')} bytes)"


# -- the server ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of its own on the shipped weights with the default limits (a crash here hurts no other test)."""
    proc = ServerProcess(tmp_path_factory.mktemp("fuzz-server"), {"SIMPLENN_WEIGHTS": str(SHIPPED_WEIGHTS)})
    try:
        proc.wait_ready()
        time.sleep(0.5)  # let every API server process come up before the tree is recorded
        proc.processes = {pid for pid in process_tree(proc.pid) if alive(pid)}  # type: ignore[attr-defined]
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def live_version(fuzz_server: ServerProcess) -> str:
    versions = httpx.get(f"{fuzz_server.url}/v2/models/{MODEL}", timeout=10).json()["versions"]
    assert len(versions) == 1, versions
    return versions[0]


# -- schemathesis: every operation of the server's own OpenAPI schema ------------------------------------


def _fuzz_operation(strategy: st.SearchStrategy, label: str, base_url: str, session: requests.Session) -> int:
    """Send up to SCHEMA_EXAMPLES cases of one operation; record each answer; return how many were sent."""
    sent = 0

    @settings(max_examples=SCHEMA_EXAMPLES, **HYPOTHESIS)
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        nonlocal sent
        try:
            response = case.call(base_url=base_url, session=session, timeout=30)
            status, problem = response.status_code, problem_with(response.status_code, response.content)
        except requests.RequestException as exc:
            status, problem = "no answer", f"no answer: {type(exc).__name__}: {exc}"
        sent += 1
        TALLY.record(label, status, problem, case.as_curl_command())

    run()
    return sent


def test_every_openapi_operation_fuzzed_by_schemathesis(fuzz_server: ServerProcess, live_version: str) -> None:
    raw = httpx.get(fuzz_server.url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(raw)
    operations = []
    for result in schema.get_all_operations():
        operations.append(result.ok())  # an operation schemathesis cannot use fails the test here
    documented = {f"{method.upper()} {path}" for path, item in raw["paths"].items() for method in item}
    assert {op.label for op in operations} == documented
    for path in ("/v1/models/{name}", "/v1/models/{name}:predict", "/v2/models/{name}/infer",
                 "/v2/models/{name}/versions/{version}/infer"):
        assert path in raw["paths"], f"{path} is not in /openapi.json"

    session = requests.Session()
    sent: Counter[str] = Counter()
    started = time.monotonic()
    for op in operations:
        names = {p.name for p in op.path_parameters}
        fixed_variants: list[dict[str, str] | None] = [None]  # random path parameters: unknown model/version
        if "name" in names:
            fixed_variants.append({"name": MODEL} if "version" not in names else {"name": MODEL, "version": "0"})
        if "version" in names:
            fixed_variants.append({"name": MODEL, "version": live_version})
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if len(op.body) else [])
        for fixed in fixed_variants:
            for mode in modes:
                strategy = op.as_strategy(generation_mode=mode, path_parameters=fixed)
                sent[op.label] += _fuzz_operation(strategy, op.label, fuzz_server.url, session)
    print(f"\nschemathesis: {sum(sent.values())} requests over {len(sent)} operations "
          f"in {time.monotonic() - started:.1f} s: {dict(sent)}")
    missing = sorted(label for label in documented if not sent[label])
    assert not missing, f"operations never called: {missing}"
    TALLY.completed.add("schemathesis")
    failures = TALLY.failures_for(tuple(documented))
    assert not failures, f"server errors or malformed error answers:\n{failures}"


# -- hypothesis: hostile bodies on the three prediction routes ------------------------------------------

EXTREME_NUMBERS = st.sampled_from([0, -0.0, 1e308, -1e308, 5e-324, 3.5e38, -3.5e38, 3.4028235e38, 1e39,
                                   2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400, -(10**400)])
NUMBERS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(10**30), max_value=10**30),
    EXTREME_NUMBERS,
)
# Text with unusual code points; lone surrogates become \\udXXX escapes in the JSON text.
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=25)
WEIRD = st.one_of(SCALARS, JSON_VALUES, st.sampled_from([float("nan"), float("inf"), float("-inf")]))


@st.composite
def mostly(draw: st.DrawFn, good: st.SearchStrategy, other: st.SearchStrategy, odds: int = 5) -> Any:
    """``good`` ``odds`` times out of ``odds + 1``, else ``other`` (so most bodies get deep into validation)."""
    return draw(other if draw(st.integers(0, odds)) == 0 else good)


def maybe_wrong(good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly ``good``, sometimes any JSON value in its place."""
    return mostly(good, WEIRD)


ROW = mostly(st.lists(NUMBERS, min_size=FEATURES, max_size=FEATURES),
             st.lists(maybe_wrong(NUMBERS), min_size=0, max_size=12), odds=2)
ROWS = st.lists(maybe_wrong(ROW), min_size=0, max_size=6)


@st.composite
def native_body(draw: st.DrawFn) -> Any:
    keys = draw(mostly(st.sampled_from([{"input"}, {"inputs"}]),
                       st.sets(st.sampled_from(["input", "inputs", "instances", "extra"]), max_size=3)))
    body = {key: draw(ROW if key == "input" else maybe_wrong(ROWS)) for key in keys}
    return draw(maybe_wrong(st.just(body)))


@st.composite
def v1_body(draw: st.DrawFn) -> Any:
    body: dict[str, Any] = {"instances": draw(maybe_wrong(ROWS))}
    if draw(st.integers(0, 4)) == 0:
        body[draw(st.sampled_from(["inputs", "signature_name", "extra"]))] = draw(WEIRD)
    return draw(maybe_wrong(st.just(body)))


V2_TYPES = ["FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]
DATATYPES = mostly(st.sampled_from(V2_TYPES), st.sampled_from(["BOOL", "BYTES", "fp32", "", "FP8"]) | TEXT)
SHAPE_DIMS = st.one_of(st.integers(min_value=-3, max_value=12), st.integers(min_value=-(2**64), max_value=2**64),
                       st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, 2**63, 3037000500, 4294967296]))


@st.composite
def v2_tensor(draw: st.DrawFn) -> Any:
    rows = draw(st.integers(min_value=0, max_value=4))
    datatype = draw(DATATYPES)
    tensor: dict[str, Any] = {
        "name": draw(mostly(st.just("input"), st.sampled_from(["INPUT", "output", ""]) | TEXT)),
        "shape": draw(mostly(st.just([rows, FEATURES]), st.lists(maybe_wrong(SHAPE_DIMS), max_size=4), odds=3)),
        "datatype": datatype,
    }
    count = rows * FEATURES
    flat = draw(mostly(st.lists(NUMBERS, min_size=count, max_size=count),
                       st.lists(maybe_wrong(NUMBERS), max_size=count + 3), odds=3))
    layout = draw(st.sampled_from(["flat", "flat", "nested", "nested", "ragged", "binary", "none", "weird"]))
    if layout == "flat":
        tensor["data"] = flat
    elif layout == "nested":
        tensor["data"] = [flat[i:i + FEATURES] for i in range(0, len(flat), FEATURES)]
    elif layout == "ragged":
        tensor["data"] = draw(st.lists(st.lists(NUMBERS, max_size=12), min_size=1, max_size=4))
    elif layout == "binary":  # a size claim: the request's binary part (if any) is drawn in v2_request
        itemsize = 4 if datatype not in V2_TYPES else int(np.dtype(datatype.lower().replace("fp", "float")).itemsize)
        tensor["parameters"] = {"binary_data_size": draw(mostly(st.just(count * itemsize), WEIRD | SHAPE_DIMS))}
    elif layout == "weird":
        tensor["data"] = draw(WEIRD)
    if draw(st.integers(0, 5)) == 0:
        tensor["parameters"] = draw(maybe_wrong(st.fixed_dictionaries({}, optional={
            "binary_data_size": maybe_wrong(SHAPE_DIMS), "content_type": TEXT})))
    if draw(st.integers(0, 8)) == 0:
        tensor[draw(TEXT)] = draw(WEIRD)
    return draw(maybe_wrong(st.just(tensor)))


@st.composite
def v2_body(draw: st.DrawFn) -> Any:
    tensors = draw(mostly(st.lists(v2_tensor(), min_size=1, max_size=1), st.lists(v2_tensor(), max_size=3)))
    body: dict[str, Any] = {"inputs": tensors}
    if draw(st.booleans()):
        body["id"] = draw(maybe_wrong(TEXT))
    if draw(st.booleans()):
        body["outputs"] = draw(maybe_wrong(st.lists(st.fixed_dictionaries(
            {"name": mostly(st.just("output"), st.just("other") | TEXT)},
            optional={"parameters": maybe_wrong(st.fixed_dictionaries({}, optional={"binary_data": WEIRD}))}),
            max_size=3)))
    if draw(st.booleans()):
        body["parameters"] = draw(maybe_wrong(st.fixed_dictionaries({}, optional={"binary_data_output": WEIRD})))
    return draw(maybe_wrong(st.just(body)))


@st.composite
def v2_binary_request(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A JSON header (often claiming binary_data_size) then raw bytes, with the header-length header."""
    header = to_json(draw(v2_body()))
    raw = draw(st.binary(max_size=200) | st.sampled_from([b"\x00" * 40, b"\xff" * 40, b"\x7f\x80\x00\x00" * 10]))
    length = draw(mostly(st.just(str(len(header))), st.one_of(
        st.integers(min_value=0, max_value=len(header) + len(raw) + 5).map(str),
        st.sampled_from(["-1", "abc", "", "99999999999999999999999", "1e3", "0x10", f"000{len(header)}"]))))
    return header + raw, {"inference-header-content-length": length,
                          "content-type": draw(st.sampled_from(["application/octet-stream", "application/json"]))}


def to_json(value: Any) -> bytes:
    """JSON text, NaN/Infinity as their non-standard tokens, lone surrogates as escapes."""
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def deep_nesting(draw: st.DrawFn) -> bytes:
    depth = draw(st.sampled_from([64, 256, 1000, 5000, 10_000]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'{"input":', b"}")]))
    middle = draw(st.sampled_from([b"1", b"[]", b"{}", b"", b"null"]))
    closed = draw(st.booleans())
    return opener * depth + middle + (closer * depth if closed else b"")


RAW_BYTES = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    st.sampled_from([b"null", b"[]", b"{}", b'""', b"0", b"true", b"\x00", b"\xef\xbb\xbf{}", b"{" * 3, b'{"input":',
                     b'{"input":[1,2,3,4,5,6,7,8,9,10]}{"input":[1]}', b'{"input":[1,2,3,4,5,6,7,8,9,10],}',
                     b'{"input":[1,2,3,4,5,6,7,8,9,10],"input":"x"}', b'{"input":"\\ud800"}',
                     b'{"input":"\\udfff\\ud800"}', b'{"\\ud83d":[]}', b'{"input":"\xff\xfe"}',
                     b"[NaN, Infinity, -Infinity]", b'{"input":[1e999,0,0,0,0,0,0,0,0,0]}']),
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
    deep_nesting(),
)

# Printable ASCII without surrounding blanks: what an HTTP client can send as a header value.
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
JSON_TYPES = st.sampled_from([None, "application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
                              "application/vnd.api+json", "application/json; charset=latin-1"])
OTHER_TYPES = st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                               "application/octet-stream", "", ";", "json", "*/*"]) | HEADER_TEXT
CONTENT_TYPES = mostly(JSON_TYPES, OTHER_TYPES, odds=3)
EXTRA_HEADERS = st.fixed_dictionaries({}, optional={"x-request-id": HEADER_TEXT, "accept-encoding": HEADER_TEXT})


@st.composite
def request_for(draw: st.DrawFn, path: str) -> tuple[bytes, dict[str, str]]:
    """A body and headers for ``path``: mostly near-valid for its protocol, else anything."""
    structured = {"/predict": native_body(), f"/v1/models/{MODEL}:predict": v1_body(),
                  f"/v2/models/{MODEL}/infer": v2_body()}[path]
    headers = draw(EXTRA_HEADERS)
    kind = draw(st.integers(0, 9))
    if path.endswith("/infer") and kind < 2:
        body, binary_headers = draw(v2_binary_request())
        return body, {**headers, **binary_headers}
    if kind < 6:
        body = to_json(draw(structured))
    elif kind < 8:
        body = to_json(draw(st.one_of(native_body(), v1_body(), v2_body(), JSON_VALUES)))
    else:
        body = draw(RAW_BYTES)
    content_type = draw(CONTENT_TYPES)
    if content_type is not None:
        headers["content-type"] = content_type
    return body, headers


def success_is_json(response: httpx.Response) -> str | None:
    """A 200 is JSON (for a binary V2 answer: its JSON header, whose length the answer names)."""
    content = response.content
    length = response.headers.get("inference-header-content-length")
    if length is not None:
        content = content[: int(length)]
    try:
        json.loads(content)
    except ValueError:
        return f"200 with a body that is not JSON: {response.content[:200]!r}"
    return None


@pytest.fixture(scope="module")
def http(fuzz_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:
        yield client


@pytest.mark.parametrize("path", PREDICT_PATHS)
def test_hostile_bodies_never_get_a_server_error(http: httpx.Client, path: str) -> None:
    @settings(max_examples=BODY_EXAMPLES, **HYPOTHESIS)
    @given(request=request_for(path))
    def run(request: tuple[bytes, dict[str, str]]) -> None:
        body, headers = request
        try:
            response = http.post(path, content=body, headers=headers)
            status = response.status_code
            problem = problem_with(status, response.content)
            if status == 200 and problem is None:
                problem = success_is_json(response)
        except httpx.HTTPError as exc:
            status, problem = "no answer", f"no answer: {type(exc).__name__}: {exc}"
        TALLY.record(path, status, problem, f"POST {path} headers={headers} body={short(body)}")

    started, before = time.monotonic(), TALLY.total
    run()
    print(f"\nhypothesis {path}: {TALLY.total - before} requests in {time.monotonic() - started:.1f} s")
    TALLY.completed.add(path)
    failures = TALLY.failures_for((path,))
    assert not failures, f"server errors or malformed error answers:\n{failures}"


# -- bodies near and over the size limit --------------------------------------------------------------


def _padded_row_body(size: int) -> bytes:
    """A valid one-row /predict body padded with JSON whitespace to exactly ``size`` bytes."""
    core = to_json({"input": [0.5] * FEATURES})
    return core[:-1] + b" " * (size - len(core)) + b"}"


def _chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.mark.parametrize("path", PREDICT_PATHS)
@pytest.mark.parametrize("size", [LIMIT - 1, LIMIT, LIMIT + 1, 2 * LIMIT])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_bodies_near_and_over_the_limit(fuzz_server: ServerProcess, path: str, size: int, declared: bool) -> None:
    body = _padded_row_body(size)
    if path != "/predict":  # the same bytes are a wrong body elsewhere: 400 below the limit
        body = b"[" + body[1:-1] + b"]"
    content = body if declared else _chunks(body)
    route = f"{path} ({size} bytes, {'content-length' if declared else 'chunked'})"
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as client:
        try:
            response = client.post(path, content=content, headers={"content-type": "application/json"})
        except httpx.HTTPError:  # the server may answer 413 and close before the upload ends
            if declared or size <= LIMIT:
                raise
            TALLY.record(route, "closed early", None, "")
            return
    TALLY.record(route, response.status_code, problem_with(response.status_code, response.content), "")
    if size > LIMIT:
        assert response.status_code == 413, response.text
    elif path == "/predict":
        assert response.status_code == 200, response.text[:300]
    else:
        assert response.status_code == 400, response.text[:300]
    assert problem_with(response.status_code, response.content) is None


# -- requests that once broke this kind of server, sent every run ------------------------------------------

V2 = f"/v2/models/{MODEL}/infer"
JSON = {"content-type": "application/json"}


def _v2(shape: list[int], data: Any = None, datatype: str = "FP32", **parameters: Any) -> bytes:
    tensor: dict[str, Any] = {"name": "input", "shape": shape, "datatype": datatype}
    if data is not None:
        tensor["data"] = data
    if parameters:
        tensor["parameters"] = parameters
    return to_json({"inputs": [tensor]})


def _binary(shape: list[int], raw: bytes, datatype: str = "FP32", size: Any = None) -> tuple[bytes, dict[str, str]]:
    header = _v2(shape, datatype=datatype, binary_data_size=len(raw) if size is None else size)
    return header + raw, {"inference-header-content-length": str(len(header)),
                          "content-type": "application/octet-stream"}


ZEROS = [0.0] * FEATURES
KNOWN_CASES: dict[str, tuple[str, bytes, dict[str, str]]] = {
    "v2 ragged nested data": (V2, _v2([1, FEATURES], [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]), JSON),
    "v2 ragged nested data, right total": (V2, _v2([2, FEATURES], [[0] * 9, [0] * 11]), JSON),
    "v2 shape whose product overflows int64 to 1": (V2, _v2([2**63 - 1, 2**63 - 1], [1.0]), JSON),
    "v2 shape whose product overflows to a negative": (V2, _v2([3037000500, 3037000500], [1.0]), JSON),
    "v2 shape beyond int64": (V2, _v2([2**64, FEATURES], [1.0]), JSON),
    "v2 shape of three huge dims": (V2, _v2([2**32, 2**32, 2**32], [1.0]), JSON),
    "v2 binary, shape product overflows to the byte count": (V2, *_binary([2**63 - 1, 2**63 - 1], b"\0" * 4)),
    "v2 binary, bytes not a multiple of the item size": (V2, *_binary([1, FEATURES], b"\0" * 41)),
    "v2 binary, size claimed as true": (V2, *_binary([1, FEATURES], b"\0", size=True)),
    "v2 binary, size claimed as a float": (V2, *_binary([1, FEATURES], b"\0" * 40, size=40.0)),
    "v2 binary, NaN FP16 bytes": (V2, *_binary([1, FEATURES], b"\xff" * 20, datatype="FP16")),
    "v2 binary, BOOL": (V2, *_binary([1, FEATURES], b"\x01" * 10, datatype="BOOL")),
    "v2 binary, header length past the body": (V2, _v2([1, FEATURES], ZEROS),
                                               {"inference-header-content-length": "99999"}),
    "v2 binary, header length zero": (V2, _v2([1, FEATURES], ZEROS), {"inference-header-content-length": "0"}),
    "v2 binary, header length huge": (V2, _v2([1, FEATURES], ZEROS),
                                      {"inference-header-content-length": "9" * 40}),
    "v2 integer data out of INT8 range": (V2, _v2([1, FEATURES], [1000] + ZEROS[1:], datatype="INT8"), JSON),
    "v2 fractional integer data": (V2, _v2([1, FEATURES], [0.5] + ZEROS[1:], datatype="INT32"), JSON),
    "v2 empty shape": (V2, _v2([], []), JSON),
    "v2 zero rows": (V2, _v2([0, FEATURES], []), JSON),
    "v2 negative dim": (V2, _v2([-1, FEATURES], ZEROS), JSON),
    "v2 two inputs": (V2, to_json({"inputs": [json.loads(_v2([1, FEATURES], ZEROS))["inputs"][0]] * 2}), JSON),
    "v2 output parameters not an object": (V2, to_json({**json.loads(_v2([1, FEATURES], ZEROS)),
                                                         "outputs": [{"name": "output", "parameters": []}]}), JSON),
    "v2 binary_data_output not a bool": (V2, to_json({**json.loads(_v2([1, FEATURES], ZEROS)),
                                                       "parameters": {"binary_data_output": [1]}}), JSON),
    "native 10,000-deep list": ("/predict", b'{"input":' + b"[" * 10_000 + b"]" * 10_000 + b"}", JSON),
    "native 10,000-deep objects": ("/predict", b'{"a":' * 10_000 + b"1" + b"}" * 10_000, JSON),
    "native 10**400": ("/predict", b'{"input":[1' + b"0" * 400 + b",0,0,0,0,0,0,0,0,0]}", JSON),
    "native 1e999 (infinite as a float)": ("/predict", b'{"input":[1e999,0,0,0,0,0,0,0,0,0]}', JSON),
    "native NaN token": ("/predict", b'{"input":[NaN,0,0,0,0,0,0,0,0,0]}', JSON),
    "native lone surrogate": ("/predict", b'{"input":"\\ud800"}', JSON),
    "native invalid UTF-8": ("/predict", b'{"input":"\xff\xfe"}', JSON),
    "native rows over the limit": ("/predict", to_json({"inputs": [ZEROS] * 5000}), JSON),
    "native booleans as numbers": ("/predict", to_json({"input": [True] * FEATURES}), JSON),
    "native duplicate keys": ("/predict", b'{"input":[0,0,0,0,0,0,0,0,0,0],"input":"x"}', JSON),
    "native trailing data": ("/predict", b'{"input":[0,0,0,0,0,0,0,0,0,0]} []', JSON),
    "native empty body": ("/predict", b"", JSON),
    "native form content type": ("/predict", to_json({"input": ZEROS}),
                                 {"content-type": "application/x-www-form-urlencoded"}),
    "v1 10,000-deep instances": (f"/v1/models/{MODEL}:predict", b'{"instances":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
                                 JSON),
    "v1 instance of strings": (f"/v1/models/{MODEL}:predict", to_json({"instances": [["1"] * FEATURES]}), JSON),
    "v1 unknown model": ("/v1/models/%00:predict", to_json({"instances": [ZEROS]}), JSON),
    "v2 unknown version with dots": (f"/v2/models/{MODEL}/versions/%2e%2e/infer", _v2([1, FEATURES], ZEROS), JSON),
}

# Lenient on purpose: integer V2 data is converted to float32 without a range check per datatype, and
# binary_data_output is read as a truth value.
MAY_SUCCEED = {"v2 integer data out of INT8 range", "v2 binary_data_output not a bool"}


@pytest.mark.parametrize("name", list(KNOWN_CASES))
def test_known_hostile_requests_get_a_4xx(http: httpx.Client, name: str) -> None:
    path, body, headers = KNOWN_CASES[name]
    try:
        response = http.post(path, content=body, headers=headers)
    except httpx.HTTPError as exc:
        TALLY.record(path, "no answer", None, "")
        raise AssertionError(f"no answer: {exc!r}") from exc
    TALLY.record(path, response.status_code, None, "")
    if name in MAY_SUCCEED:
        assert response.status_code < 500, f"{response.status_code} {response.text[:300]}"
    else:
        assert 400 <= response.status_code < 500, f"{response.status_code} {response.text[:300]}"
    assert problem_with(response.status_code, response.content) is None, response.text[:300]


# -- numbers beyond float32 ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1e39, 1e300, -3.5e38])
def test_numbers_beyond_float32_are_refused_on_every_protocol(http: httpx.Client, value: float) -> None:
    """A JSON number that is finite but overflows float32 is not a finite model input: every protocol
    refuses it (V2 does), rather than answering 200 with ``null`` computed from an infinity."""
    row = [value] + [0.0] * (FEATURES - 1)
    bodies = {"/predict": {"input": row}, f"/v1/models/{MODEL}:predict": {"instances": [row]},
              f"/v2/models/{MODEL}/infer": {"inputs": [{"name": "input", "shape": [1, FEATURES],
                                                         "datatype": "FP64", "data": row}]}}
    answers = {path: http.post(path, json=body) for path, body in bodies.items()}
    for path, response in answers.items():
        TALLY.record(path, response.status_code, None, "")
    assert {path: r.status_code for path, r in answers.items()} == {
        "/predict": 422, f"/v1/models/{MODEL}:predict": 400, f"/v2/models/{MODEL}/infer": 400}, \
        {path: r.text for path, r in answers.items()}


# -- afterwards -----------------------------------------------------------------------------------------


def test_server_still_answers_correctly_after_fuzzing(fuzz_server: ServerProcess, http: httpx.Client) -> None:
    by_status: Counter[int | str] = Counter()
    for (_, status), count in TALLY.statuses.items():
        by_status[status] += count
    print(f"\nfuzz: {TALLY.total} requests; by status: {dict(sorted(by_status.items(), key=str))}")

    rows = np.random.default_rng(11).standard_normal((3, FEATURES))
    expected = reference_outputs(SHIPPED_WEIGHTS, rows)
    single = http.post("/predict", json={"input": rows[0].tolist()})
    assert single.status_code == 200, single.text
    assert_matches([single.json()["output"]], expected[:1])
    many = http.post("/predict", json={"inputs": rows.tolist()})
    assert many.status_code == 200, many.text
    assert_matches(many.json()["outputs"], expected)
    v1 = http.post(f"/v1/models/{MODEL}:predict", json={"instances": rows.tolist()})
    assert v1.status_code == 200, v1.text
    assert_matches(v1.json()["predictions"], expected)
    v2 = http.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
        {"name": "input", "shape": [3, FEATURES], "datatype": "FP32", "data": rows.ravel().tolist()}]})
    assert v2.status_code == 200, v2.text
    assert_matches(v2.json()["outputs"][0]["data"], expected)
    assert http.get("/health/ready").status_code == 200

    assert fuzz_server.proc.poll() is None, "the server exited"
    living = {pid for pid in process_tree(fuzz_server.pid) if alive(pid)}
    lost = fuzz_server.processes - living  # type: ignore[attr-defined]
    assert not lost, f"server processes died during fuzzing: {sorted(lost)}; now {sorted(living)}"
    log = fuzz_server.log()
    for marker in ("Exception in ASGI application", "unexpected error", "Traceback"):
        assert marker not in log, f"the server logged {marker!r}:\n{log[max(0, log.index(marker) - 200):][:3000]}"

    if {"schemathesis", *PREDICT_PATHS} <= TALLY.completed:  # the whole file ran (not a -k selection)
        assert TALLY.total >= MIN_CASES, f"only {TALLY.total} fuzz requests were sent"
