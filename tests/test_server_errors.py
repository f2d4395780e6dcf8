"""Wrong requests against a real server process: always a small 4xx naming the field, never a
5xx, never the input echoed back; one table across every endpoint and format (JSON, .npy, MRC,
multipart). Also the body-size limit, 405's Allow header and the default CORS policy."""
from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import orjson
import pytest
import requests
from server_helpers import start_in_process

from cryolens import formats

MARKER = 987.654321  # put in every bad volume: it must never come back in an error
MAX_VOLUMES = 3
MAX_BODY = 8 * 1024**2
ERROR_BODY_LIMIT = 2048


@pytest.fixture(scope="module")
def server(small_model):
    """The app with small limits, in this process: what is checked here is the app's answer to
    a request, which a process of its own would not change (tests/test_server_hygiene.py and
    the hostile-input tests send theirs to real processes)."""
    proc = start_in_process(small_model, max_volumes=MAX_VOLUMES, max_body_bytes=MAX_BODY)
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


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=True)
    return buffer.getvalue()


def npy_header(descr: str, shape: tuple, data: bytes = b"") -> bytes:
    """A hand-written .npy: any header, any data (lies included)."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (63 - len(header) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


def mrc(array=None, mode: int | None = None, cut: int = 0) -> bytes:
    """An MRC file's bytes; ``mode`` overwrites the header's mode word, ``cut`` drops bytes."""
    from cryolens.formats import write_mrc

    array = np.zeros((48, 48, 48), np.float32) if array is None else array
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.mrc"
        write_mrc(path, array)
        data = bytearray(path.read_bytes())
    if mode is not None:
        data[12:16] = int(mode).to_bytes(4, "little")
    return bytes(data[:len(data) - cut])


BOUNDARY = "hostileboundary"
MP = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(payload: bytes, name: str = "file", filename: str | None = "v.mrc") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + \
        f"\r\n--{BOUNDARY}--\r\n".encode()


J = "application/json"
N = "application/x-npy"
M = "application/octet-stream"
GOOD = np.zeros((48, 48, 48), np.float32)
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
    # -- booleans, JSON whitespace ----------------------------------------------------------
    ("true among numbers", "POST", "/extract_features", {"input_volume": with_element(True)}, J,
     422, "no booleans"),
    ("false among numbers", "POST", "/batch_process",
     {"input_volumes": [vol(), with_element(False)]}, J, 422,
     "input_volumes[1] must hold only numbers, no booleans"),
    ("all booleans", "POST", "/reconstruct", {"input_volume": [[[True]]]}, J, 422,
     "no booleans"),
    ("statistics boolean", "GET", "/statistics?volume=[1,true,2]", None, None, 422,
     "no booleans"),
    ("statistics post boolean", "POST", "/statistics", {"volume": [[1.0, False]]}, J, 422,
     "no booleans"),
    ("vertical tab between volumes", "POST", "/batch_process",
     b'{"input_volumes": [[[[0]]]\x0b, [[[0]]]]}', J, 400, "malformed JSON"),
    ("unknown path", "GET", "/reconstruct_all", None, None, 404, "Not Found"),
    ("PUT statistics", "PUT", "/statistics", None, None, 405, "Method Not Allowed"),
    # -- .npy ---------------------------------------------------------------------------------
    ("npy 32^3", "POST", "/extract_features", npy(np.zeros((32, 32, 32), np.float32)), N, 422,
     "must be one volume of shape (48, 48, 48)"),
    ("npy bool", "POST", "/reconstruct", npy(np.zeros((48, 48, 48), bool)), N, 422,
     "real numbers"),
    ("npy object", "POST", "/extract_gaussian_splats", npy(np.array([None, 1], object)), N, 422,
     "real numbers"),
    ("npy complex", "POST", "/statistics", npy(np.zeros(4, np.complex64)), N, 422,
     "real numbers"),
    ("npy no magic", "POST", "/extract_features", b"NUMPY" + bytes(100), N, 400,
     "not a .npy file"),
    ("npy truncated", "POST", "/reconstruct", npy(GOOD)[:-100], N, 400, "the body holds"),
    ("npy lying header length", "POST", "/extract_features",
     b"\x93NUMPY\x01\x00\xff\xff{'descr'", N, 400, "beyond the body"),
    ("npy unreadable header", "POST", "/extract_features", npy_header("<f4", "__import__"), N,
     400, "header cannot be read"),
    ("npy huge declared shape", "POST", "/batch_process",
     npy_header("<f4", (10**9, 48, 48, 48)), N, 400, "the body holds"),
    ("npy NaN", "POST", "/extract_features", npy(np.full((48, 48, 48), np.nan, np.float32)),
     N, 422, "finite"),
    ("npy float64 1e39", "POST", "/reconstruct", npy(np.full((48, 48, 48), 1e39)), N, 422,
     "finite"),
    ("npy too many", "POST", "/batch_process",
     npy(np.zeros((MAX_VOLUMES + 1, 48, 48, 48), np.float32)), N, 413, f"at most {MAX_VOLUMES}"),
    ("npy empty stack", "POST", "/batch_process", npy(np.zeros((0, 48, 48, 48), np.float32)),
     N, 422, "empty stack"),
    ("npy bad query option", "POST", "/reconstruct?use_segmented_decoder=maybe", npy(GOOD), N,
     422, "use_segmented_decoder"),
    ("npy batch_size 0", "POST", "/batch_process?batch_size=0", npy(GOOD[None]), N, 422,
     "batch_size"),
    ("npy statistics empty", "POST", "/statistics", npy(np.zeros(0, np.float32)), N, 422,
     "empty"),
    # -- MRC ------------------------------------------------------------------------------------
    ("MRC shorter than header", "POST", "/extract_features", b"MAP " * 10, M, 400,
     "shorter than the 1024-byte header"),
    ("MRC no marker", "POST", "/reconstruct", bytes(1024 + 4 * 48**3), M, 400, "'MAP '"),
    ("MRC complex mode", "POST", "/extract_gaussian_splats", mrc(mode=4), M, 422, "MRC mode 4"),
    ("MRC truncated", "POST", "/extract_features", mrc(cut=4), M, 400, "declares"),
    ("MRC wrong shape", "POST", "/batch_process", mrc(np.zeros((40, 48, 48), np.float32)), M,
     422, "(40, 48, 48)"),
    ("MRC NaN", "POST", "/statistics", mrc(np.full((4, 4, 4), np.nan, np.float32)), M, 422,
     "finite"),
    # -- multipart ------------------------------------------------------------------------------
    ("multipart no file", "POST", "/extract_features", multipart(b"1", filename=None), MP, 422,
     "no file field"),
    ("multipart garbage file", "POST", "/reconstruct", multipart(b"garbage" * 200), MP, 400,
     "not an MRC file"),
    ("multipart npy wrong shape", "POST", "/batch_process",
     multipart(npy(np.zeros((2, 48, 48), np.float32)), filename="v.npy"), MP, 422,
     "must be one volume of shape"),
    ("multipart truncated MRC", "POST", "/extract_gaussian_splats", multipart(mrc(cut=1)), MP,
     400, "declares"),
    ("multipart broken", "POST", "/extract_features", b"--" + BOUNDARY.encode() + b"\r\nxx",
     MP, 422, "no file field"),
    ("multipart statistics", "POST", "/statistics", multipart(b"\x93NUMPY\x01"), MP, 400,
     "truncated"),
    ("multipart no boundary", "POST", "/reconstruct", multipart(npy(GOOD)),
     "multipart/form-data", 400, "multipart body cannot be read: Missing boundary"),
    ("multipart two files", "POST", "/extract_features",
     multipart(npy(GOOD)).replace(f"--{BOUNDARY}--".encode(), b"") + multipart(npy(GOOD)),
     MP, 400, "multipart body cannot be read: Too many files"),
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
    answer = response.json()
    if status not in (404, 405):  # every mistake in a request names its field
        assert answer.get("field") or all(e["loc"] for e in answer["detail"]), answer
    assert len(response.content) < ERROR_BODY_LIMIT
    assert "987.654" not in response.text
    assert "Traceback" not in response.text
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


def test_matrix_is_wide():
    assert len(CASES) >= 40
    assert {c[4] for c in CASES} >= {J, N, M, MP}
    assert {c[2].split("?")[0] for c in CASES} >= {
        "/reconstruct", "/extract_features", "/extract_gaussian_splats", "/batch_process",
        "/statistics"}


@pytest.mark.parametrize("method, path, allow", [
    ("PUT", "/statistics", "GET, HEAD, POST"), ("GET", "/reconstruct", "POST"),
    ("POST", "/health", "GET, HEAD")])
def test_405_allow_lists_every_method_of_the_path(server, method, path, allow):
    response = requests.request(method, server.url + path, timeout=10)
    assert response.status_code == 405
    assert response.headers["Allow"] == allow


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


EXTREMES = {"1e20": np.full((48, 48, 48), 1e20, np.float32),
            "+-3e38": np.where(np.indices((48, 48, 48)).sum(0) % 2, 3e38, -3e38).astype(
                np.float32),
            "1e-40": np.full((48, 48, 48), 1e-40, np.float32)}
ENDPOINTS = [("/reconstruct", "input_volume"), ("/extract_features", "input_volume"),
             ("/extract_gaussian_splats", "input_volume"), ("/batch_process", "input_volumes"),
             ("/statistics", "volume")]


def test_a_reconstruction_beyond_float32_names_the_requests_own_field(demo_server):
    """The engine finds it (after de-normalising) and names its own argument, ``volumes``;
    the client hears of the field it sent, or ``body``, and of no Python-only option. (On the
    demo model: the small random model's output stays in range here.)"""
    volume = np.where(np.random.default_rng(3).standard_normal((48, 48, 48)) > 0, 3e38,
                      -3e38).astype(np.float32)
    for path, field, body, headers in [
            ("/reconstruct", "input_volume", orjson.dumps(
                {"input_volume": volume}, option=orjson.OPT_SERIALIZE_NUMPY), {}),
            ("/batch_process", "input_volumes", orjson.dumps(
                {"input_volumes": volume[None]}, option=orjson.OPT_SERIALIZE_NUMPY), {}),
            ("/reconstruct", "body", formats.write_npy(volume),
             {"Content-Type": formats.NPY_MEDIA_TYPE})]:
        response = requests.post(demo_server.url + path, data=body,
                                 headers={"Content-Type": J, **headers}, timeout=120)
        assert response.status_code == 422, response.text
        answer = response.json()
        assert answer["field"] == field and "float32's range" in answer["detail"], answer
        assert "in Python ask for normalised units" in answer["detail"], answer


@pytest.mark.parametrize("path, field", ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
@pytest.mark.parametrize("name", list(EXTREMES))
def test_extreme_finite_values_give_finite_json_or_4xx(server, path, field, name):
    volume = EXTREMES[name]
    value = volume[None] if field == "input_volumes" else volume
    response = requests.post(server.url + path, timeout=120, headers={"Content-Type": J},
                             data=orjson.dumps({field: value},
                                               option=orjson.OPT_SERIALIZE_NUMPY))
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        assert response.json()["field"] == field, response.text  # the request's own field
        assert "denormalise" not in response.json()["detail"] or "in Python" in \
            response.json()["detail"], response.text  # not an option of the request
        return
    assert b"null" not in response.content, response.text[:300]  # orjson writes NaN as null
