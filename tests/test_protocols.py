"""The native POST /predict protocol against the real server, compared with SimpleNN in-process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from serve.versions import file_version
from tests.conftest import SHIPPED_WEIGHTS, assert_matches, reference_outputs

SHIPPED_VERSION = file_version(SHIPPED_WEIGHTS)
RNG = np.random.default_rng(42)


def test_one_row_answers_like_the_model_with_its_version(client: httpx.Client) -> None:
    row = RNG.standard_normal(10)
    response = client.post("/predict", json={"input": row.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"output", "model_version"}
    assert isinstance(body["output"], float)
    assert_matches(body["output"], reference_outputs(SHIPPED_WEIGHTS, row[None])[0])
    assert body["model_version"] == SHIPPED_VERSION
    assert response.headers["x-model-version"] == SHIPPED_VERSION


@pytest.mark.parametrize("rows", [1, 2, 64, 512])
def test_many_rows_answer_in_order(client: httpx.Client, rows: int) -> None:
    inputs = RNG.standard_normal((rows, 10))
    response = client.post("/predict", json={"inputs": inputs.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == SHIPPED_VERSION
    assert len(body["outputs"]) == rows
    assert_matches(body["outputs"], reference_outputs(SHIPPED_WEIGHTS, inputs))


def test_32_concurrent_clients_each_get_their_own_answer(server) -> None:
    rows = RNG.standard_normal((32, 10))

    def one(i: int) -> float:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            response = http.post("/predict", json={"input": rows[i].tolist()})
            assert response.status_code == 200, response.text
            return response.json()["output"]

    with ThreadPoolExecutor(32) as pool:
        outputs = list(pool.map(one, range(32)))
    assert_matches(outputs, reference_outputs(SHIPPED_WEIGHTS, rows))


GOOD_ROW = [0.5] * 10
BAD_REQUESTS = [
    # (name, body bytes, content type, status, words the message must contain)
    ("malformed JSON", b'{"input": [1, 2,', "application/json", 400, ["malformed JSON"]),
    ("unknown key", b'{"input": [0,0,0,0,0,0,0,0,0,0], "extra": 1}', "application/json", 422, ["extra"]),
    ("missing key", b"{}", "application/json", 422, ["input", "inputs"]),
    ("wrong key", b'{"rows": [[0,0,0,0,0,0,0,0,0,0]]}', "application/json", 422, ["rows"]),
    ("short row", b'{"inputs": [[0,0,0,0,0,0,0,0,0,0], [1,2,3]]}', "application/json", 422, ["inputs[1]", "10"]),
    ("long row", b'{"input": [0,0,0,0,0,0,0,0,0,0,0]}', "application/json", 422, ["input", "10"]),
    ("string", b'{"input": [0,0,0,0,0,0,0,0,0,"x"]}', "application/json", 422, ["input[9]", "number"]),
    ("boolean", b'{"input": [0,0,0,0,0,0,0,0,0,true]}', "application/json", 422, ["input[9]", "number"]),
    ("null", b'{"input": [0,0,0,0,0,0,0,0,0,null]}', "application/json", 422, ["input[9]", "number"]),
    ("NaN", b'{"input": [0,0,0,0,0,0,0,0,0,NaN]}', "application/json", 422, ["input[9]", "finite"]),
    ("Infinity", b'{"input": [0,0,0,0,0,0,0,0,0,-Infinity]}', "application/json", 422, ["input[9]", "finite"]),
    ("overflow", b'{"input": [0,0,0,0,0,0,0,0,0,1e999]}', "application/json", 422, ["input[9]", "finite"]),
    ("float32 overflow", b'{"input": [0,0,0,0,0,0,0,0,0,1e39]}', "application/json", 422, ["input", "float32"]),
    ("empty inputs", b'{"inputs": []}', "application/json", 422, ["inputs", "at least 1"]),
    ("both keys", b'{"input": [0,0,0,0,0,0,0,0,0,0], "inputs": [[0,0,0,0,0,0,0,0,0,0]]}', "application/json", 422,
     ["exactly one"]),
    ("not an object", b"[1, 2, 3]", "application/json", 422, ["object"]),
    ("too many rows", b'{"inputs": [' + b",".join([b"[0,0,0,0,0,0,0,0,0,0]"] * 513) + b"]}", "application/json",
     422, ["inputs", "512"]),
    ("wrong content type", b'{"input": [0,0,0,0,0,0,0,0,0,0]}', "text/plain", 415, ["Content-Type"]),
    ("form content type", b"input=1", "application/x-www-form-urlencoded", 415, ["Content-Type"]),
]


@pytest.mark.parametrize(("name", "body", "content_type", "status", "words"), BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_gets_a_clear_4xx(client: httpx.Client, name: str, body: bytes, content_type: str, status: int,
                                    words: list[str]) -> None:
    response = client.post("/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message, f"{name}: {message!r} lacks {word!r}"


def test_body_over_the_size_limit_is_413(client: httpx.Client) -> None:
    body = b'{"inputs": [' + b" " * (8 * 1024 * 1024 + 10) + b"]}"
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "limit" in response.json()["error"]


def test_bad_requests_never_hurt_good_ones_in_the_same_batch(batching_server) -> None:
    # A 300 ms batch window makes concurrent good and bad requests land in the same batches.
    server = batching_server
    rows = RNG.standard_normal((24, 10))
    bodies = [(i, {"input": rows[i].tolist()}) for i in range(24)]
    bad = [{"input": [1, 2]}, {"input": [0] * 9 + ["x"]}, {"inputs": []}, {"nope": 1}] * 6

    def send(item) -> tuple[int, dict]:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            response = http.post("/predict", json=item[1] if isinstance(item, tuple) else item)
            return response.status_code, response.json()

    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(send, [x for pair in zip(bodies, bad) for x in pair]))
    good = results[0::2]
    assert [status for status, _ in good] == [200] * 24
    assert_matches([body["output"] for _, body in good], reference_outputs(SHIPPED_WEIGHTS, rows))
    assert {status for status, _ in results[1::2]} == {422}


def test_unknown_route_and_method_use_the_error_shape(client: httpx.Client) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = client.get("/predict")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_an_input_whose_output_is_not_finite_is_refused_and_harms_nobody(client: httpx.Client) -> None:
    huge = [3e38] * 10
    assert not np.isfinite(reference_outputs(SHIPPED_WEIGHTS, np.array([huge]))).all()
    response = client.post("/predict", json={"inputs": [huge, [0.5] * 10]})
    assert response.status_code == 422 and "not a finite number" in response.json()["error"]
    v1 = client.post("/v1/models/simplenn:predict", json={"instances": [huge]})
    assert v1.status_code == 400 and "not a finite number" in v1.json()["error"]
    assert client.post("/predict", json={"input": [0.5] * 10}).status_code == 200
