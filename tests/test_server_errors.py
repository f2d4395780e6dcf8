"""Wrong requests against a real server process: always a small 4xx naming the field, never a
5xx, never the input echoed back. Also the body-size limit and the default CORS policy."""
from __future__ import annotations

import numpy as np
import orjson
import pytest
import requests
from server_helpers import small_model_file, start_cli_server

MARKER = 987.654321  # put in every bad volume: it must never come back in an error
MAX_VOLUMES = 3
MAX_BODY = 8 * 1024**2
ERROR_BODY_LIMIT = 2048


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = small_model_file(tmp_path_factory.mktemp("model") / "small.safetensors")
    proc = start_cli_server(model, "--max-volumes", str(MAX_VOLUMES),
                            "--max-body-bytes", str(MAX_BODY))
    yield proc
    proc.stop()


def vol(shape=(48, 48, 48)) -> list:
    array = np.zeros(shape)
    array.flat[0] = MARKER
    return array.tolist()


def raw_volume(token: str) -> bytes:
    """A 48^3 volume as JSON text with one element replaced by ``token``."""
    text = orjson.dumps(vol()).decode()
    return text.replace(str(MARKER), token, 1).encode()


def ragged() -> list:
    v = vol()
    v[5][7] = v[5][7][:-1]
    return v


def with_element(value) -> list:
    v = vol()
    v[1][2][3] = value
    return v


