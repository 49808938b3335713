"""KServe V1 and the Open Inference Protocol (V2) against the real server; V2 through the stock
``tritonclient[http]`` package."""

from __future__ import annotations


import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from serve.versions import file_version
from tests.conftest import SHIPPED_WEIGHTS, assert_matches, reference_outputs

VERSION = file_version(SHIPPED_WEIGHTS)
RNG = np.random.default_rng(5)


@pytest.fixture(scope="module")
def triton_client(server):
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"), concurrency=1)
    yield client
    client.close()


# -- V1 -------------------------------------------------------------------------------------------
def test_v1_list_and_status(client: httpx.Client) -> None:
    assert client.get("/v1/models").json() == {"models": ["simplenn"]}
    status = client.get("/v1/models/simplenn").json()
    assert status["name"] == "simplenn" and status["ready"] is True and status["version"] == VERSION


def test_v1_predict_one_prediction_per_instance_in_order(client: httpx.Client) -> None:
    rows = RNG.standard_normal((7, 10))
    response = client.post("/v1/models/simplenn:predict", json={"instances": rows.tolist()})
    assert response.status_code == 200
    assert response.headers["x-model-version"] == VERSION
    assert_matches(response.json()["predictions"], reference_outputs(SHIPPED_WEIGHTS, rows))


@pytest.mark.parametrize(("path", "body", "status", "word"), [
    ("/v1/models/simplenn:predict", {"instances": [[1, 2]]}, 400, "instances[0]"),
    ("/v1/models/simplenn:predict", {"instances": []}, 400, "instances"),
    ("/v1/models/simplenn:predict", {"inputs": [[0] * 10]}, 400, "instances"),
    ("/v1/models/simplenn:predict", {"instances": [[0] * 9 + ["x"]]}, 400, "instances[0][9]"),
    ("/v1/models/other:predict", {"instances": [[0] * 10]}, 404, "other"),
])
def test_v1_errors(client: httpx.Client, path: str, body: dict, status: int, word: str) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status
    assert word in response.json()["error"]


def test_v1_malformed_json_is_400(client: httpx.Client) -> None:
    response = client.post("/v1/models/simplenn:predict", content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]


# -- V2 with the stock client ---------------------------------------------------------------------
def test_v2_live_ready_and_metadata_with_tritonclient(triton_client) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("simplenn")
    assert triton_client.is_model_ready("simplenn", VERSION)
    assert triton_client.get_server_metadata()["name"] == "simplenn-serve"
    metadata = triton_client.get_model_metadata("simplenn")
    assert metadata["versions"] == [VERSION]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 10]}]
    assert metadata["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 1]}]


@pytest.mark.parametrize("rows", [1, 100])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_v2_infer_with_tritonclient(triton_client, rows: int, binary: bool) -> None:
    values = RNG.standard_normal((rows, 10)).astype(np.float32)
    tensor = triton.InferInput("input", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values, binary_data=binary)
    result = triton_client.infer("simplenn", [tensor], request_id="req-7",
                                 outputs=[triton.InferRequestedOutput("output", binary_data=binary)])
    output = result.as_numpy("output")
    assert output.shape == (rows, 1)
    assert_matches(output[:, 0], reference_outputs(SHIPPED_WEIGHTS, values))
    response = result.get_response()
    assert response["model_name"] == "simplenn" and response["model_version"] == VERSION
    assert response["id"] == "req-7"


def test_v2_unknown_model_and_version_are_404(triton_client) -> None:
    with pytest.raises(InferenceServerException, match="not served"):
        triton_client.get_model_metadata("other")
    assert not triton_client.is_model_ready("simplenn", "000000000000")


# -- V2 over plain HTTP: forms and errors ---------------------------------------------------------
def test_v2_nested_data_fp64_and_version_path(client: httpx.Client) -> None:
    rows = RNG.standard_normal((8, 10))
    body = {"inputs": [{"name": "input", "shape": [8, 10], "datatype": "FP64", "data": rows.tolist()}]}
    response = client.post(f"/v2/models/simplenn/versions/{VERSION}/infer", json=body)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    assert out["shape"] == [8, 1] and out["datatype"] == "FP32"
    assert_matches(out["data"], reference_outputs(SHIPPED_WEIGHTS, rows))
    other = client.post("/v2/models/simplenn/versions/000000000000/infer", json=body)
    assert other.status_code == 404


def _infer_body(**tensor) -> dict:
    return {"inputs": [{"name": "input", "shape": [1, 10], "datatype": "FP32", "data": [0.0] * 10, **tensor}]}


@pytest.mark.parametrize(("body", "word"), [
    (_infer_body(shape=[1, 9], data=[0.0] * 9), "[N, 10]"),
    (_infer_body(shape=[2, 10]), "needs 20 values"),
    (_infer_body(datatype="BYTES"), "not supported"),
    (_infer_body(datatype="BOOL"), "not supported"),
    (_infer_body(name="x"), "named 'input'"),
    (_infer_body(data=[0.0] * 9 + ["a"]), "data"),
    (_infer_body(datatype="INT32", data=[0.5] * 10), "whole numbers"),
    ({"inputs": []}, "inputs"),
    (_infer_body(data=[[0.0] * 5, [0.0] * 6]), "same length"),
    (_infer_body(shape=[2**63 - 1, 2**63 - 1], data=[1.0]), "larger than"),
    (_infer_body(data=[0.0] * 9 + [1e39]), "float32"),
    ({"inputs": [{"name": "input"}]}, "shape"),
    ({**_infer_body(), "outputs": [{"name": "nope"}]}, "nope"),
])
def test_v2_bad_requests_are_400_with_a_message(client: httpx.Client, body: dict, word: str) -> None:
    response = client.post("/v2/models/simplenn/infer", json=body)
    assert response.status_code == 400, response.text
    assert word in response.json()["error"]


def test_v2_server_routes(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/other/ready").status_code == 404


def test_openapi_documents_every_protocol_route(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/predict", "/v1/models", "/v1/models/{name}", "/v1/models/{name}:predict", "/v2",
                 "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
                 "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        assert path in paths, path
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert "inputs" in infer["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "$ref" not in str(infer)
    assert client.get("/docs").status_code == 200