J = "application/json"
CASES = [
    # (id, method, path, json body or raw bytes, content type, status, fragment)
    ("shape 32^3", "POST", "/extract_features", {"input_volume": vol((32, 32, 32))}, J, 422,
     "input_volume must have shape (48, 48, 48), got (32, 32, 32)"),
    ("shape 48x48x47", "POST", "/reconstruct", {"input_volume": vol((48, 48, 47))}, J, 422,
     "(48, 48, 48)"),
    ("2-D", "POST", "/extract_features", {"input_volume": vol((48, 48))}, J, 422, "got (48, 48)"),
    ("4-D", "POST", "/extract_gaussian_splats", {"input_volume": vol((1, 48, 48, 48))}, J, 422,
     "got (1, 48, 48, 48)"),
    ("ragged", "POST", "/extract_features", {"input_volume": ragged()}, J, 422, "ragged"),
    ("empty list", "POST", "/reconstruct", {"input_volume": []}, J, 422, "got (0,)"),
    ("empty nested", "POST", "/extract_features", {"input_volume": [[[]]]}, J, 422,
     "got (1, 1, 0)"),
    ("scalar", "POST", "/extract_features", {"input_volume": 5}, J, 422, "input_volume"),
    ("string volume", "POST", "/extract_features", {"input_volume": "abc"}, J, 422,
     "got a string"),
    ("string element", "POST", "/extract_features", {"input_volume": with_element("1.5")}, J,
     422, "only numbers"),
    ("null element", "POST", "/extract_features", {"input_volume": with_element(None)}, J, 422,
     "only numbers"),
    ("float32 overflow", "POST", "/extract_features", {"input_volume": with_element(1e39)}, J,
     422, "finite"),
    ("NaN literal", "POST", "/extract_features",
     b'{"input_volume": ' + raw_volume("NaN") + b"}", J, 400, "malformed JSON"),
    ("Infinity literal", "POST", "/reconstruct",
     b'{"input_volume": ' + raw_volume("Infinity") + b"}", J, 400, "malformed JSON"),
    ("1e400", "POST", "/extract_gaussian_splats",
     b'{"input_volume": ' + raw_volume("1e400") + b"}", J, 400, "malformed JSON"),
    ("missing volume", "POST", "/extract_features", {"return_pose": True}, J, 422,
     "input_volume is required"),
    ("body not an object", "POST", "/extract_features", [1, 2], J, 422, "JSON object"),
    ("malformed JSON", "POST", "/extract_features", b'{"input_volume": [1, 2', J, 400,
     "malformed JSON"),
    ("empty body", "POST", "/reconstruct", b"", J, 400, "empty"),
    ("text/plain", "POST", "/extract_features", {"input_volume": vol()}, "text/plain", 415,
     "application/json"),
    ("no content type", "POST", "/batch_process", {"input_volumes": [vol()]}, None, 415,
     "application/json"),
    ("bad option type", "POST", "/reconstruct",
     {"input_volume": vol(), "use_segmented_decoder": "maybe"}, J, 422, "use_segmented_decoder"),
    ("unknown operation", "POST", "/batch_process",
     {"input_volumes": [vol()], "operation": "bogus\r\nx"}, J, 422,
     "'reconstruction', 'features' or 'splats'"),
    ("batch_size 0", "POST", "/batch_process", {"input_volumes": [vol()], "batch_size": 0}, J,
     422, "batch_size"),
    ("batch_size -1", "POST", "/batch_process", {"input_volumes": [vol()], "batch_size": -1}, J,
     422, "greater than 0"),
    ("no volumes", "POST", "/batch_process", {"input_volumes": []}, J, 422, "at least one volume"),
    ("3-D batch", "POST", "/batch_process", {"input_volumes": vol((2, 48, 48))}, J, 422,
     "input_volumes[0] must have shape (48, 48, 48), got (48, 48)"),
    ("mixed shapes", "POST", "/batch_process",
     {"input_volumes": [vol(), vol((40, 48, 48))]}, J, 422, "input_volumes[1]"),
    ("too many volumes", "POST", "/batch_process",
     {"input_volumes": [[[[0.0]]]] * (MAX_VOLUMES + 1)}, J, 413, f"at most {MAX_VOLUMES}"),
    ("GET on POST route", "GET", "/reconstruct", None, None, 405, "Method Not Allowed"),
    ("GET batch", "GET", "/batch_process", None, None, 405, "Method Not Allowed"),
    ("statistics no param", "GET", "/statistics", None, None, 422, "volume"),
    ("statistics not JSON", "GET", "/statistics?volume=hello", None, None, 400, "malformed"),
    ("statistics empty", "GET", "/statistics?volume=[]", None, None, 422, "empty"),
    ("statistics NaN", "GET", "/statistics?volume_data=[NaN,1]", None, None, 400, "malformed"),
    ("statistics string", "GET", "/statistics?volume=[1,%22a%22]", None, None, 422, "numbers"),
    ("statistics post empty", "POST", "/statistics", {"volume": [[]]}, J, 422, "empty"),
    ("statistics post missing", "POST", "/statistics", {"other": 1}, J, 422, "volume is required"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, case):
    _, method, path, body, content_type, status, fragment = case
    headers = {"Content-Type": content_type} if content_type else {}
    data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
    response = requests.request(method, server.url + path, data=data, headers=headers,
                                timeout=30)
    assert response.status_code == status, response.text
    assert fragment in response.text
    assert len(response.content) < ERROR_BODY_LIMIT
    assert "987.654" not in response.text
    assert "Traceback" not in response.text
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


def test_body_over_limit_by_content_length(server):
    body = b'{"input_volumes": [' + b"0," * (MAX_BODY // 2) + b"0]}"
    response = requests.post(server.url + "/batch_process", data=body,
                             headers={"Content-Type": J}, timeout=30)
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_body_over_limit_when_streamed(server):
    def chunks():
        yield b'{"input_volumes": ['
        for _ in range(MAX_BODY // (1 << 16) + 2):
            yield b"0," * (1 << 15)
        yield b"0]}"

    response = requests.post(server.url + "/batch_process", data=chunks(),
                             headers={"Content-Type": J}, timeout=30)
    assert response.status_code == 413


def test_default_cors_allows_any_origin_without_credentials(server):
    origin = "https://evil.example"
    response = requests.get(server.url + "/health", headers={"Origin": origin, "Cookie": "a=b"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers
    preflight = requests.options(server.url + "/reconstruct", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
